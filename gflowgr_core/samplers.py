"""Augmented-trajectory samplers (METHOD.md §4).

For a batch of training examples (:class:`~gflowgr_core.trajectories.ExampleBatch`: training-split rows, user
prompts, positive items) a sampler returns ``items[B, n_aug]``: whole
catalogue items whose SIDs become the augmented trajectories next to the positive's
(:meth:`Sampler.trajectories` returns them as :class:`~gflowgr_core.trajectories.Trajectories`). Strategies:

- :class:`LogsSampler` ("logs"): items of the user's own history window other than the target, topped up
  with items that co-occur with the positive in training sequences, then with random items;
- :class:`RandomSampler` ("random"): uniform over catalogue items the user has not interacted with;
- :class:`CurriculumSampler` ("cm_curriculum"): a collaborative model ranks a pool (its top-M plus random
  items); the pick quantile moves from easy (low CM score) to hard (high score) with training progress;
- :class:`OnPolicySampler` ("onpolicy"): the current model's own trie-constrained decoding (beam search, or
  sampling at a temperature);
- :class:`MixtureSampler` ("mixture"): a weighted mixture of the above, per slot or per example.

Guarantees of every sampler's :meth:`Sampler.sample` (checked on every call): each entry is a catalogue
item ``0 <= item < n_items``; the positive is never among the augmentations, nor (given ``item_codes``) any
item whose SID equals the positive's: under ``"share"`` collisions that item *is* the positive's terminal
state, which would then carry two rewards; the set (positive + augmentations) has no duplicates; the result
is a function of the inputs and the ``torch.Generator`` state (deterministic for a seed on a given device);
``n_aug=0`` returns an empty ``[B, 0]`` tensor.

"The user's items" are the history window of the example, and, given ``user_items``
(:class:`UserItems`, built once from the training split), every item of the user's training part. No
augmentation is one of them (augmentations are items the user has *not* interacted with): the random sampler,
the random fills, the logs sampler's co-occurrence fill and, by default (``exclude_history=True``), the
curriculum pool and the on-policy sampler keep them out. The one exception is by design: the logs sampler's
first picks *are* items of the user's history window (the "logs" strategy of METHOD.md §4).

Everything is vectorised over the batch (no per-example Python loop). Random numbers are drawn on the
generator's device and moved to the batch's device.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from gflowgr_core.trajectories import ExampleBatch, Trajectories

__all__ = [
    "SamplerError",
    "Sampler",
    "UserItems",
    "LogsSampler",
    "RandomSampler",
    "CurriculumSampler",
    "OnPolicySampler",
    "MixtureSampler",
    "build_cooccurrence",
    "make_sampler",
    "SAMPLERS",
]

# Rejection rounds before the exact (dense over the catalogue) fallback of random filling.
_REJECTION_ROUNDS = 16
_MAX_DRAWS_PER_ROW = 1 << 14
# Bound on B x n_items random keys held at once by the dense fallback.
_DENSE_CHUNK_ELEMS = 1 << 24


class SamplerError(ValueError):
    """Invalid sampler input, an impossible request, or a broken sampler guarantee."""


# --------------------------------------------------------------------------------------------------
# Vectorised set helpers. Item tensors are [B, N] with -1 meaning "no item".
# --------------------------------------------------------------------------------------------------

def _member(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``Bool[B, N]``: whether ``x[b, i]`` occurs in row ``b`` of ``s[B, S]`` (binary search per row)."""
    if s.shape[1] == 0 or x.shape[1] == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    s_sorted = torch.sort(s, dim=1).values.contiguous()
    pos = torch.searchsorted(s_sorted, x.contiguous()).clamp(max=s.shape[1] - 1)
    return s_sorted.gather(1, pos) == x


def _first_occurrence(x: torch.Tensor) -> torch.Tensor:
    """``Bool[B, N]``: True at the first (leftmost) occurrence of each value in its row."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    sorted_x, order = torch.sort(x, dim=1, stable=True)
    first_sorted = torch.ones_like(sorted_x, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    return torch.empty_like(first_sorted).scatter_(1, order, first_sorted)


def _distinct_count(x: torch.Tensor) -> torch.Tensor:
    """``LongTensor[B]``: number of distinct items (values >= 0) per row."""
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    s = torch.sort(x, dim=1).values
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return ((s >= 0) & new).sum(dim=1)


def _fill_slots(items: torch.Tensor, cand: torch.Tensor, exclude: torch.Tensor | None = None,
                limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the empty (-1) slots of ``items[B, n]`` with candidates, in candidate order.

    A candidate is usable when it is an item (>= 0), is its first occurrence in ``cand``, is not already in
    ``items`` and not in ``exclude[B, E]``. At most ``limit[B]`` slots are filled per row.

    Returns ``(items, n_filled[B])``.
    """
    if items.shape[1] == 0 or cand.shape[1] == 0:
        return items, torch.zeros(items.shape[0], dtype=torch.long, device=items.device)
    usable = (cand >= 0) & _first_occurrence(cand) & ~_member(cand, items)
    if exclude is not None:
        usable &= ~_member(cand, exclude)
    # Stable sort on "unusable" moves usable candidates to the front, keeping their order.
    order = torch.sort((~usable).to(torch.uint8), dim=1, stable=True).indices
    compact = cand.gather(1, order)
    n_usable = usable.sum(dim=1, keepdim=True)
    empty = items < 0
    slot_rank = empty.long().cumsum(dim=1) - 1
    take = empty & (slot_rank < n_usable)
    if limit is not None:
        take &= slot_rank < limit[:, None]
    src = compact.gather(1, slot_rank.clamp(min=0, max=cand.shape[1] - 1))
    return torch.where(take, src, items), take.sum(dim=1)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    gdev = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=gdev).to(device)


