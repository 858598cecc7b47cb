"""examples/minionerec_grpo_gflownet.py --smoke on the MiniOneRec-format fixture: GRPO, GFlowNet, constrained
beam search with zero invalid items."""
import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed (pip install 'gflowgr[trl]')")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "minionerec_office"


def _load():
    spec = importlib.util.spec_from_file_location("example_minionerec_trl",
                                                  ROOT / "examples" / "minionerec_grpo_gflownet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_smoke_runs_grpo_then_gflownet_with_no_invalid_items(tmp_path, capsys):
    metrics = _load().main(["--smoke", "--data", str(FIXTURE), "--out", str(tmp_path)])
    assert metrics["invalid_items"] == 0 and metrics["beams_total"] == 6 * 4
    assert metrics["unconstrained_invalid_items"] > 0  # the count is not zero by construction
    assert math.isfinite(metrics["gfn_balance"]) and 0.0 <= metrics["recall@4"] <= 1.0
    assert "invalid items 0 / 24" in capsys.readouterr().out


def test_example_reads_gflowgr_data(monkeypatch, tmp_path):
    monkeypatch.setenv("GFLOWGR_DATA", str(tmp_path))
    module = _load()
    assert module.DEFAULT_DATA == tmp_path / "minionerec" / "Office_Products"
    with pytest.raises(SystemExit, match="has no \\*.index.json"):
        module.main(["--smoke"])
