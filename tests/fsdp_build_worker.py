"""Builds FSDP trainers under ``torchrun`` and records how their weights were built, for
tests/test_fsdp.py::test_sharded_build_* (not a test file).

``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_build_worker.py SPEC.json``: SPEC is a list of
``{"args": [config overrides], "tied": bool, "result": path}``. For each, every rank builds the ``Trainer`` (no
training step) while watching the build: what ``build_on_rank0`` handed this rank, and whether every module had only
``meta`` parameters when ``fully_shard`` was applied to it. Rank 0 writes to ``result`` the consolidated weights and
buffers (``.pt``) and, beside it (``.json``), every rank's observations and its local shard sizes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed.fsdp

import gflowgr_core.train.trainer as trainer_module
from gflowgr_core.train.config import load_config
from gflowgr_core.train.trainer import Trainer


class TiedTrainer(Trainer):
    """A policy whose LM head shares the input embedding's weight (``tie_word_embeddings``)."""

    def _build_policy(self):
        policy = super()._build_policy()
        tie(policy)
        return policy


def tie(policy) -> None:
    """Make the policy's LM head use the input embedding's weight."""
    model = policy.model
    model.config.tie_word_embeddings = True
    model.get_output_embeddings().weight = model.get_input_embeddings().weight


def run(scenario: dict) -> None:
    seen = {"received_meta": None, "received_cpu": None, "shard_calls": 0, "shard_calls_on_meta": 0}
    build_on_rank0 = trainer_module.build_on_rank0
    fully_shard = torch.distributed.fsdp.fully_shard

    def watched_build(build, dist):
        policy, extra = build_on_rank0(build, dist)
        params = list(policy.parameters())
        seen["received_meta"] = all(p.is_meta for p in params)
        seen["received_cpu"] = all(p.device.type == "cpu" for p in params)
        return policy, extra

    def watched_shard(module, **kwargs):
        seen["shard_calls"] += 1
        seen["shard_calls_on_meta"] += all(p.is_meta for p in module.parameters())
        return fully_shard(module, **kwargs)

    # ShardedTraining imports fully_shard when it runs, so the module attribute is what it gets.
    trainer_module.build_on_rank0, torch.distributed.fsdp.fully_shard = watched_build, watched_shard
    try:
        cls = TiedTrainer if scenario.get("tied") else Trainer
        trainer = cls(load_config(None, scenario["args"]))
    finally:
        trainer_module.build_on_rank0, torch.distributed.fsdp.fully_shard = build_on_rank0, fully_shard
    from torch.distributed.tensor import DTensor

    policy = trainer.policy
    seen["shards"] = {name: [p.to_local().numel(), p.numel()] for name, p in policy.named_parameters()
                      if isinstance(p, DTensor)}
    seen["plain"] = [name for name, p in policy.named_parameters() if not isinstance(p, DTensor)]
    seen["tied"] = policy.model.get_output_embeddings().weight is policy.model.get_input_embeddings().weight
    with trainer.fsdp.consolidated() as plain:
        weights = {k: v.detach().clone() for k, v in plain.state_dict().items()}
        buffers = {k: v.clone() for k, v in plain.named_buffers()}
        seen["consolidated_tied"] = (plain.model.get_output_embeddings().weight
                                     is plain.model.get_input_embeddings().weight)
    everyone = trainer.dist.gather_objects(seen)
    if trainer.dist.is_main:
        result = Path(scenario["result"])
        torch.save({"weights": weights, "buffers": buffers}, result.with_suffix(".pt"))
        result.with_suffix(".json").write_text(json.dumps(everyone))
    trainer.dist.barrier()


def main() -> None:
    for scenario in json.loads(Path(sys.argv[1]).read_text()):
        run(scenario)
    # The scenarios' trainers are garbage in reference cycles that hold the group (see leave_process_group).
    from gflowgr_core.train.distributed import leave_process_group

    leave_process_group()


if __name__ == "__main__":
    main()
