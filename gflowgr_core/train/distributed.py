"""Data-parallel training support: process-group setup under ``torchrun``, global-batch sharding, reductions.

A run launched by ``torchrun --nproc_per_node=N`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) trains with :class:`torch.nn.parallel.DistributedDataParallel`: NCCL when
each rank has a GPU, gloo on CPU. ``TrainConfig.batch_size`` stays the *global* batch; every rank takes a
contiguous block of its rows (:meth:`DistContext.shard_bounds`) and scales its loss by
``rows_on_rank * world_size / global_rows`` (:meth:`DistContext.loss_scale`), so DDP's gradient average equals
the gradient of the global-batch mean loss — the same loss trajectory as one process at that batch size.

With ``distributed="fsdp"`` the same launch shards the model instead of replicating it
(:mod:`gflowgr_core.train.fsdp`: ``fully_shard`` on every decoder layer and on the loss module around the
policy); the batch sharding and loss scaling above are unchanged, since FSDP2's reduce-scatter averages the
gradients over the ranks as DDP's all-reduce does.

Without ``torchrun`` (or with ``distributed="off"``) :meth:`DistContext.single` gives a context whose
collectives are no-ops, so the trainer has one code path.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from gflowgr_core.devices import resolve_device

log = logging.getLogger("gflowgr")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

MODES = ("auto", "off", "fsdp")


class DistributedError(RuntimeError):
    """A distributed launch that cannot work as configured (missing variables, unusable device)."""


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` (or an equivalent) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistContext:
    """This process's place in a data-parallel run.

    Attributes:
        rank: global rank ``0..world_size-1``.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the device this rank trains on.
        enabled: whether a process group is in use (``world_size > 1``, or FSDP under ``torchrun`` with one
            process).
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when not distributed.
        strategy: ``"ddp"`` (replicated model), ``"fsdp"`` (sharded model) or ``None`` when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False
    backend: Optional[str] = None
    strategy: Optional[str] = None

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def single(cls, device: torch.device) -> "DistContext":
        """One process: every collective is the identity."""
        return cls(device=torch.device(device))

    @classmethod
    def from_env(cls, device: str = "auto", mode: str = "auto", timeout_s: float = 1800.0) -> "DistContext":
        """Join (or reuse) the process group described by the ``torchrun`` environment.

        Args:
            device: the run's ``TrainConfig.device``. ``"auto"``/``"cuda"`` use GPU ``LOCAL_RANK`` when CUDA is
                available (NCCL); ``"cpu"`` (or no CUDA) uses gloo. An explicit ``"cuda:K"`` is rejected under
                more than one rank, since every rank would pick the same GPU.
            mode: ``"auto"`` (DDP when ``WORLD_SIZE > 1``), ``"fsdp"`` (FSDP2; needs ``torchrun``, which may
                start a single process: ``--nproc_per_node=1`` runs the sharded code path on one device, e.g. to
                check FSDP's mixed precision on one GPU) or ``"off"`` (always one process).
            timeout_s: collective timeout.
        """
        if mode not in MODES:
            raise DistributedError(f"distributed={mode!r} is not one of {MODES}")
        # torchrun sets WORLD_SIZE even for one process; FSDP then runs on a 1-rank process group.
        fsdp_launch = mode == "fsdp" and "WORLD_SIZE" in os.environ
        if mode == "fsdp" and not fsdp_launch:
            raise DistributedError(
                f"distributed: fsdp shards the model over the processes torchrun starts, but this process was "
                f"not started by torchrun (WORLD_SIZE is unset): launch with `torchrun --nproc_per_node=N -m "
                f"gflowgr_core.cli train ...`, or set distributed: off (or auto) to train in one process")
        if mode == "off" or not (launched_distributed() or fsdp_launch):
            return cls.single(resolve_device(device))
        missing = [k for k in _ENV if k not in os.environ and not dist.is_initialized()]
        if missing:
            raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: launch "
                                   f"with torchrun --nproc_per_node=N, which sets them")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if device.startswith("cuda:"):
            raise DistributedError(f"device={device!r} under {world} ranks: use device=cuda (rank r takes GPU "
                                   f"LOCAL_RANK) or device=cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise DistributedError("device=cuda but CUDA is not available on this node")
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are "
                                       f"visible: use --nproc_per_node <= the GPU count")
            torch.cuda.set_device(local_rank)
            dev, backend = torch.device("cuda", local_rank), "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        else:
            backend = dist.get_backend()
            rank, world = dist.get_rank(), dist.get_world_size()
        # A 1-rank FSDP run uses its process group too (FSDP's collectives run on it, trivially).
        return cls(rank=rank, world_size=world, local_rank=local_rank, device=dev, enabled=world > 1 or mode == "fsdp",
                   backend=backend, strategy="fsdp" if mode == "fsdp" else "ddp")

    # --------------------------------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and shared caches."""
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of an ``n``-row global batch that this rank processes (contiguous blocks)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def loss_scale(self, n_local: int, n_global: int) -> float:
        """Factor on this rank's mean loss so that DDP's gradient average is the global-batch mean gradient."""
        return n_local * self.world_size / n_global

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (e.g. a stop signal seen by one process)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def reduce_logs(self, logs: dict[str, Any], n_local: int) -> dict[str, Any]:
        """Combine every rank's logged values into those one process would log for the global batch.

        Each rank logs statistics of its own rows; means (and ``clamped_frac``) are averaged with the rows as
        weights, ``/min`` and ``/max`` reduced by min and max, and ``/std`` pooled from the per-rank means and
        standard deviations (population formula, as :func:`gflowgr_core.reward.summary` reports). Non-numeric
        values (e.g. the loss backend's name) are taken from this rank.
        """
        if not self.enabled:
            return logs
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        dev = self._comm_device()
        w = float(n_local)
        vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        # Row-weighted sums of every value and of the second moments behind each std, then the weights.
        second = torch.tensor([w * (logs[k.replace("/std", "/mean")] ** 2 + logs[k] ** 2)
                               if k.endswith("/std") and k.replace("/std", "/mean") in logs else 0.0
                               for k in keys], dtype=torch.float64)
        summed = torch.cat([w * vals, second, torch.tensor([w], dtype=torch.float64)]).to(dev)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        # A rank without rows contributes nothing to min/max: give it the neutral element.
        lo = torch.where(torch.tensor(w > 0), vals, torch.full_like(vals, float("inf"))).to(dev)
        hi = torch.where(torch.tensor(w > 0), vals, torch.full_like(vals, float("-inf"))).to(dev)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        summed, lo, hi = summed.cpu(), lo.cpu(), hi.cpu()
        n = len(keys)
        total = float(summed[-1])
        out = dict(logs)
        for i, k in enumerate(keys):
            if k.endswith("/min"):
                out[k] = float(lo[i])
            elif k.endswith("/max"):
                out[k] = float(hi[i])
            elif k.endswith("/std") and k.replace("/std", "/mean") in logs:
                mean = float(summed[keys.index(k.replace("/std", "/mean"))]) / total
                out[k] = max(0.0, float(summed[n + i]) / total - mean ** 2) ** 0.5
            else:
                out[k] = float(summed[i]) / total
        return out

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x[n_r, ...]`` along dim 0 in rank order (``n_r`` may differ)."""
        if not self.enabled:
            return x
        dev = self._comm_device()
        n = torch.tensor([x.shape[0]], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(s.item()) for s in sizes]
        biggest = max(sizes)
        padded = torch.zeros((biggest, *x.shape[1:]), dtype=x.dtype, device=dev)
        padded[:x.shape[0]] = x.to(dev)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)

    def gather_objects(self, obj: Any) -> list:
        """Every rank's picklable ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shutdown(self) -> None:
        """Leave the process group (call once, at the end of the run)."""
        if self.enabled:
            leave_process_group()


def leave_process_group() -> None:
    """Destroy the default process group, if there is one, after a garbage collection.

    Objects in reference cycles (a DDP or FSDP wrapper that reaches its trainer through the loss module, a Hugging
    Face Trainer and its callbacks) keep the group and its last collectives alive until Python's final garbage
    collection. Destroyed there, gloo's worker threads die while the interpreter is finalising and the process
    aborts ("terminate called without an active exception", exit -6) after a successful run. Call this at the end
    of any script that trained in a process group, on every rank.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
