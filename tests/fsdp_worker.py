"""Runs training scenarios under ``torchrun`` with ``distributed=fsdp`` for tests/test_fsdp.py (not a test file).

``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py SPEC.json``: SPEC is a list of
scenarios ``{"args": [config overrides], "lora": bool, "stop_at": step or null, "resume": bool}``, run one after
the other in the same process group; each writes its usual ``out`` folder (log, best/, last/, result.json).
A scenario may also be ``{"expect_error": "...", ...}``: the trainer must raise an exception whose message
contains that text, and rank 0 writes the message to ``<out>/error.txt``.
A scenario with ``"probe": path`` also has rank 0 write to that JSON file what the sharding set up and what the
training forwards saw (:func:`probe`): each FSDP unit's mixed-precision policy, the dtypes of the master (sharded)
parameters and of the parameters inside the forward.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

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


def probe(trainer: Trainer) -> Callable[[], dict]:
    """Record, from now on, the dtype of the weights the sharded forwards compute with: a forward pre-hook on the
    first ``nn.Linear`` of every decoder layer (a layer unit) and on the input embedding (the root unit) reads the
    weight FSDP has gathered (and cast by its ``MixedPrecisionPolicy``) for that forward. Returns a function
    that gives the report: ``units`` (module class, ``param_dtype``, ``reduce_dtype`` of every FSDP module),
    ``master_dtypes`` (the sharded parameters' dtypes), ``compute_dtypes`` (``{"layer": [...], "root": [...]}``,
    the dtypes seen in training forwards) and ``world_size``."""
    from torch import nn
    from torch.distributed.fsdp import FSDPModule

    fsdp = trainer.fsdp
    assert fsdp is not None, "probe needs distributed=fsdp"
    seen: dict[str, set] = {"layer": set(), "root": set()}

    def hook(kind: str, module: nn.Module):
        def pre(mod, args):
            seen[kind].add(str(mod.weight.dtype))
        module.register_forward_pre_hook(pre)

    # The decoder layers are the FSDP units inside the policy (fully_shard renamed their classes: FSDP<Class>).
    layers = [m for m in fsdp.policy.model.modules() if isinstance(m, FSDPModule)]
    assert len(layers) == fsdp.num_units - 1, (len(layers), fsdp.num_units)
    for layer in layers:
        hook("layer", next(m for m in layer.modules() if isinstance(m, nn.Linear)))
    hook("root", fsdp.policy.model.get_input_embeddings())

    def report() -> dict:
        units = []
        for m in fsdp.root.modules():
            if isinstance(m, FSDPModule):
                mp = m._get_fsdp_state()._mp_policy  # private (no public accessor in torch 2.13)
                units.append({"module": type(m).__name__, "param_dtype": str(mp.param_dtype),
                              "reduce_dtype": str(mp.reduce_dtype)})
        return {"units": units, "world_size": trainer.dist.world_size,
                "master_dtypes": sorted({str(p.dtype) for p in fsdp.root.parameters()}),
                "compute_dtypes": {k: sorted(v) for k, v in seen.items()}}
    return report


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
    report = probe(trainer) if scenario.get("probe") else None
    if scenario.get("stop_at"):
        stop_at(trainer, int(scenario["stop_at"]))
    summary = trainer.fit()
    if scenario.get("resume"):
        assert summary["status"] == "interrupted", summary
        trainer = cls(load_config(None, [*args, "resume=true"]))
        summary = trainer.fit()
    assert summary["status"] == "finished", summary
    if report is not None and load_rank() == 0:
        Path(scenario["probe"]).write_text(json.dumps(report()))


def load_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def main() -> None:
    for scenario in json.loads(Path(sys.argv[1]).read_text()):
        run(scenario)
    # The scenarios' trainers are garbage in reference cycles that hold the group (see leave_process_group).
    from gflowgr_core.train.distributed import leave_process_group

    leave_process_group()


if __name__ == "__main__":
    main()