def _random_fill(items: torch.Tensor, exclude: torch.Tensor, n_items: int, generator: torch.Generator | None,
                 strict: bool = True, what: str = "random fill") -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the -1 slots of ``items[B, n]`` with distinct items drawn uniformly from the catalogue minus
    ``exclude[B, E]`` (-1 entries ignored) minus the row's items already present.

    Rejection sampling over uniform draws (exactly uniform sampling without replacement); rows that are
    still short after a few rounds (tiny allowed sets) are finished exactly with random keys over the
    whole catalogue. With ``strict`` a row whose allowed set is too small raises :class:`SamplerError`;
    otherwise that row is filled as far as possible and keeps -1 slots.

    Returns ``(items, n_filled[B])``.
    """
    device = items.device
    B = items.shape[0]
    need = (items < 0).sum(dim=1)
    filled = torch.zeros(B, dtype=torch.long, device=device)
    if B == 0 or int(need.max()) == 0:
        return items, filled
    avail = n_items - _distinct_count(torch.cat([exclude, items], dim=1))
    short = need > avail
    if bool(short.any()):
        if strict:
            rows = short.nonzero().flatten()
            r = int(rows[0])
            raise SamplerError(
                f"{what}: batch row {r} needs {int(need[r])} more distinct item(s) but only {int(avail[r])} "
                f"of the {n_items} catalogue items are outside its history/positive/already chosen items "
                f"({int(rows.numel())} row(s) affected); lower n_aug or use a larger catalogue")
        need = torch.minimum(need, avail)
    goal = need.clone()
    min_frac = max(float(avail[goal > 0].min()) / n_items, 1e-9) if bool((goal > 0).any()) else 1.0
    for _ in range(_REJECTION_ROUNDS):
        remaining = goal - filled
        if int(remaining.max()) == 0:
            return items, filled
        k = min(int(math.ceil(2 * int(remaining.max()) / min_frac)) + 8, _MAX_DRAWS_PER_ROW)
        cand = _randint(n_items, (B, k), generator, device)
        items, got = _fill_slots(items, cand, exclude, limit=remaining)
        filled += got
    remaining = goal - filled
    rows = (remaining > 0).nonzero().flatten()
    if rows.numel() == 0:
        return items, filled
    # Exact fallback: random keys over the whole catalogue, disallowed items pushed to the end.
    chunk = max(1, _DENSE_CHUNK_ELEMS // n_items)
    for start in range(0, int(rows.numel()), chunk):
        r = rows[start:start + chunk]
        keys = _rand((int(r.numel()), n_items), generator, device)
        taken = torch.cat([exclude[r], items[r]], dim=1)
        is_item = taken >= 0
        row_of = torch.arange(int(r.numel()), device=device)[:, None].expand_as(taken)
        keys[row_of[is_item], taken[is_item]] = -1.0
        m = int(remaining[r].max())
        top_keys, top = keys.topk(m, dim=1)
        top = torch.where(top_keys >= 0, top, torch.full_like(top, -1))
        sub, got = _fill_slots(items[r], top, exclude[r], limit=remaining[r])
        items = items.index_copy(0, r, sub)
        filled = filled.index_add(0, r, got)
    return items, filled


def _as_long(name: str, t: Any, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise SamplerError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise SamplerError(f"{name} must be an integer tensor, got {t.dtype}")
    return t.to(device=device if device is not None else t.device, dtype=torch.long)


def _check_item_range(name: str, t: torch.Tensor, n_items: int, allow_pad: bool) -> None:
    lo = -1 if allow_pad else 0
    bad = (t < lo) | (t >= n_items)
    if bool(bad.any()):
        per_row = bad.reshape(bad.shape[0], -1).any(dim=1)
        rows = per_row.nonzero().flatten()
        raise SamplerError(f"{name} must hold items in [{lo}, {n_items}); batch row(s) {rows[:5].tolist()} "
                           f"hold {t[bad][:5].tolist()}")


# --------------------------------------------------------------------------------------------------
# Per-row item sets: a user's training items, the items sharing a SID
# --------------------------------------------------------------------------------------------------

class _RowSets:
    """Sorted, distinct item lists per set id (CSR: ``indptr[n_sets + 1]``, ``items[nnz]``).

    Built from ``(set_id, item)`` pairs in one sort; :meth:`gather` returns the lists of some sets as a
    -1-padded ``[B, W]`` tensor (``W`` = the longest list among them), ready for the set helpers above.
    """

    def __init__(self, set_id: torch.Tensor, item: torch.Tensor, n_sets: int):
        base = int(item.max()) + 1 if item.numel() else 1
        keys = torch.unique(set_id * base + item)  # sorted by set, then item
        counts = torch.bincount(keys // base, minlength=n_sets)
        self.indptr = torch.zeros(n_sets + 1, dtype=torch.long, device=item.device)
        self.indptr[1:] = torch.cumsum(counts, 0)
        self.items = keys % base

    def gather(self, sets: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, W]``: the items of sets ``sets[B]``, ascending, -1 padded (on ``sets``' device)."""
        device = sets.device
        sets = sets.to(self.indptr.device)
        start = self.indptr[sets]
        count = self.indptr[sets + 1] - start
        width = int(count.max()) if sets.numel() else 0
        offs = torch.arange(width, device=self.indptr.device)
        inside = offs[None, :] < count[:, None]
        pos = (start[:, None] + offs[None, :]).clamp(max=max(self.items.numel() - 1, 0))
        out = torch.where(inside, self.items[pos], torch.full_like(pos, -1)) if width else \
            torch.empty((sets.shape[0], 0), dtype=torch.long, device=self.indptr.device)
        return out.to(device)


