"""Ranking and exposure metrics over a whole evaluation split, vectorised in torch.

Inputs shared by every function:

- ``ranked``: ``LongTensor[N, K']``, one ranked recommendation list per example, best first, holding
  internal item indices ``0..n_items-1``; ``-1`` marks an empty slot (e.g. a beam that found fewer items).
  Empty slots are skipped: the *rank* of a recommendation is the number of recommendations before it.
- ``target``: ``LongTensor[N]``, the one held-out item per example (binary relevance, one relevant item).

Accuracy (per example, then averaged over the N examples):

- ``Recall@K`` (= HitRate@K with one target): 1 when the target is among the first K recommendations.
- ``NDCG@K``: ``1 / log2(rank + 2)`` when the target sits at 0-based ``rank < K``, else 0 (the ideal DCG
  of a single relevant item is 1).
- SID-match variants (for catalogues whose items may *share* a semantic ID): pass ``item_key[n_items]``
  (e.g. ``Trie.item_leaf``). A recommendation is a hit when its key equals the target's key. The ranked
  list is first mapped to keys and repeated keys are removed keeping their first occurrence, so the
  ranking is over distinct keys and K counts distinct keys: several items of one SID count once.

Exposure (over all recommended slots of the split, using the first K recommendations of each list):

- ``coverage@K``: distinct recommended items / n_items.
- ``tail_share@K``: share of recommended slots whose item is long-tail (see :func:`long_tail_mask`).
- ``mean_pop@K``: mean training popularity (interaction count) of the recommended slots' items.

Within one item list an item may appear only once (a repeated item is a ranking bug and raises).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "hit_rank",
    "recall_at_k",
    "ndcg_at_k",
    "sid_recall_at_k",
    "sid_ndcg_at_k",
    "coverage_at_k",
    "tail_share_at_k",
    "mean_popularity_at_k",
    "long_tail_mask",
    "item_popularity",
    "evaluate_rankings",
]

_NO_KEY = torch.iinfo(torch.int64).min



# What every evaluation reports (gflowgr_core.evaluation): the cut-offs, the two scorings of a SID as (key prefix,
# renormalised over trie children), headline first, and the key of their top-20 agreement.
EVAL_KS = (5, 10, 20)
SCORINGS = (("", False), ("renorm/", True))
AGREEMENT_KEY = f"scoring_agreement@{max(EVAL_KS)}"

def _check_ranked(ranked: Tensor, num_items: Optional[int]) -> None:
    if ranked.dim() != 2:
        raise ValueError(f"ranked must be a 2-D LongTensor [N, K'], got shape {tuple(ranked.shape)}")
    if ranked.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ranked must hold integer item indices, got dtype {ranked.dtype}")
    if ranked.shape[0] == 0:
        raise ValueError("ranked has no rows: there is nothing to evaluate")
    if ranked.numel() == 0:
        return
    low = int(ranked.min())
    if low < -1:
        row = int((ranked < -1).any(1).nonzero()[0])
        raise ValueError(f"ranked row {row} holds {low}: items must be >= 0, or -1 for an empty slot")
    if num_items is not None:
        high = int(ranked.max())
        if high >= num_items:
            row = int((ranked >= num_items).any(1).nonzero()[0])
            raise ValueError(f"ranked row {row} holds item {high} but the catalogue has {num_items} items")


def _check_target(target: Tensor, n_rows: int, num_items: Optional[int]) -> None:
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(f"target must be a 1-D tensor of {n_rows} items (one per ranked row), "
                         f"got shape {tuple(target.shape)}")
    bad = target < 0
    if num_items is not None:
        bad = bad | (target >= num_items)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        limit = f"[0, {num_items})" if num_items is not None else ">= 0"
        raise ValueError(f"target row {row} is {int(target[row])}: each target must be an item in {limit}")


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")


def _distinct_keys(ranked: Tensor, item_key: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Map slots to keys and mark the slots that count as recommendations.

    Returns ``keys[N, K']`` (item index, or ``item_key`` of it; a sentinel in empty slots) and
    ``keep[N, K']`` (True for a non-empty slot whose key has not appeared earlier in its row).
    Without ``item_key`` a repeated item raises instead of being dropped.
    """
    valid = ranked >= 0
    if item_key is None:
        keys = ranked
    else:
        if item_key.dim() != 1:
            raise ValueError(f"item_key must be 1-D [n_items], got shape {tuple(item_key.shape)}")
        item_key = item_key.to(device=ranked.device, dtype=torch.int64)
        keys = item_key[ranked.clamp(min=0)]
    keys = torch.where(valid, keys.to(torch.int64), torch.full_like(keys, _NO_KEY, dtype=torch.int64))
    if keys.shape[1] <= 1:
        return keys, valid
    # A stable sort keeps equal keys in list order, so within each run of equal keys the first element
    # of the run is the first occurrence in the original list.
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(sorted_keys, dtype=torch.bool)
    repeat_sorted[:, 1:] = (sorted_keys[:, 1:] == sorted_keys[:, :-1]) & (sorted_keys[:, 1:] != _NO_KEY)
    repeat = torch.zeros_like(repeat_sorted).scatter_(1, order, repeat_sorted)
    if item_key is None and bool(repeat.any()):
        row = int(repeat.any(1).nonzero()[0])
        col = int(repeat[row].nonzero()[0])
        raise ValueError(f"ranked row {row} recommends item {int(ranked[row, col])} more than once "
                         f"(again at slot {col}); each item may appear once per list")
    return keys, valid & ~repeat


