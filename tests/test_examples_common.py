"""Every script in examples/ takes --smoke and reads its data from $GFLOWGR_DATA by default; the HF Trainer
example runs end to end with --smoke and prints a `gflowgr eval` command the CLI accepts."""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def load_example(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_takes_smoke_and_reads_gflowgr_data(path, monkeypatch, tmp_path):
    if path.stem == "minionerec_grpo_gflownet":
        pytest.importorskip("trl", reason="trl is not installed (pip install 'gflowgr[trl]')")
    assert '"--smoke"' in path.read_text(), f"{path.name} takes no --smoke"
    monkeypatch.setenv("GFLOWGR_DATA", str(tmp_path))
    module = load_example(path)
    assert Path(module.DEFAULT_DATA).is_relative_to(tmp_path), (path.name, module.DEFAULT_DATA)
    with pytest.raises(SystemExit, match="GFLOWGR_DATA"):  # nothing there: the message says where it looked
        module.main(["--smoke", "--out", str(tmp_path / "out")] if path.stem != "t5_tiger_tb"
                    and path.stem != "causal_lm_add_tb" else ["--smoke"])


def test_hf_trainer_example_smoke(beauty_tiny, tmp_path, capsys):
    from gflowgr_core.cli import build_parser

    result = load_example(ROOT / "examples" / "hf_trainer_gflowgr.py").main(
        ["--smoke", "--data", str(beauty_tiny), "--out", str(tmp_path / "hf")])
    for stage in ("sft_valid", "gflowgr_valid"):
        assert 0.0 <= result[stage]["eval_recall@10"] <= 1.0
    assert Path(result["checkpoint"]).is_dir() and any(Path(result["checkpoint"]).iterdir())
    printed = capsys.readouterr().out
    assert result["eval_command"] in printed
    argv = shlex.split(result["eval_command"])
    assert argv[:2] == ["gflowgr", "eval"]
    args = build_parser().parse_args(argv[1:])
    assert args.checkpoint == result["checkpoint"] and args.split == "test"
