"""The worked examples run end to end on the bundled Beauty slice with --smoke (a handful of steps)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, loss_keys", [("t5_tiger_tb", ("final_loss", "final_sft", "final_tb")),
                                             ("causal_lm_add_tb", ("final_loss", "final_ce"))])
def test_example_smoke(name, loss_keys, capsys, beauty_tiny):
    metrics = load_example(name).main(["--smoke", "--data", str(beauty_tiny)])
    for key in loss_keys:
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["recall@5"] <= metrics["recall@10"]
    assert metrics["eval_users"] == 8
    assert "test metrics:" in capsys.readouterr().out


def test_plain_ce_variant_runs(beauty_tiny):
    """--lambda-gfn 0 is the untouched plain-HF script (no augmented rows, CE only)."""
    metrics = load_example("causal_lm_add_tb").main(["--smoke", "--data", str(beauty_tiny), "--lambda-gfn", "0"])
    assert math.isfinite(metrics["final_ce"]) and metrics["final_loss"] == metrics["final_ce"]