def _slots_before(keep: Tensor) -> Tensor:
    """``[N, K']``: how many counted recommendations precede each slot (its 0-based rank if counted)."""
    keep_l = keep.to(torch.int64)
    return keep_l.cumsum(1) - keep_l


def hit_rank(ranked: Tensor, target: Tensor, item_key: Optional[Tensor] = None) -> Tensor:
    """0-based rank of each example's target among its recommendations, ``-1`` when absent.

    Args:
        ranked: ``LongTensor[N, K']`` ranked items, ``-1`` = empty slot.
        target: ``LongTensor[N]`` held-out items.
        item_key: optional ``Tensor[n_items]``; when given, ranks are over distinct keys and a hit is a
            recommendation whose key equals ``item_key[target]``.

    Returns:
        ``LongTensor[N]`` on ``ranked``'s device.
    """
    num_items = None if item_key is None else int(item_key.shape[0])
    _check_ranked(ranked, num_items)
    target = target.to(ranked.device)
    _check_target(target, ranked.shape[0], num_items)
    keys, keep = _distinct_keys(ranked, item_key)
    if ranked.shape[1] == 0:
        return torch.full((ranked.shape[0],), -1, dtype=torch.int64, device=ranked.device)
    target_key = target.to(torch.int64) if item_key is None else \
        item_key.to(device=ranked.device, dtype=torch.int64)[target]
    match = keep & (keys == target_key[:, None])
    found = match.any(1)
    first = match.to(torch.int8).argmax(1, keepdim=True)
    rank = _slots_before(keep).gather(1, first).squeeze(1)
    return torch.where(found, rank, torch.full_like(rank, -1))


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _recall_from_rank(rank: Tensor, k: int) -> Tensor:
    return ((rank >= 0) & (rank < k)).to(torch.float32)


def _ndcg_from_rank(rank: Tensor, k: int) -> Tensor:
    hit = (rank >= 0) & (rank < k)
    gain = 1.0 / torch.log2(rank.clamp(min=0).to(torch.float32) + 2.0)
    return torch.where(hit, gain, torch.zeros_like(gain))


def recall_at_k(ranked: Tensor, target: Tensor, k: int, item_key: Optional[Tensor] = None,
                reduction: str = "mean") -> Tensor:
    """Recall@K with one target per example (equals HitRate@K).

    Args:
        ranked: ``LongTensor[N, K']``; target: ``LongTensor[N]``; k: cut-off.
        item_key: optional ``Tensor[n_items]`` for the SID-match variant (see module docstring).
        reduction: ``"mean"`` -> 0-dim float tensor; ``"none"`` -> ``FloatTensor[N]`` of 0/1.
    """
    _check_k(k)
    return _reduce(_recall_from_rank(hit_rank(ranked, target, item_key), k), reduction)