class UserItems:
    """Every user's items in the training split, looked up by training-example row.

    A user's training items are the targets and history items of all their training examples (under the
    leave-one-out protocol: the user's whole sequence except the validation and test targets), not only the
    20-item history window of one example. Built once, vectorised (one sort of the ``(user, item)`` pairs),
    on the split's device: build it from the split on the training device to keep lookups there.

    Args:
        split: the training ``Split`` (``history[N, H]``, ``target[N]``, ``user[N]``): the same rows that
            :attr:`~gflowgr_core.trajectories.ExampleBatch.example` indexes.
    """

    def __init__(self, split: Any):
        history = _as_long("split.history", split.history)
        target = _as_long("split.target", split.target, history.device)
        user = _as_long("split.user", split.user, history.device)
        N = int(target.shape[0])
        if history.dim() != 2 or history.shape[0] != N or user.shape != (N,):
            raise SamplerError(f"UserItems needs history[N, H], target[N], user[N], got {tuple(history.shape)}, "
                               f"{tuple(target.shape)}, {tuple(user.shape)}")
        if N and int(user.min()) < 0:
            raise SamplerError(f"UserItems: split.user holds negative ids, e.g. {int(user.min())}")
        if N and int(torch.cat([history.flatten(), target]).min()) < -1:
            raise SamplerError("UserItems: split items must be >= 0 (-1 pads the history)")
        n_users = int(user.max()) + 1 if N else 0
        pair_user = torch.cat([user[:, None].expand_as(history).reshape(-1), user])
        pair_item = torch.cat([history.reshape(-1), target])
        keep = pair_item >= 0
        self.example_user = user
        self._sets = _RowSets(pair_user[keep], pair_item[keep], n_users)

    @property
    def num_examples(self) -> int:
        """Rows of the training split this was built from."""
        return int(self.example_user.shape[0])

    def rows(self, example_idx: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, W]``: the training items of the user of each example row, ascending, -1 padded."""
        idx = _as_long("example_idx", example_idx)
        bad = (idx < 0) | (idx >= self.num_examples)
        if bool(bad.any()):
            raise SamplerError(f"UserItems: example_idx must be rows of the training split [0, "
                               f"{self.num_examples}); got {idx[bad][:5].tolist()}")
        users = self.example_user[idx.to(self.example_user.device)]
        return self._sets.gather(users).to(idx.device)


class _SidGroups:
    """Items grouped by identical SID (all levels), for catalogues where some items share one."""

    def __init__(self, item_codes: Any, n_items: int):
        codes = getattr(item_codes, "codes", item_codes)
        codes = _as_long("item_codes", codes)
        if codes.dim() != 2 or codes.shape[0] != n_items:
            raise SamplerError(f"item_codes must be [n_items={n_items}, L] (Catalog.codes), got "
                               f"{tuple(codes.shape)}")
        _, group, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
        self.shared = bool((counts > 1).any())
        self.group = group
        self._sets = _RowSets(group, torch.arange(n_items, device=group.device), int(counts.shape[0]))

    def members(self, positive: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, W]``: the items sharing each positive's SID (the positive included), -1 padded."""
        return self._sets.gather(self.group.to(positive.device)[positive])


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------

