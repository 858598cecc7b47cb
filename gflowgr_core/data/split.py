"""k-core filtering and the leave-one-out split into padded history/target tensors.

Leave-one-out protocol (per user with items ``v_0 .. v_{n-1}``, chronological):
test target ``v_{n-1}``, validation target ``v_{n-2}``, and every ``v_t`` with ``1 <= t <= n-3`` is a
training target. A history is the items before its target, truncated to the last ``max_history``: the
training part only for training examples, everything before the target for validation and test.
Histories are left-padded with ``-1`` so the most recent item is always in the last column.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .loaders import DataError, Interactions

__all__ = ["KCoreReport", "kcore_filter", "Split", "SplitData", "leave_one_out", "PAD_ITEM", "MIN_SPLIT_LENGTH"]

logger = logging.getLogger(__name__)

PAD_ITEM = -1
# A splittable user needs the test target, the validation target and one earlier item as its history.
MIN_SPLIT_LENGTH = 3


# ------------------------------------------------------------------------------------------------- k-core


@dataclass(frozen=True)
class KCoreReport:
    """What :func:`kcore_filter` removed.

    Attributes:
        k: the threshold used (``k <= 1`` means nothing was filtered).
        iterations: rounds that removed something (0 when the data already was a k-core).
        users_before, users_after, items_before, items_after, interactions_before, interactions_after:
            sizes before and after.
    """

    k: int
    iterations: int
    users_before: int
    users_after: int
    items_before: int
    items_after: int
    interactions_before: int
    interactions_after: int

    @property
    def removed_users(self) -> int:
        return self.users_before - self.users_after

    @property
    def removed_items(self) -> int:
        return self.items_before - self.items_after

    @property
    def removed_interactions(self) -> int:
        return self.interactions_before - self.interactions_after

    def __str__(self) -> str:
        return (f"{self.k}-core, {self.iterations} round(s): removed {self.removed_users} users, "
                f"{self.removed_items} items, {self.removed_interactions} interactions "
                f"({self.users_after} users, {self.items_after} items, {self.interactions_after} interactions left)")


def _flatten(interactions: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lengths[U], starts[U], flat[N])``: all sequences concatenated, with each user's offset."""
    lengths = interactions.lengths()
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    if interactions.sequences:
        flat = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in interactions.sequences])
    else:
        flat = np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= interactions.num_items):
        bad = int(np.flatnonzero((flat < 0) | (flat >= interactions.num_items))[0])
        user = int(np.searchsorted(starts, bad, side="right") - 1)
        raise DataError(f"{interactions.source}: user {interactions.user_ids[user]!r}: item index {flat[bad]} "
                        f"outside 0..{interactions.num_items - 1}")
    return lengths, starts, flat


def kcore_filter(interactions: Interactions, k: int) -> tuple[Interactions, KCoreReport]:
    """Iteratively keep only users and items with at least ``k`` interactions each.

    Degrees count events (a repeated (user, item) event counts twice). Removing items can push users
    under ``k`` and vice versa, so rounds repeat until nothing changes.

    Args:
        interactions: the data; not modified.
        k: minimum interactions per user and per item; ``k <= 1`` returns the data unchanged.

    Returns:
        ``(filtered, report)``. ``filtered`` keeps the surviving users in their order and re-indexes the
        surviving items densely in their original (sorted) order; sequences keep their chronology.
    """
    n_users, n_items = interactions.num_users, interactions.num_items
    lengths, _, flat = _flatten(interactions)
    total = int(flat.size)
    if k <= 1:
        return interactions, KCoreReport(k, 0, n_users, n_users, n_items, n_items, total, total)

    user_of = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    keep = np.ones(total, dtype=bool)
    rounds = 0
    while True:
        user_deg = np.bincount(user_of[keep], minlength=n_users)
        item_deg = np.bincount(flat[keep], minlength=n_items)
        new_keep = keep & (user_deg[user_of] >= k) & (item_deg[flat] >= k)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
        rounds += 1

    kept_users = np.flatnonzero(np.bincount(user_of[keep], minlength=n_users) > 0)
    kept_items = np.flatnonzero(np.bincount(flat[keep], minlength=n_items) > 0)
    new_item = np.full(n_items, -1, dtype=np.int64)
    new_item[kept_items] = np.arange(len(kept_items), dtype=np.int64)
    kept_flat = new_item[flat[keep]]
    kept_lengths = np.bincount(user_of[keep], minlength=n_users)[kept_users]
    sequences = np.split(kept_flat, np.cumsum(kept_lengths)[:-1]) if len(kept_users) else []
    filtered = Interactions(
        user_ids=[interactions.user_ids[u] for u in kept_users.tolist()],
        item_ids=[interactions.item_ids[i] for i in kept_items.tolist()],
        sequences=sequences,
        source=f"{interactions.source}|{k}-core",
    )
    report = KCoreReport(k, rounds, n_users, len(kept_users), n_items, len(kept_items), total,
                         int(kept_flat.size))
    logger.info("%s: %s", interactions.source, report)
    return filtered, report


# ---------------------------------------------------------------------------------------------- the split