def ndcg_at_k(ranked: Tensor, target: Tensor, k: int, item_key: Optional[Tensor] = None,
              reduction: str = "mean") -> Tensor:
    """NDCG@K with binary relevance and one target: ``1/log2(rank+2)`` for a hit at 0-based rank < K.

    Args and return as :func:`recall_at_k` (``"none"`` gives ``FloatTensor[N]``).
    """
    _check_k(k)
    return _reduce(_ndcg_from_rank(hit_rank(ranked, target, item_key), k), reduction)


def sid_recall_at_k(ranked: Tensor, target: Tensor, item_key: Tensor, k: int,
                    reduction: str = "mean") -> Tensor:
    """Recall@K where a hit is any item sharing the target's key (SID); ranks over distinct keys."""
    return recall_at_k(ranked, target, k, item_key=item_key, reduction=reduction)


def sid_ndcg_at_k(ranked: Tensor, target: Tensor, item_key: Tensor, k: int,
                  reduction: str = "mean") -> Tensor:
    """NDCG@K where a hit is any item sharing the target's key (SID); ranks over distinct keys."""
    return ndcg_at_k(ranked, target, k, item_key=item_key, reduction=reduction)


def _top_k_items(ranked: Tensor, k: int, num_items: int) -> Tensor:
    """1-D tensor of the items in the first K recommendations of every list (one entry per slot)."""
    _check_k(k)
    _check_ranked(ranked, num_items)
    _, keep = _distinct_keys(ranked, None)
    in_top = keep & (_slots_before(keep) < k)
    items = ranked[in_top]
    if items.numel() == 0:
        raise ValueError(f"no recommended items in the top-{k} lists: every slot of ranked is empty (-1)")
    return items


def coverage_at_k(ranked: Tensor, k: int, num_items: int) -> float:
    """Distinct items over all top-K lists divided by ``num_items`` (catalogue coverage)."""
    if num_items <= 0:
        raise ValueError(f"num_items must be positive, got {num_items}")
    items = _top_k_items(ranked, k, num_items)
    seen = torch.zeros(num_items, dtype=torch.bool, device=items.device)
    seen[items] = True
    return float(seen.sum()) / num_items


def long_tail_mask(popularity: Tensor, head_fraction: float = 0.2, head_by: str = "items") -> Tensor:
    """``BoolTensor[n_items]``: True for long-tail items, False for the popular head.

    Items are ordered by decreasing ``popularity`` (ties broken by lower item index first, so the split
    is deterministic). The head is the shortest prefix of that order that covers ``head_fraction`` of

    - ``head_by="items"`` (default): the items, i.e. the ``ceil(head_fraction * n_items)`` most popular
      items (the 20/80 "short head" by item count);
    - ``head_by="interactions"``: the interactions, i.e. the most popular items whose counts sum to at
      least ``head_fraction`` of all interactions.

    Everything else, including never-seen items, is long-tail.
    """
    if popularity.dim() != 1 or popularity.numel() == 0:
        raise ValueError(f"popularity must be a non-empty 1-D tensor [n_items], got {tuple(popularity.shape)}")
    if not 0.0 <= head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in [0, 1], got {head_fraction}")
    n_items = popularity.numel()
    pop = popularity.to(torch.float64)
    if bool((pop < 0).any()) or not bool(torch.isfinite(pop).all()):
        raise ValueError("popularity must hold finite non-negative counts")
    order = torch.sort(-pop, stable=True).indices
    if head_by == "items":
        # round() first so that e.g. 0.2 * 15 = 3.0000000000000004 gives 3 items, not 4.
        n_head = math.ceil(round(head_fraction * n_items, 9))
    elif head_by == "interactions":
        total = float(pop.sum())
        if total <= 0:
            raise ValueError("head_by='interactions' needs some interactions, but popularity sums to 0")
        cum = pop[order].cumsum(0)
        need = torch.tensor([round(head_fraction * total, 9)], dtype=torch.float64, device=pop.device)
        n_head = 0 if head_fraction == 0 else int(torch.searchsorted(cum, need)) + 1
    else:
        raise ValueError(f"head_by must be 'items' or 'interactions', got {head_by!r}")
    n_head = min(n_head, n_items)
    tail = torch.ones(n_items, dtype=torch.bool, device=popularity.device)
    tail[order[:n_head]] = False
    return tail


