"""Runs training scenarios under ``torchrun`` with ``distributed=fsdp`` for tests/test_fsdp.py (not a test file).

``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py SPEC.json``: SPEC is a list of
scenarios ``{"args": [config overrides], "lora": bool, "stop_at": step or null, "resume": bool}``, run one after
the other in the same process group; each writes its usual ``out`` folder (log, best/, last/, result.json).
A scenario may also be ``{"expect_error": "...", ...}``: the trainer must raise an exception whose message
contains that text, and rank 0 writes the message to ``<out>/error.txt``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from gflowgr_core.pretrained import LoraSettings, apply_lora
from gflowgr_core.train.config import load_config
from gflowgr_core.train.trainer import Trainer

LORA = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))


class LoraTrainer(Trainer):
    """The library trainer on a policy with PEFT LoRA adapters (and trainable SID token rows)."""

    def _build_policy(self):
        return apply_lora(super()._build_policy(), LORA)


class NoLayerClassTrainer(Trainer):
    """A model that names no decoder layer class for FSDP to wrap."""

    def _build_policy(self):
        policy = super()._build_policy()
        policy.model._no_split_modules = []
        return policy


def stop_at(trainer: Trainer, step: int) -> Trainer:
    """Raise the stop flag once optimisation step ``step`` has run (as a SIGTERM handler would)."""
    original = trainer.train_step

    def train_step(index):
        logs = original(index)
        if trainer.step == step:
            trainer.request_stop("test stop")
        return logs
    trainer.train_step = train_step
    return trainer


def run(scenario: dict) -> None:
    cls = LoraTrainer if scenario.get("lora") else Trainer
    if scenario.get("no_layer_class"):
        cls = NoLayerClassTrainer
    args = list(scenario["args"])
    if scenario.get("expect_error"):
        try:
            cls(load_config(None, args))
        except Exception as exc:  # noqa: BLE001 - the test checks the message
            out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("out=")))
            out.mkdir(parents=True, exist_ok=True)
            (out / f"error{load_rank()}.txt").write_text(f"{type(exc).__name__}: {exc}")
            return
        raise AssertionError(f"expected an error containing {scenario['expect_error']!r}")
    trainer = cls(load_config(None, args))
    if scenario.get("stop_at"):
        stop_at(trainer, int(scenario["stop_at"]))
    summary = trainer.fit()
    if scenario.get("resume"):
        assert summary["status"] == "interrupted", summary
        trainer = cls(load_config(None, [*args, "resume=true"]))
        summary = trainer.fit()
    assert summary["status"] == "finished", summary


def load_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def main() -> None:
    for scenario in json.loads(Path(sys.argv[1]).read_text()):
        run(scenario)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
