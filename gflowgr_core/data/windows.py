"""Trunk windows: runs of training examples whose histories extend one another.

Leave-one-out writes a user's training examples in order, example ``t`` holding items ``v_0 .. v_{t-1}``
(the last ``max_history`` of them). While no truncation happens, each history is a prefix of the next one,
so the per-prefix prompts of the whole run are prefixes of one token sequence: a packed batch encodes that
sequence (the *trunk*) once and lets every example read its own prefix of it
(:mod:`gflowgr_core.model.packing`). A window is a maximal run of consecutive rows where every history is a
prefix of the next; the test is on the item ids themselves, so a window is exact whatever produced the rows
(a truncated history starts later than its predecessor and opens a window of its own).
"""
from __future__ import annotations

import torch

from .split import PAD_ITEM

__all__ = ["left_align", "trunk_windows", "window_order"]


def left_align(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(items[N, H], lengths[N])``: each row's real items moved to the front (``-1`` after them).

    Real items keep their order wherever the padding sat in the input row.
    """
    valid = history != PAD_ITEM
    lengths = valid.sum(1)
    # A stable sort on "is padding" moves real items to the front in their order.
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    return history.gather(1, order), lengths


def trunk_windows(history: torch.Tensor) -> torch.Tensor:
    """Window id ``LongTensor[N]`` of every row of ``history[N, H]`` (left-padded with ``-1``).

    Rows ``i`` and ``i + 1`` are in one window when row ``i``'s items are a prefix of row ``i + 1``'s;
    ids are consecutive from 0 in row order.
    """
    n = history.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    items, lengths = left_align(history)
    cols = torch.arange(items.shape[1])
    within = cols[None, :] < lengths[:-1, None]
    same = (items[:-1] == items[1:]) | ~within
    linked = same.all(1) & (lengths[1:] >= lengths[:-1])
    starts = torch.cat([torch.ones(1, dtype=torch.bool), ~linked])
    return starts.long().cumsum(0) - 1


def window_order(index: torch.Tensor, window: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An epoch's order of the examples ``index[N]``: windows in random order, each window's rows together
    and in row order, so consecutive batches cut from it share trunks."""
    index = torch.as_tensor(index, dtype=torch.long)
    win = window[index]
    present, inverse = torch.unique(win, return_inverse=True)
    rank = torch.empty(len(present), dtype=torch.long)
    rank[torch.randperm(len(present), generator=generator)] = torch.arange(len(present))
    key = rank[inverse] * (int(index.max()) + 1 if len(index) else 1) + index
    return index[torch.argsort(key)]