def tail_share_at_k(ranked: Tensor, k: int, popularity: Tensor, head_fraction: float = 0.2,
                    head_by: str = "items") -> float:
    """Share of recommended top-K slots (over the whole split) whose item is long-tail.

    ``popularity[n_items]`` are training interaction counts (see :func:`item_popularity`);
    ``head_fraction`` and ``head_by`` define the head as in :func:`long_tail_mask`.
    """
    tail = long_tail_mask(popularity, head_fraction, head_by).to(ranked.device)
    items = _top_k_items(ranked, k, popularity.numel())
    return float(tail[items].to(torch.float64).mean())


def mean_popularity_at_k(ranked: Tensor, k: int, popularity: Tensor) -> float:
    """Mean ``popularity`` of the items in all recommended top-K slots of the split."""
    items = _top_k_items(ranked, k, popularity.numel())
    return float(popularity.to(device=ranked.device, dtype=torch.float64)[items].mean())


def item_popularity(split_data) -> Tensor:
    """``LongTensor[n_items]``: how often each item occurs in the *training part* of the interactions.

    Under leave-one-out the training part of a user's sequence ``v_1..v_n`` is ``v_1..v_{n-2}`` (the
    validation and test items are excluded so that popularity never leaks held-out interactions). It is
    reconstructed exactly from the split tensors, without double counting the items that recur in many
    prefix histories: every training example ``(v_1..v_{t-1}) -> v_t`` contributes its target ``v_t``
    (``t = 2..n-2``), and each user's first item ``v_1`` is the single history item of that user's first
    example: the first training row of the user (``(v_1) -> v_2``), or, for a user whose training part is
    one item long (no training row), the validation row. The first row is found by position, not by the
    history length, which cannot tell ``v_1`` apart when ``max_history = 1``.

    Args:
        split_data: object with ``.train``, ``.valid`` (each with ``history[N, H]`` left-padded with
            ``-1``, ``target[N]`` and ``user[N]``; training rows grouped by user in ascending user order and
            chronological within a user) and ``num_items``, as produced by
            ``gflowgr_core.data.split.leave_one_out``.

    Raises:
        ValueError: training rows not grouped by user in ascending order, or item indices outside
            ``[0, num_items)``.
    """
    num_items = int(split_data.num_items)
    train, valid = split_data.train, split_data.valid
    train_user = train.user.reshape(-1).cpu()
    if train_user.numel() > 1 and bool((train_user[1:] < train_user[:-1]).any()):
        row = int((train_user[1:] < train_user[:-1]).nonzero()[0]) + 1
        raise ValueError(f"training rows must be grouped by user in ascending order (as leave_one_out makes "
                         f"them); row {row} has user {int(train_user[row])} after user {int(train_user[row - 1])}")
    first_row = torch.ones_like(train_user, dtype=torch.bool)
    first_row[1:] = train_user[1:] != train_user[:-1]
    no_train = ~torch.isin(valid.user.reshape(-1).cpu(), train_user)
    parts = [train.target.reshape(-1).cpu(), train.history.cpu()[first_row, -1], valid.history.cpu()[no_train, -1]]
    items = torch.cat([p.to(torch.int64) for p in parts])
    if items.numel() and (int(items.min()) < 0 or int(items.max()) >= num_items):
        raise ValueError(f"split holds item indices outside [0, {num_items}) (or a first history whose item is "
                         "not in the last column, i.e. not left-padded)")
    return torch.bincount(items, minlength=num_items)


