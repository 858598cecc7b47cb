"""Data-parallel training: ``torchrun`` with 2 CPU processes (gloo) follows the single-process loss trajectory
at the same global batch and reaches the same evaluation metrics; plus the sharding/reduction arithmetic."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from gflowgr_core.data.prepared import prepare
from gflowgr_core.train.checkpoint import save_policy
from gflowgr_core.train.config import load_config
from gflowgr_core.train.distributed import DistContext
from gflowgr_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# Relative tolerance between the 1-process and 2-process logged values: the two runs differ only in the
# order of floating-point sums (per-rank partial means, gradient all-reduce).
RTOL = 1e-5

# 15 examples in global batches of 7: 7, 7, 1 rows per step. Ranks get 3 and 4 rows (so the per-rank losses
# must be weighted by their rows), and the last step of each epoch leaves rank 0 without rows (it joins the
# gradient reduction with a zero-weighted example).
RUN = ["stage=gflowgr", "device=cpu", "model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2",
       "model.intermediate=64", "model.flow_hidden=32", "batch_size=7", "max_train_examples=15", "epochs=2",
       "warmup_steps=2", "lr=3e-3", "log_every=1", "valid_max_users=9", "eval_beams=4", "eval_batch_size=64",
       "save_every_steps=0", "handle_signals=false", "cm.dim=16", "cm.num_blocks=1", "cm.max_epochs=1",
       "cm.progress=false", "cm.verbose=false", "gfn.sampler=cm_curriculum", "gfn.curriculum_pool=10",
       "gfn.curriculum_random=5", "gfn.n_aug=2", "gfn.objective=db"]


def test_shard_bounds_and_loss_scale_cover_the_global_batch():
    for world in (1, 2, 3, 4):
        for n in (1, 2, 7, 8, 17):
            ranks = [DistContext(rank=r, world_size=world) for r in range(world)]
            bounds = [c.shard_bounds(n) for c in ranks]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            # DDP averages the scaled per-rank means: the average must be the global mean.
            scales = [c.loss_scale(hi - lo, n) for c, (lo, hi) in zip(ranks, bounds)]
            assert math.isclose(sum(s * 1.0 for s in scales) / world, 1.0)


def test_single_process_context_is_the_identity():
    ctx = DistContext.from_env("cpu", "off")
    assert not ctx.enabled and ctx.is_main and ctx.shard_bounds(5) == (0, 5)
    x = torch.arange(6).view(3, 2)
    assert ctx.gather_rows(x) is x
    logs = {"loss": 1.5, "backend": "torch"}
    assert ctx.reduce_logs(logs, 3) == logs and ctx.any_flag(True) and not ctx.any_flag(False)


def _log_records(out: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [{k: v for k, v in r["eval"].items() if k != "epoch_seconds"} for r in records if "eval" in r]
    return steps, evals


def test_torchrun_two_processes_match_one_process(tmp_path, beauty_tiny):
    data_dir = tmp_path / "data"
    prepared = prepare("letter", beauty_tiny, data_dir, max_users=16)
    # A starting checkpoint for stage gflowgr: the freshly initialised policy.
    init = Trainer(load_config(None, [f"data={data_dir}", f"out={tmp_path / 'init'}", "stage=sft", *RUN[1:]]),
                   prepared)
    save_policy(init.policy, tmp_path / "init_policy")
    args = [f"data={data_dir}", f"init_checkpoint={tmp_path / 'init_policy'}", *RUN]

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gflowgr_core.cli", "train", "--json", *args, f"out={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp_result = json.loads(proc.stdout)  # printed once, by rank 0
    assert ddp_result["world_size"] == 2 and ddp_result["status"] == "finished"

    one = Trainer(load_config(None, [*args, f"out={tmp_path / 'one'}"]), prepared)
    assert not one.dist.enabled
    one_result = one.fit()

    ddp_steps, ddp_evals = _log_records(tmp_path / "ddp")
    one_steps, one_evals = _log_records(tmp_path / "one")
    assert [r["step"] for r in ddp_steps] == [r["step"] for r in one_steps] == list(range(1, 7))
    for a, b in zip(ddp_steps, one_steps):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, rel_tol=RTOL, abs_tol=1e-7), (a["step"], key, a[key], value)
    assert len(ddp_evals) == len(one_evals) == 2
    for a, b in zip(ddp_evals, one_evals):
        assert a["valid"] == b["valid"]
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=RTOL)
    assert ddp_result["test"] == one_result["test"]
    assert ddp_result["best_epoch"] == one_result["best_epoch"]
    # Rank 0 alone wrote the checkpoints and the log (one record per step, not one per rank).
    assert (tmp_path / "ddp" / "best").is_dir() and (tmp_path / "ddp" / "last").is_dir()


def test_close_frees_the_ddp_wrapper_before_leaving_the_group(tmp_path, beauty_tiny, monkeypatch):
    """The DDP wrapper reaches the trainer back through its loss module (a reference cycle): left to Python's
    final collection, it keeps the gloo group alive into interpreter shutdown, where a rank can abort after a
    finished run. ``close()`` must free it, and leave the group, while the trainer is still referenced."""
    import gc

    import torch.distributed as dist

    from gflowgr_core.train import trainer as trainer_module

    data_dir = tmp_path / "data"
    prepared = prepare("letter", beauty_tiny, data_dir, max_users=16)
    # A one-rank gloo group standing in for torchrun, with DDP forced on so that the wrapper is built.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ctx = DistContext(rank=0, world_size=1, enabled=True, backend="gloo", strategy="ddp")
        monkeypatch.setattr(trainer_module.DistContext, "from_env", classmethod(lambda cls, *a, **k: ctx))
        config = load_config(None, [f"data={data_dir}", f"out={tmp_path / 'run'}", "stage=sft",
                                    "evaluate_test=false", *RUN[1:]])
        trainer = Trainer(config, prepared)
        assert trainer.fit()["status"] == "finished"
        wrappers = [o for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel)]
        assert wrappers, "the run did not train through DDP: the test checks nothing"
        del wrappers
        trainer.close()
        assert not dist.is_initialized()
        assert not [o for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel)]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