@dataclass
class Split:
    """Examples of one split, row ``n`` being (history, target, user).

    Attributes:
        history: ``LongTensor[N, H]`` item indices, left-padded with ``-1`` (most recent item last).
        target: ``LongTensor[N]`` the item to predict.
        user: ``LongTensor[N]`` the user index (into ``Interactions.user_ids``).
    """

    history: torch.Tensor
    target: torch.Tensor
    user: torch.Tensor

    def __post_init__(self) -> None:
        if self.history.dim() != 2:
            raise ValueError(f"history must be [N, H], got shape {tuple(self.history.shape)}")
        n = self.history.shape[0]
        for name in ("target", "user"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"{name} must be [{n}] to match history, got shape {tuple(t.shape)}")
        for name in ("history", "target", "user"):
            if getattr(self, name).dtype != torch.long:
                raise ValueError(f"{name} must be int64, got {getattr(self, name).dtype}")

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def max_history(self) -> int:
        """``H``, the history width."""
        return int(self.history.shape[1])

    def history_lengths(self) -> torch.Tensor:
        """Number of real (non-pad) items per row: ``LongTensor[N]``."""
        return (self.history != PAD_ITEM).sum(dim=1)

    def to(self, device: torch.device | str) -> "Split":
        """A copy on ``device`` (no copy when already there)."""
        return Split(self.history.to(device), self.target.to(device), self.user.to(device))

    def subset(self, index) -> "Split":
        """Rows selected by ``index``: a slice, a bool mask ``[N]``, or integer row indices ``[M]``
        (tensor, array or list; int64 on any device)."""
        if isinstance(index, slice):
            return Split(self.history[index], self.target[index], self.user[index])
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ValueError(f"bool mask must have shape [{len(self)}], got {tuple(idx.shape)}")
        elif idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"subset index must be a slice, a bool mask or integer indices, got {idx.dtype}")
        else:
            idx = idx.long()
        idx = idx.to(self.history.device)
        return Split(self.history[idx], self.target[idx], self.user[idx])


@dataclass
class SplitData:
    """The leave-one-out split.

    Attributes:
        train, valid, test: the three :class:`Split`; valid and test hold one row per kept user.
        num_users: users of the source :class:`Interactions` (``Split.user`` indexes them), dropped
            users included.
        num_items: catalogue size; targets and history entries are in ``0..num_items-1``.
        max_history: ``H``.
        dropped_users: users with fewer than 3 items, which cannot be split.
    """

    train: Split
    valid: Split
    test: Split
    num_users: int
    num_items: int
    max_history: int
    dropped_users: int

    def stats(self) -> dict:
        """Sizes of the split: example counts per part, users, items, history width, dropped users."""
        return {
            "num_train_examples": len(self.train),
            "num_valid": len(self.valid),
            "num_test": len(self.test),
            "num_users": self.num_users,
            "num_items": self.num_items,
            "max_history": self.max_history,
            "dropped_users": self.dropped_users,
        }

    def to(self, device: torch.device | str) -> "SplitData":
        """A copy with every tensor on ``device``."""
        return SplitData(self.train.to(device), self.valid.to(device), self.test.to(device),
                         self.num_users, self.num_items, self.max_history, self.dropped_users)


def _histories(flat: np.ndarray, target_pos: np.ndarray, first_pos: np.ndarray, max_history: int) -> np.ndarray:
    """``[N, H]`` windows ``flat[target_pos-H : target_pos]``, entries before ``first_pos`` set to -1."""
    window = target_pos[:, None] + np.arange(-max_history, 0, dtype=np.int64)[None, :]
    inside = window >= first_pos[:, None]
    return np.where(inside, flat[np.maximum(window, 0)], PAD_ITEM)


def _split(flat: np.ndarray, target_pos: np.ndarray, first_pos: np.ndarray, users: np.ndarray,
           max_history: int) -> Split:
    history = _histories(flat, target_pos, first_pos, max_history) if len(target_pos) else \
        np.zeros((0, max_history), dtype=np.int64)
    return Split(torch.from_numpy(np.ascontiguousarray(history, dtype=np.int64)),
                 torch.from_numpy(np.ascontiguousarray(flat[target_pos], dtype=np.int64)),
                 torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64)))


def leave_one_out(interactions: Interactions, max_history: int = 20) -> SplitData:
    """Split every user's sequence: last item test, second-to-last validation, earlier prefixes training.

    Args:
        interactions: chronological sequences.
        max_history: ``H``, the number of most recent items kept in a history (>= 1).

    Returns:
        :class:`SplitData`. Training rows are grouped by user (users in order) and chronological within
        a user; valid/test rows follow user order. Users with fewer than 3 items are dropped, counted in
        ``dropped_users`` and reported with a warning.

    Raises:
        DataError: no user has 3 or more items, or a sequence holds an item index outside the catalogue.
    """
    if isinstance(max_history, bool) or not isinstance(max_history, (int, np.integer)) or max_history < 1:
        raise ValueError(f"max_history must be an integer >= 1, got {max_history!r}")
    max_history = int(max_history)
    lengths, starts, flat = _flatten(interactions)
    splittable = lengths >= MIN_SPLIT_LENGTH
    dropped = int((~splittable).sum())
    if dropped:
        logger.warning("%s: dropped %d of %d users with fewer than %d items (cannot leave two out)",
                       interactions.source, dropped, interactions.num_users, MIN_SPLIT_LENGTH)
    users = np.flatnonzero(splittable).astype(np.int64)
    if users.size == 0:
        raise DataError(f"{interactions.source}: no user has {MIN_SPLIT_LENGTH} or more items; nothing to split "
                        f"({interactions.num_users} users)")
    first, n = starts[users], lengths[users]

    # Training targets of a user sit at positions 1 .. n-3 of its sequence: n-3 rows per user.
    per_user = n - MIN_SPLIT_LENGTH
    row_user_first = np.repeat(first, per_user)
    row_offset = np.arange(per_user.sum(), dtype=np.int64) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    train_pos = row_user_first + row_offset + 1

    return SplitData(
        train=_split(flat, train_pos, row_user_first, np.repeat(users, per_user), max_history),
        valid=_split(flat, first + n - 2, first, users, max_history),
        test=_split(flat, first + n - 1, first, users, max_history),
        num_users=interactions.num_users,
        num_items=interactions.num_items,
        max_history=max_history,
        dropped_users=dropped,
    )