def evaluate_rankings(ranked: Tensor, target: Tensor, popularity: Tensor, ks: Sequence[int] = (5, 10, 20),
                      item_key: Optional[Tensor] = None, head_fraction: float = 0.2,
                      head_by: str = "items", sid_ranked: Optional[Tensor] = None) -> dict[str, float]:
    """All metrics of a split's rankings in one dict of floats.

    Args:
        ranked: ``LongTensor[N, K']`` ranked items (``-1`` = empty slot); needs ``K' >= max(ks)``.
        target: ``LongTensor[N]`` held-out items.
        popularity: ``Tensor[n_items]`` training interaction counts (defines n_items and the long tail).
        ks: cut-offs.
        item_key: optional ``Tensor[n_items]`` (e.g. leaf node per item) adding the SID-match metrics.
        head_fraction, head_by: long-tail definition, see :func:`long_tail_mask`.
        sid_ranked: optional ``LongTensor[N, K'']`` ranking the SID-match metrics read instead of ``ranked``
            (needs ``item_key``). A ranked item list cut to K' items holds fewer than K' distinct SIDs when
            several of its items share one, so a decoder passes one item per ranked SID (e.g. the first item
            of each beam's leaf, see :func:`gflowgr_core.evaluation.leaf_representatives`): K then counts
            SIDs as a SID-level Hit@K does. Repeated keys still count once; ``-1`` slots are empty.

    Returns:
        ``{"recall@K", "ndcg@K", "coverage@K", "tail_share@K", "mean_pop@K"}`` for every K in ``ks``, plus
        ``"sid_recall@K"`` and ``"sid_ndcg@K"`` when ``item_key`` is given, and ``"num_examples"``.
    """
    ks = tuple(ks)
    for k in ks:
        _check_k(k)
    num_items = popularity.numel()
    _check_ranked(ranked, num_items)
    if ranked.shape[1] < max(ks):
        raise ValueError(f"ranked has {ranked.shape[1]} columns, fewer than the largest cut-off {max(ks)}")
    if item_key is not None and item_key.numel() != num_items:
        raise ValueError(f"item_key has {item_key.numel()} entries but popularity has {num_items} items")
    if sid_ranked is not None:
        if item_key is None:
            raise ValueError("sid_ranked is given without item_key: the SID-match metrics need item_key")
        _check_ranked(sid_ranked, num_items)
        if sid_ranked.shape[0] != ranked.shape[0]:
            raise ValueError(f"sid_ranked has {sid_ranked.shape[0]} rows but ranked has {ranked.shape[0]}")
    target = target.to(ranked.device)
    rank = hit_rank(ranked, target)
    sid_rank = None if item_key is None else \
        hit_rank(ranked if sid_ranked is None else sid_ranked.to(ranked.device), target, item_key)
    tail = long_tail_mask(popularity, head_fraction, head_by).to(ranked.device)
    pop = popularity.to(device=ranked.device, dtype=torch.float64)
    out: dict[str, float] = {"num_examples": float(ranked.shape[0])}
    for k in ks:
        out[f"recall@{k}"] = float(_recall_from_rank(rank, k).mean())
        out[f"ndcg@{k}"] = float(_ndcg_from_rank(rank, k).mean())
        if sid_rank is not None:
            out[f"sid_recall@{k}"] = float(_recall_from_rank(sid_rank, k).mean())
            out[f"sid_ndcg@{k}"] = float(_ndcg_from_rank(sid_rank, k).mean())
        items = _top_k_items(ranked, k, num_items)
        seen = torch.zeros(num_items, dtype=torch.bool, device=items.device)
        seen[items] = True
        out[f"coverage@{k}"] = float(seen.sum()) / num_items
        out[f"tail_share@{k}"] = float(tail[items].to(torch.float64).mean())
        out[f"mean_pop@{k}"] = float(pop[items].mean())
    return out
