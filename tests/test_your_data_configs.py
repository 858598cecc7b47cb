"""configs/your_data/: the starting configs for a user's own data load with `gflowgr train --print-config`,
and chain (stage 2 starts from the SFT run's best checkpoint, with the model it trained)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gflowgr_core.cli import main

FOLDER = Path(__file__).resolve().parents[1] / "configs" / "your_data"
STAGES = {"sft": "sft", "sft_continue": "sft_continue", "gflowgr_tb": "gflowgr"}


def printed(name: str, capsys, *overrides: str) -> dict:
    assert main(["train", "--config", str(FOLDER / f"{name}.yaml"), "--print-config", *overrides]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", list(STAGES))
def test_your_data_config_prints(name, capsys):
    cfg = printed(name, capsys)
    assert cfg["stage"] == STAGES[name]
    assert cfg["data"] == "runs/data/your_data"
    assert cfg["out"] == f"runs/your_data/{name}/seed42"


def test_your_data_stages_chain(capsys):
    sft, tb, cont = (printed(n, capsys) for n in ("sft", "gflowgr_tb", "sft_continue"))
    for stage2 in (tb, cont):
        assert stage2["init_checkpoint"] == f"{sft['out']}/best"
        assert stage2["model"] == sft["model"]
    shared = ("epochs", "max_steps", "batch_size", "lr", "warmup_steps", "eval_every", "patience", "valid_max_users",
              "likelihood_support", "select_metric")
    assert {k: tb[k] for k in shared} == {k: cont[k] for k in shared}, "the control gets GFlowGR's budget"


def test_your_data_config_takes_overrides(capsys):
    cfg = printed("sft", capsys, "data=runs/data/clicks", "out=runs/clicks/sft")
    assert (cfg["data"], cfg["out"]) == ("runs/data/clicks", "runs/clicks/sft")
