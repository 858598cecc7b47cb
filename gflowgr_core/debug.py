"""Opt-in checks of the inputs to the hot-path ops, and the out-of-memory hint of training steps.

The decoding step and the GFlowNet loss take trie node ids and flows straight from the caller. Checking
them costs a host synchronisation, which the decode loop must not pay, so the checks run only in debug
mode: set ``GFLOWGR_DEBUG=1`` in the environment, call ``set_debug(True)``, or use ``with debug_mode():``.
When debug mode is off each op pays one Python boolean test.

In debug mode:

* :func:`gflowgr_core.decoding.step.constrained_step` checks that every row's node is ``-1`` (dead row)
  or a node of the decision level (``IndexError`` naming the row, the node id and the valid range), which
  the compiled and Triton kernels would otherwise read out of bounds;
* :func:`gflowgr_core.objectives.gfn_loss.gfn_loss` checks that ``log_r``, ``log_z``, ``log_f`` and
  ``weights`` are finite (``FloatingPointError`` naming the tensor and rows) instead of returning a NaN loss.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

__all__ = ["enabled", "set_debug", "debug_mode", "check_trie_nodes", "check_finite", "oom_hint",
           "oom_message"]

_enabled = os.environ.get("GFLOWGR_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def enabled() -> bool:
    """Whether debug checks run (``GFLOWGR_DEBUG=1`` at import, or :func:`set_debug`)."""
    return _enabled


def set_debug(flag: bool = True) -> bool:
    """Turn debug checks on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@contextlib.contextmanager
def debug_mode(flag: bool = True) -> Iterator[None]:
    """``with debug_mode():`` runs the block with debug checks on (or off), restoring the setting after."""
    previous = set_debug(flag)
    try:
        yield
    finally:
        set_debug(previous)


def _rows(mask: torch.Tensor, limit: int = 5) -> list:
    return [tuple(int(i) for i in idx) if idx.numel() > 1 else int(idx) for idx in mask.nonzero()[:limit]]


def check_trie_nodes(nodes: torch.Tensor, trie, level: int, where: str) -> None:
    """Every entry of ``nodes`` must be ``-1`` or a node of trie level ``level``.

    Raises:
        IndexError naming ``where``, the first bad rows, their node ids and the level's id range.
    """
    lo, hi = int(trie.level_offsets[level]), int(trie.level_offsets[level + 1])
    bad = (nodes != -1) & ((nodes < lo) | (nodes >= hi))
    if bool(bad.any()):
        rows = _rows(bad)
        values = nodes[bad][:5].tolist()
        raise IndexError(f"{where}: trie node id(s) {values} at row(s) {rows} are not nodes of level {level}: "
                         f"expected -1 (dead row) or an id in [{lo}, {hi}) (the trie has {trie.num_nodes} nodes)")


def check_finite(name: str, tensor: Optional[torch.Tensor], where: str) -> None:
    """Raise ``FloatingPointError`` naming ``where``, ``name`` and the rows holding NaN or inf."""
    if tensor is None:
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        rows = _rows(bad)
        values = tensor[bad][:5].tolist()
        raise FloatingPointError(f"{where}: {name} is not finite at row(s) {rows} (values {values})")


def oom_message(batch_size: int, where: str, knob: str = "batch_size", trajectories: Optional[int] = None) -> str:
    """The advice attached to an out-of-memory error of a step over ``batch_size`` examples."""
    smaller = max(1, batch_size // 2)
    traj = f" ({trajectories} trajectories per example)" if trajectories else ""
    if batch_size <= 1:
        return (f"{where}: out of memory at batch size 1{traj}: the model does not fit; use a smaller model, "
                f"bfloat16, LoRA, fewer augmented trajectories, or a GPU with more memory")
    return (f"{where}: out of memory at batch size {batch_size}{traj}; try {knob}={smaller} (with gradient "
            f"accumulation x{-(-batch_size // smaller)} to keep the effective batch)")


@contextlib.contextmanager
def oom_hint(batch_size: int, where: str, knob: str = "batch_size",
             trajectories: Optional[int] = None) -> Iterator[None]:
    """Re-raise ``torch.OutOfMemoryError`` inside the block with the batch size to try next.

    The new error is a ``torch.OutOfMemoryError`` too (callers that catch it keep working), chained to
    the original one, which keeps the allocator's report.
    """
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise torch.OutOfMemoryError(f"{oom_message(batch_size, where, knob, trajectories)}\n{exc}") from exc