class Sampler:
    """Base of the augmented-trajectory samplers.

    Subclasses implement :meth:`_sample`; :meth:`sample` validates the batch, handles ``n_aug == 0`` and
    checks the guarantees of the result. ``last_stats`` holds per-call counters (how many items came from
    each source) for logging.

    Args:
        n_items: catalogue size; items are ``0..n_items-1``.
        user_items: the users' training items (:class:`UserItems` of the training split), kept out of the
            random draws; ``None``: only the example's history window is.
        item_codes: ``LongTensor[n_items, L]`` SIDs (or a Catalog): items whose SID equals the positive's
            are never offered. ``None``: only the positive item itself is excluded.
    """

    name = "base"

    def __init__(self, n_items: int, *, user_items: UserItems | None = None, item_codes: Any = None):
        if int(n_items) < 1:
            raise SamplerError(f"n_items must be >= 1, got {n_items}")
        self.n_items = int(n_items)
        if user_items is not None and not isinstance(user_items, UserItems):
            raise SamplerError(f"user_items must be a UserItems, got {type(user_items).__name__}")
        self.user_items = user_items
        groups = _SidGroups(item_codes, self.n_items) if item_codes is not None else None
        # Without shared SIDs the positive's group is the positive alone.
        self._sid_groups = groups if groups is not None and groups.shared else None
        self.last_stats: dict[str, int] = {}

    def _forbidden(self, batch: ExampleBatch) -> torch.Tensor:
        """``LongTensor[B, F]``: the positive and the items that share its SID (-1 padded)."""
        if self._sid_groups is None:
            return batch.positive[:, None]
        return self._sid_groups.members(batch.positive)

    def _seen(self, batch: ExampleBatch, forbidden: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, S]``: ``forbidden`` plus the user's items (history window, training items)."""
        parts = [forbidden, batch.history]
        if self.user_items is not None:
            parts.append(self.user_items.rows(batch.example))
        return torch.cat(parts, dim=1)

    def sample(self, batch: ExampleBatch, n_aug: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented items for every example.

        Args:
            batch: the examples (:class:`ExampleBatch`).
            n_aug: number of augmented items per example (>= 0).
            generator: source of randomness (its device is where random numbers are drawn).

        Returns:
            ``LongTensor[B, n_aug]`` on the batch's device, satisfying the module's guarantees.
        """
        batch = self._validate(batch)
        if int(n_aug) < 0:
            raise SamplerError(f"n_aug must be >= 0, got {n_aug}")
        n_aug = int(n_aug)
        B = batch.size
        if n_aug == 0 or B == 0:
            self.last_stats = {}
            return torch.empty((B, n_aug), dtype=torch.long, device=batch.device)
        if n_aug > self.n_items - 1:
            raise SamplerError(f"n_aug={n_aug} distinct items besides the positive need n_items > {n_aug}, "
                               f"the catalogue has {self.n_items}")
        items = self._sample(batch, n_aug, generator)
        self._check_output(batch, items, n_aug)
        return items

    def trajectories(self, batch: ExampleBatch, n_aug: int, generator: torch.Generator | None,
                     item_codes: torch.Tensor) -> Trajectories:
        """:meth:`sample` as :class:`~gflowgr_core.trajectories.Trajectories`: each example's positive, then
        its ``n_aug`` sampled items, with the batch's trunk windows.

        Args:
            batch, n_aug, generator: as for :meth:`sample`.
            item_codes: ``LongTensor[n_items, L]`` SID codes of the catalogue, on the batch's device.
        """
        items = self.sample(batch, n_aug, generator)
        return Trajectories.from_items(batch.example, batch.history, batch.positive, items, item_codes,
                                       window=batch.window)

    def _sample(self, batch: ExampleBatch, n_aug: int, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def set_progress(self, progress: float) -> None:
        """Training progress ``p`` in [0, 1] (used by schedule-driven samplers; validated for all)."""
        _check_progress(progress)

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (schedule position etc.); configuration is not included."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise SamplerError(f"{type(self).__name__}.load_state_dict: unknown key(s) {sorted(unknown)}")

    def _validate(self, batch: ExampleBatch) -> ExampleBatch:
        positive = _as_long("batch.positive", batch.positive)
        device = positive.device
        history = _as_long("batch.history", batch.history, device)
        example = _as_long("batch.example", batch.example, device)
        if positive.dim() != 1:
            raise SamplerError(f"batch.positive must be [B], got {tuple(positive.shape)}")
        B = positive.shape[0]
        if history.dim() != 2 or history.shape[0] != B:
            raise SamplerError(f"batch.history must be [B={B}, H], got {tuple(history.shape)}")
        if example.shape != (B,):
            raise SamplerError(f"batch.example must be [B={B}], got {tuple(example.shape)}")
        _check_item_range("batch.positive", positive, self.n_items, allow_pad=False)
        _check_item_range("batch.history", history, self.n_items, allow_pad=True)
        return ExampleBatch(example, history, positive, batch.window)

    def _check_output(self, batch: ExampleBatch, items: torch.Tensor, n_aug: int) -> None:
        who = type(self).__name__
        if items.shape != (batch.size, n_aug) or items.dtype != torch.long:
            raise SamplerError(f"{who} returned {items.dtype}{tuple(items.shape)}, expected "
                               f"torch.int64{(batch.size, n_aug)}")
        _check_item_range(f"{who} output", items, self.n_items, allow_pad=False)
        full = torch.cat([batch.positive[:, None], items], dim=1)
        dup = ~_first_occurrence(full)
        if bool(dup.any()):
            r = int(dup.any(dim=1).nonzero()[0])
            raise SamplerError(f"{who} returned a repeated item or the positive in batch row {r}: "
                               f"positive {int(batch.positive[r])}, items {items[r].tolist()}")
        if self._sid_groups is not None:
            same = _member(items, self._forbidden(batch))
            if bool(same.any()):
                r = int(same.any(dim=1).nonzero()[0])
                raise SamplerError(f"{who} returned an item with the positive's SID in batch row {r}: "
                                   f"positive {int(batch.positive[r])}, items {items[r].tolist()}")


def _check_progress(progress: float) -> float:
    p = float(progress)
    if not (0.0 <= p <= 1.0):
        raise SamplerError(f"training progress must be in [0, 1], got {progress}")
    return p


# --------------------------------------------------------------------------------------------------
# Random
# --------------------------------------------------------------------------------------------------

class RandomSampler(Sampler):
    """Uniform sampling without replacement over the catalogue items the user has not interacted with.

    Excluded: the positive (and its SID group), the history window and, given ``user_items``, all of the
    user's training items.

    Args:
        n_items: catalogue size.
        user_items, item_codes: see :class:`Sampler`.
    """

    name = "random"

    def _sample(self, batch, n_aug, generator):
        items = torch.full((batch.size, n_aug), -1, dtype=torch.long, device=batch.device)
        items, got = _random_fill(items, self._seen(batch, self._forbidden(batch)), self.n_items, generator,
                                  what="RandomSampler")
        self.last_stats = {"random": int(got.sum())}
        return items


# --------------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------------

def build_cooccurrence(history: torch.Tensor, target: torch.Tensor, n_items: int, top_c: int = 20,
                       max_distance: int | None = None) -> torch.Tensor:
    """Top co-occurring items of every item, from training examples.

    Each training example contributes the pairs (target, h) for the history items ``h`` at most
    ``max_distance`` positions before the target (all of the history when ``None``), counted in both
    directions. When the examples are every prefix of the training sequences (the leave-one-out protocol),
    this counts every pair of items at distance <= ``max_distance`` in the same training sequence once.
    Validation/test targets must not be passed here (they would leak into training).

    Args:
        history: ``LongTensor[N, H]`` left-padded with -1 (``Split.history``).
        target: ``LongTensor[N]`` (``Split.target``).
        n_items: catalogue size.
        top_c: list length per item.
        max_distance: co-occurrence window in positions (>= 1), or ``None``.

    Returns:
        ``LongTensor[n_items, top_c]``: row ``i`` lists the items co-occurring with ``i`` by decreasing
        count (ties: smaller item first), padded with -1. An item never co-occurs with itself.
    """
    history = _as_long("history", history)
    target = _as_long("target", target, history.device)
    if history.dim() != 2 or target.shape != (history.shape[0],):
        raise SamplerError(f"expected history[N, H] and target[N], got {tuple(history.shape)} and "
                           f"{tuple(target.shape)}")
    if top_c < 1:
        raise SamplerError(f"top_c must be >= 1, got {top_c}")
    if max_distance is not None and max_distance < 1:
        raise SamplerError(f"max_distance must be >= 1 or None, got {max_distance}")
    _check_item_range("target", target[:, None], n_items, allow_pad=False)
    _check_item_range("history", history, n_items, allow_pad=True)
    H = history.shape[1]
    ctx = history if max_distance is None else history[:, max(0, H - max_distance):]
    tgt = target[:, None].expand_as(ctx)
    keep = (ctx >= 0) & (ctx != tgt)
    a = torch.cat([tgt[keep], ctx[keep]])
    b = torch.cat([ctx[keep], tgt[keep]])
    device = history.device
    out = torch.full((n_items, top_c), -1, dtype=torch.long, device=device)
    if a.numel() == 0:
        return out
    pairs, counts = torch.unique(a * n_items + b, return_counts=True)  # sorted by (a, b)
    pa, pb = pairs // n_items, pairs % n_items
    # Order by a, then count descending, then b: stable sorts from the least significant key.
    order = torch.sort(-counts, stable=True).indices
    order = order[torch.sort(pa[order], stable=True).indices]
    pa, pb = pa[order], pb[order]
    group_start = torch.searchsorted(pa, pa, right=False)
    rank = torch.arange(pa.numel(), device=device) - group_start
    sel = rank < top_c
    out[pa[sel], rank[sel]] = pb[sel]
    return out


class LogsSampler(Sampler):
    """Items the user was exposed to: their own recent history, then co-occurring items, then random.

    For each example, up to ``n_aug`` distinct items of the last ``window`` history positions other than
    the positive are taken (``pick="random"``: a uniform subset; ``"recent"``: the most recent ones). When
    the window holds fewer than ``n_aug`` such items, the remaining slots take the positive's top
    co-occurring items (``cooccurrence[positive]``, in rank order, skipping items already chosen and the
    user's items: the history window and, given ``user_items``, every training item), then uniform random items
    outside the user's items. Items with the positive's SID are skipped throughout.
    ``last_stats`` reports ``from_history``, ``filled_cooc`` and ``filled_random`` for the batch.

    Args:
        n_items: catalogue size.
        cooccurrence: ``LongTensor[n_items, C]`` top co-occurring items per item, -1 padded
            (:func:`build_cooccurrence`), or ``None`` to go straight to random filling.
        window: number of most recent history positions to draw from (``None``: the whole history).
        pick: ``"random"`` or ``"recent"``.
        user_items, item_codes: see :class:`Sampler`.
    """

    name = "logs"

    def __init__(self, n_items: int, cooccurrence: torch.Tensor | None = None, window: int | None = None,
                 pick: str = "random", *, user_items: UserItems | None = None, item_codes: Any = None):
        super().__init__(n_items, user_items=user_items, item_codes=item_codes)
        if pick not in ("random", "recent"):
            raise SamplerError(f"LogsSampler.pick must be 'random' or 'recent', got {pick!r}")
        if window is not None and int(window) < 1:
            raise SamplerError(f"LogsSampler.window must be >= 1 or None, got {window}")
        if cooccurrence is not None:
            cooccurrence = _as_long("cooccurrence", cooccurrence)
            if cooccurrence.dim() != 2 or cooccurrence.shape[0] != self.n_items:
                raise SamplerError(f"cooccurrence must be [n_items={self.n_items}, C], got "
                                   f"{tuple(cooccurrence.shape)}")
            _check_item_range("cooccurrence", cooccurrence, self.n_items, allow_pad=True)
        self.cooccurrence = cooccurrence
        self.window = None if window is None else int(window)
        self.pick = pick

    @classmethod
    def from_split(cls, split: Any, n_items: int, top_c: int = 20, max_distance: int | None = None,
                   **kw: Any) -> "LogsSampler":
        """Build the co-occurrence lists from a training ``Split`` (``history``, ``target``) once."""
        cooc = build_cooccurrence(split.history, split.target, n_items, top_c=top_c, max_distance=max_distance)
        return cls(n_items, cooc, **kw)

    def _sample(self, batch, n_aug, generator):
        device = batch.device
        B = batch.size
        hist = batch.history if self.window is None else batch.history[:, -self.window:]
        W = hist.shape[1]
        forbidden = self._forbidden(batch)
        # Keep the most recent occurrence of each item, never the positive nor an item with its SID.
        last = _first_occurrence(hist.flip(1)).flip(1)
        ok = (hist >= 0) & ~_member(hist, forbidden) & last
        if self.pick == "random":
            keys = _rand((B, W), generator, device)
        else:
            keys = torch.arange(W, device=device, dtype=torch.float32).expand(B, W)
        keys = torch.where(ok, keys, torch.full_like(keys, -1.0))
        m = min(n_aug, W)
        items = torch.full((B, n_aug), -1, dtype=torch.long, device=device)
        if m > 0:
            top_keys, top = keys.topk(m, dim=1)
            picked = torch.where(top_keys >= 0, hist.gather(1, top), torch.full_like(top, -1))
            items[:, :m] = picked
        from_history = int((items >= 0).sum())
        filled_cooc = 0
        seen = self._seen(batch, forbidden)
        if self.cooccurrence is not None and bool((items < 0).any()):
            # Gather on the table's device, move only the [B, C] rows. Co-occurring items the user already
            # has are skipped: only the history picks above may be the user's own items.
            cooc = self.cooccurrence[batch.positive.to(self.cooccurrence.device)].to(device)
            items, got = _fill_slots(items, cooc, seen)
            filled_cooc = int(got.sum())
        items, got = _random_fill(items, seen, self.n_items, generator, what="LogsSampler random fill")
        self.last_stats = {"from_history": from_history, "filled_cooc": filled_cooc,
                           "filled_random": int(got.sum())}
        return items


# --------------------------------------------------------------------------------------------------
# CM curriculum
# --------------------------------------------------------------------------------------------------

class CurriculumSampler(Sampler):
    """Collaborative-model curriculum: easy (low CM score) items early, hard (high score) items late.

    Per example the pool is the scorer's top-``pool_size`` items plus ``n_random`` uniform random items
    (the positive and its SID group, duplicates and, with ``exclude_history``, the user's items removed),
    sorted by CM score ascending. The pick quantile ``q = start_quantile + (end_quantile - start_quantile) · p``
    moves linearly with training progress ``p`` (:meth:`set_progress`). A window of ``ceil(window_factor · n_aug)``
    consecutive pool positions centred at rank ``q · (n_valid - 1)`` (shifted to stay inside the pool) is
    formed, and ``n_aug`` distinct items are drawn uniformly from it. Rows whose pool holds fewer than
    ``n_aug`` items are topped up with random items (``last_stats["filled_random"]``).

    Args:
        scorer: a ``CMScorer``: ``score(example_idx[B], items[B, T]) -> float[B, T]`` and
            ``topk_pool(example_idx[B], m) -> items[B, m]`` (-1 allowed as padding).
        n_items: catalogue size.
        pool_size: M, the number of CM top items in the pool.
        n_random: number of random items added to the pool.
        start_quantile, end_quantile: pick quantile at ``p = 0`` and ``p = 1`` (0 = lowest score).
        window_factor: window width as a multiple of ``n_aug`` (>= 1; 1 = exactly the nearest items).
        exclude_history: keep the user's items (history window and, given ``user_items``, all training
            items) out of the pool.
        user_items, item_codes: see :class:`Sampler`.
    """

    name = "cm_curriculum"

    def __init__(self, scorer: Any, n_items: int, pool_size: int = 100, n_random: int = 100,
                 start_quantile: float = 0.0, end_quantile: float = 1.0, window_factor: float = 2.0,
                 exclude_history: bool = True, *, user_items: UserItems | None = None, item_codes: Any = None):
        super().__init__(n_items, user_items=user_items, item_codes=item_codes)
        for meth in ("score", "topk_pool"):
            if not callable(getattr(scorer, meth, None)):
                raise SamplerError(f"CurriculumSampler needs a scorer (a CMScorer) with a {meth}() method, got "
                                   f"{type(scorer).__name__}")
        if pool_size < 0 or n_random < 0 or pool_size + n_random < 1:
            raise SamplerError(f"pool_size and n_random must be >= 0 with a non-empty pool, got "
                               f"{pool_size} and {n_random}")
        for nm, q in (("start_quantile", start_quantile), ("end_quantile", end_quantile)):
            if not (0.0 <= float(q) <= 1.0):
                raise SamplerError(f"CurriculumSampler.{nm} must be in [0, 1], got {q}")
        if not (window_factor >= 1.0 and math.isfinite(window_factor)):
            raise SamplerError(f"CurriculumSampler.window_factor must be >= 1, got {window_factor}")
        self.scorer = scorer
        self.pool_size = int(pool_size)
        self.n_random = int(n_random)
        self.start_quantile = float(start_quantile)
        self.end_quantile = float(end_quantile)
        self.window_factor = float(window_factor)
        self.exclude_history = bool(exclude_history)
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        self.progress = _check_progress(progress)

    @property
    def quantile(self) -> float:
        """The current pick quantile."""
        return self.start_quantile + (self.end_quantile - self.start_quantile) * self.progress

    def state_dict(self) -> dict[str, Any]:
        return {"progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.progress = _check_progress(state["progress"])

    def _pool(self, batch: ExampleBatch, excl: torch.Tensor, generator) -> torch.Tensor:
        device = batch.device
        B = batch.size
        m = min(self.pool_size, self.n_items)
        if m > 0:
            with torch.no_grad():
                top = self.scorer.topk_pool(batch.example, m)
            top = _as_long("scorer.topk_pool output", top, device)
            if top.shape != (B, m):
                raise SamplerError(f"scorer.topk_pool(example_idx[{B}], {m}) returned {tuple(top.shape)}, "
                                   f"expected {(B, m)}")
            _check_item_range("scorer.topk_pool output", top, self.n_items, allow_pad=True)
            top = torch.where(_member(top, excl) | ~_first_occurrence(top), torch.full_like(top, -1), top)
        else:
            top = torch.empty((B, 0), dtype=torch.long, device=device)
        rand = torch.full((B, self.n_random), -1, dtype=torch.long, device=device)
        rand, _ = _random_fill(rand, torch.cat([excl, top], dim=1), self.n_items, generator, strict=False)
        return torch.cat([top, rand], dim=1)

    def _sample(self, batch, n_aug, generator):
        device = batch.device
        B = batch.size
        forbidden = self._forbidden(batch)
        seen = self._seen(batch, forbidden)
        pool = self._pool(batch, seen if self.exclude_history else forbidden, generator)
        P = pool.shape[1]
        valid = pool >= 0
        with torch.no_grad():
            scores = self.scorer.score(batch.example, pool.clamp(min=0))
        if not isinstance(scores, torch.Tensor) or scores.shape != (B, P):
            raise SamplerError(f"scorer.score returned {getattr(scores, 'shape', type(scores))}, expected "
                               f"{(B, P)}")
        scores = scores.to(device=device, dtype=torch.float32)
        bad = valid & ~torch.isfinite(scores)
        if bool(bad.any()):
            rows = bad.any(dim=1).nonzero().flatten()
            raise SamplerError(f"scorer.score returned NaN/inf for pool items of batch row(s) "
                               f"{rows[:5].tolist()}")
        # Invalid pool entries sort after every valid one.
        scores = torch.where(valid, scores, torch.full_like(scores, float("inf")))
        order = torch.sort(scores, dim=1, stable=True).indices
        sorted_pool = pool.gather(1, order)
        n_valid = valid.sum(dim=1)
        w = min(max(n_aug, math.ceil(self.window_factor * n_aug)), P)
        w_row = torch.clamp(n_valid, max=w)
        center = self.quantile * (n_valid - 1).clamp(min=0).to(torch.float32)
        lo = torch.round(center - (w_row - 1).to(torch.float32) / 2).long()
        lo = torch.minimum(lo.clamp(min=0), (n_valid - w_row).clamp(min=0))
        offs = torch.arange(w, device=device)
        in_win = offs[None, :] < w_row[:, None]
        cand = sorted_pool.gather(1, (lo[:, None] + offs[None, :]).clamp(max=P - 1))
        cand = torch.where(in_win, cand, torch.full_like(cand, -1))
        keys = torch.where(cand >= 0, _rand((B, w), generator, device), torch.full((B, w), -1.0, device=device))
        cand = cand.gather(1, keys.argsort(dim=1, descending=True))
        items = torch.full((B, n_aug), -1, dtype=torch.long, device=device)
        items, got_pool = _fill_slots(items, cand)
        items, got_rand = _random_fill(items, seen, self.n_items, generator,
                                       what="CurriculumSampler random fill")
        self.last_stats = {"from_pool": int(got_pool.sum()), "filled_random": int(got_rand.sum())}
        return items


# --------------------------------------------------------------------------------------------------
# On-policy
# --------------------------------------------------------------------------------------------------

class OnPolicySampler(Sampler):
    """The current model's own recommendations: its trie-constrained beam search, or samples of it.

    ``mode="beam"`` calls ``decode_fn(history[B, H], k) -> items[B, k]`` (best first, -1 where a slot holds
    no item); ``mode="sample"`` calls ``sample_fn(history[B, H], k, temperature, generator) -> items[B, k]``
    (``k`` independent draws per user, repeats allowed, from the policy with its logits divided by
    ``temperature``; ``generator`` is the one given to :meth:`sample`, so the draws follow the run's seed).
    Either runs under ``torch.no_grad()`` with ``k = n_aug + extra``. The first ``n_aug`` distinct items that
    are neither the positive nor share its SID nor (with ``exclude_history``, the default) are the user's items
    are kept, in the returned order, and any remaining slot is filled with uniform random items outside the
    user's items (``last_stats["filled_random"]``). A recommender's own top items are often items the user
    already has, so with ``exclude_history`` the default ``extra`` also covers the history window's width ``H``:
    the decoder is asked for enough items that the history it may return does not leave the slots to random.

    Args:
        decode_fn: the beam-search callable (needed with ``mode="beam"``).
        n_items: catalogue size.
        extra: how many more items than ``n_aug`` to request (``None``: 1 with ``"beam"``, where only the
            positive may have to be dropped; ``n_aug`` with ``"sample"``, whose draws repeat; either plus the
            batch's history width ``H`` with ``exclude_history``).
        exclude_history: also drop items the user already has (history window and, given ``user_items``,
            all training items), as every other sampler's augmentations do (default ``True``). ``False``
            keeps the decoder's picks among the user's items (the positive and its SID still dropped).
        mode: ``"beam"`` (default) or ``"sample"``.
        sample_fn: the sampling callable (needed with ``mode="sample"``).
        temperature: sampling temperature (> 0), passed to ``sample_fn``.
        user_items, item_codes: see :class:`Sampler`.
    """

    name = "onpolicy"

    def __init__(self, decode_fn: Callable[[torch.Tensor, int], torch.Tensor] | None, n_items: int,
                 extra: int | None = None, exclude_history: bool = True, *, mode: str = "beam",
                 sample_fn: Callable[..., torch.Tensor] | None = None, temperature: float = 1.0,
                 user_items: UserItems | None = None, item_codes: Any = None):
        super().__init__(n_items, user_items=user_items, item_codes=item_codes)
        if mode not in ("beam", "sample"):
            raise SamplerError(f"OnPolicySampler.mode must be 'beam' or 'sample', got {mode!r}")
        fn, fn_name = (decode_fn, "decode_fn") if mode == "beam" else (sample_fn, "sample_fn")
        if not callable(fn):
            raise SamplerError(f"OnPolicySampler(mode={mode!r}).{fn_name} must be callable, got "
                               f"{type(fn).__name__}")
        if extra is not None and int(extra) < 0:
            raise SamplerError(f"OnPolicySampler.extra must be >= 0, got {extra}")
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise SamplerError(f"OnPolicySampler.temperature must be finite and > 0, got {temperature}")
        self.decode_fn = decode_fn
        self.sample_fn = sample_fn
        self.mode = mode
        self.extra = None if extra is None else int(extra)
        self.temperature = float(temperature)
        self.exclude_history = bool(exclude_history)

    def _sample(self, batch, n_aug, generator):
        device = batch.device
        B = batch.size
        if self.extra is not None:
            extra = self.extra
        else:
            extra = 1 if self.mode == "beam" else n_aug
            if self.exclude_history:
                extra += int(batch.history.shape[1])
        k = n_aug + extra
        with torch.no_grad():
            if self.mode == "beam":
                what = "decode_fn"
                decoded = self.decode_fn(batch.history, k)
            else:
                what = "sample_fn"
                decoded = self.sample_fn(batch.history, k, self.temperature, generator)
        decoded = _as_long(f"{what} output", decoded, device)
        if decoded.shape != (B, k):
            raise SamplerError(f"{what}(history[{B}, {batch.history.shape[1]}], {k}) returned "
                               f"{tuple(decoded.shape)}, expected {(B, k)}")
        _check_item_range(f"{what} output", decoded, self.n_items, allow_pad=True)
        forbidden = self._forbidden(batch)
        seen = self._seen(batch, forbidden)
        items = torch.full((B, n_aug), -1, dtype=torch.long, device=device)
        items, got = _fill_slots(items, decoded, seen if self.exclude_history else forbidden)
        items, got_rand = _random_fill(items, seen, self.n_items, generator, what="OnPolicySampler random fill")
        self.last_stats = {"from_policy": int(got.sum()), "filled_random": int(got_rand.sum())}
        return items


# --------------------------------------------------------------------------------------------------
# Mixture
# --------------------------------------------------------------------------------------------------

class MixtureSampler(Sampler):
    """A weighted mixture of samplers.

    ``mode="example"``: each example draws one component with probability ∝ weight and takes all its
    ``n_aug`` items from it. ``mode="slot"``: each of an example's ``n_aug`` slots draws a component; the
    example then takes ``n_c`` items from component ``c`` (components in list order, each asked only for
    the rows that need it, items already taken by an earlier component skipped). Slots a component cannot
    supply without repeating an item are filled with uniform random items outside the history
    (``last_stats["filled_random"]``). All draws use the generator passed to :meth:`sample`, which is
    also handed to the components, so the mixture is deterministic for a seed.

    Args:
        components: ``[(sampler, weight), ...]`` with weights >= 0 and a positive sum; every sampler must
            have the mixture's ``n_items``.
        mode: ``"slot"`` (default) or ``"example"``.
        user_items, item_codes: see :class:`Sampler` (for the mixture's own random fill and checks; give
            the components the same).
    """

    name = "mixture"

    def __init__(self, components: Sequence[tuple[Sampler, float]], mode: str = "slot", *,
                 user_items: UserItems | None = None, item_codes: Any = None):
        comps = list(components)
        if not comps:
            raise SamplerError("MixtureSampler needs at least one (sampler, weight) component")
        if mode not in ("slot", "example"):
            raise SamplerError(f"MixtureSampler.mode must be 'slot' or 'example', got {mode!r}")
        for i, c in enumerate(comps):
            if not (isinstance(c, (tuple, list)) and len(c) == 2 and isinstance(c[0], Sampler)):
                raise SamplerError(f"MixtureSampler component {i} must be (Sampler, weight), got {c!r}")
            if not (math.isfinite(float(c[1])) and float(c[1]) >= 0):
                raise SamplerError(f"MixtureSampler component {i} ({c[0].name}) weight must be finite and "
                                   f">= 0, got {c[1]}")
        n_items = {c[0].n_items for c in comps}
        if len(n_items) != 1:
            raise SamplerError(f"MixtureSampler components disagree on n_items: {sorted(n_items)}")
        weights = [float(c[1]) for c in comps]
        if sum(weights) <= 0:
            raise SamplerError("MixtureSampler weights must have a positive sum")
        super().__init__(n_items.pop(), user_items=user_items, item_codes=item_codes)
        self.samplers = [c[0] for c in comps]
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.mode = mode

    def set_progress(self, progress: float) -> None:
        _check_progress(progress)
        for s in self.samplers:
            s.set_progress(progress)

    def state_dict(self) -> dict[str, Any]:
        return {"components": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        comps = state["components"]
        if len(comps) != len(self.samplers):
            raise SamplerError(f"MixtureSampler.load_state_dict: {len(comps)} component states for "
                               f"{len(self.samplers)} components")
        for s, st in zip(self.samplers, comps):
            s.load_state_dict(st)

    def _draw(self, shape: tuple[int, int], generator, device) -> torch.Tensor:
        """Component index per (row, draw), ``LongTensor[shape]``, by inverse CDF of the weights."""
        cdf = torch.cumsum(self.weights / self.weights.sum(), 0).to(device=device, dtype=torch.float64)
        u = _rand(shape, generator, device).to(torch.float64)
        return torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=len(self.samplers) - 1)

    def _sample(self, batch, n_aug, generator):
        device = batch.device
        B = batch.size
        n_comp = len(self.samplers)
        stats: dict[str, int] = {}
        items = torch.full((B, n_aug), -1, dtype=torch.long, device=device)
        if self.mode == "example":
            choice = self._draw((B, 1), generator, device)[:, 0]
            for c, s in enumerate(self.samplers):
                rows = (choice == c).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                items[rows] = s.sample(batch.subset(rows), n_aug, generator)
                stats[f"{c}:{s.name}"] = int(rows.numel()) * n_aug
            self.last_stats = stats
            return items
        slots = self._draw((B, n_aug), generator, device)
        counts = torch.stack([(slots == c).sum(dim=1) for c in range(n_comp)], dim=1)  # [B, n_comp]
        for c, s in enumerate(self.samplers):
            want = counts[:, c]
            rows = (want > 0).nonzero().flatten()
            if rows.numel() == 0:
                continue
            # Ask for enough extra items that skipping those already taken still leaves `want`.
            taken = (items[rows] >= 0).sum(dim=1)
            request = min(n_aug, int((want[rows] + taken).max()))
            got_items = s.sample(batch.subset(rows), request, generator)
            sub, got = _fill_slots(items[rows], got_items, limit=want[rows])
            items = items.index_copy(0, rows, sub)
            stats[f"{c}:{s.name}"] = int(got.sum())
        items, got_rand = _random_fill(items, self._seen(batch, self._forbidden(batch)), self.n_items,
                                       generator, what="MixtureSampler random fill")
        stats["filled_random"] = int(got_rand.sum())
        self.last_stats = stats
        return items


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

SAMPLERS: dict[str, type[Sampler]] = {
    "logs": LogsSampler,
    "random": RandomSampler,
    "cm_curriculum": CurriculumSampler,
    "onpolicy": OnPolicySampler,
    "mixture": MixtureSampler,
}


def make_sampler(name: str, **kw: Any) -> Sampler:
    """Build a sampler by name (``logs``, ``random``, ``cm_curriculum``, ``onpolicy``, ``mixture``).

    Keyword arguments go to the class's constructor, e.g. ``make_sampler("random", n_items=n)``,
    ``make_sampler("cm_curriculum", scorer=cm, n_items=n, pool_size=100)``,
    ``make_sampler("onpolicy", decode_fn=f, n_items=n)``, ``make_sampler("mixture", components=[...])``.
    Every sampler also takes ``user_items=UserItems(train_split)`` and ``item_codes=catalog.codes``.
    ``make_sampler("logs", split=train, n_items=n, top_c=20)`` builds the co-occurrence lists from a
    training split first.
    """
    if name not in SAMPLERS:
        raise SamplerError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    cls = SAMPLERS[name]
    if cls is LogsSampler and "split" in kw:
        split = kw.pop("split")
        return LogsSampler.from_split(split, **kw)
    try:
        return cls(**kw)
    except TypeError as e:
        raise SamplerError(f"make_sampler({name!r}): bad arguments {sorted(kw)}: {e}") from e
