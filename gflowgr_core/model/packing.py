"""Packed trajectory trees: many training prefixes and all their trajectories in one exact forward.

The per-prefix prompt of an example is ``[BOS] + prefix + history SIDs + suffix + [SEP]`` followed, per
trajectory, by the codes ``c_1 .. c_{L-1}``. Examples of one trunk window
(:func:`gflowgr_core.data.windows.trunk_windows`) have histories that extend one another, so one packed
*segment* holds::

    [BOS] prefix  h_0 .. h_{n-1}                     shared trunk (the longest history of the segment)
      suffix SEP  c_1 .. c_{L-1} (traj 0) ...        example with history h_0 .. h_{k-1}: its decision
                                                     tokens, then the branch of each trajectory
      suffix SEP  ...                                next example of the window

Explicit position ids give every token the position it has in its own per-prefix prompt, and a 4D mask
lets a token see exactly what it sees there: a trunk token its predecessors in the trunk; an example's
decision token the first ``1 + |prefix| + L*k`` trunk tokens and its own earlier decision tokens; a branch
token additionally its own trajectory's earlier codes. Hidden states at every decision position are
therefore those of the per-prefix prompts. Segments are packed first-fit-decreasing into rows of a fixed
token capacity, with a block-diagonal mask between them; padding tokens see only themselves.

Example (L = 3, no template, one window with examples of histories ``[A]`` and ``[A, B]``, one trajectory
each; ``x`` = may attend)::

    token   pos  BOS a1 a2 a3 b1 b2 b3 SEP c1 c2 SEP c1 c2
    BOS      0    x
    a1..a3  1-3   x  x..
    b1..b3  4-6   x  x  x  x  x..
    SEP      4    x  x  x  x            x                      example 1 (history A)
    c1, c2  5,6   x  x  x  x            x  x..
    SEP      7    x  x  x  x  x  x  x           x              example 2 (history A, B)
    c1, c2  8,9   x  x  x  x  x  x  x           x  x..
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.windows import left_align

__all__ = ["PackedLayout", "pack_trajectories", "attention_mask_for", "PackingUnsupported"]


class PackingUnsupported(RuntimeError):
    """The wrapped model cannot run packed batches (no 4D-mask support); train with ``packing: false``."""


@dataclass
class PackedLayout:
    """Token rows of a packed batch and where each example's decision states sit in them.

    Attributes:
        input_ids, position_ids: ``LongTensor[R, C]``.
        allowed: ``BoolTensor[R, C, C]``; ``allowed[r, j, i]``: token ``j`` may attend token ``i``.
        sep_index: ``LongTensor[B]`` flat index (into ``R * C``) of each example's ``SEP`` token.
        branch_index: ``LongTensor[B, T, L-1]`` flat index of code token ``c_{l+1}`` of trajectory ``t``.
        tokens: real (non-padding) tokens in the rows.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    sep_index: torch.Tensor
    branch_index: torch.Tensor
    tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def _segments(items: torch.Tensor, lengths: torch.Tensor, window: torch.Tensor | None, max_members: int):
    """Group a batch's examples into segments sharing a trunk.

    Returns ``(order, seg_of_sorted, first_of_seg, trunk_row)``: ``order`` sorts the examples by
    (window, history length); ``seg_of_sorted[j]`` is the segment of sorted example ``j``;
    ``trunk_row[s]`` the example (original index) whose history is segment ``s``'s trunk. A window with more
    than ``max_members`` examples is cut into consecutive segments of at most that many (each with its own
    trunk), so segments fit a row.
    """
    B = items.shape[0]
    if window is None:
        order = torch.arange(B, device=items.device)
        seg = order.clone()
    else:
        window = torch.as_tensor(window, device=items.device).long()
        if window.shape != (B,):
            raise ValueError(f"window must be [B={B}], got {tuple(window.shape)}")
        key = window * (items.shape[1] + 1) + lengths
        order = torch.argsort(key, stable=True)
        w = window.index_select(0, order)
        starts = torch.cat([torch.ones(1, dtype=torch.bool, device=w.device), w[1:] != w[:-1]])
        first = torch.cummax(torch.where(starts, torch.arange(B, device=w.device), 0), 0).values
        chunk = (torch.arange(B, device=w.device) - first) % max(1, max_members) == 0
        seg = (starts | chunk).long().cumsum(0) - 1
    n_seg = int(seg[-1]) + 1
    last = torch.zeros(n_seg, dtype=torch.long, device=items.device)
    last.scatter_reduce_(0, seg, torch.arange(B, device=items.device), reduce="amax", include_self=False)
    trunk_row = order.index_select(0, last)
    # Every member's history must be a prefix of its trunk: a wrong window id would silently change the
    # prompt an example sees.
    trunk_items = items.index_select(0, trunk_row.index_select(0, seg))
    member_items = items.index_select(0, order)
    cols = torch.arange(items.shape[1], device=items.device)
    within = cols[None, :] < lengths.index_select(0, order)[:, None]
    bad = ((trunk_items != member_items) & within).any(1)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise ValueError(f"example {int(order[j])} shares window {int(window[order[j]])} with example "
                         f"{int(trunk_row[seg[j]])} but its history is not a prefix of that example's history")
    return order, seg, n_seg, trunk_row


def _first_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Row and offset of every segment, packing the longest first into the first row it fits."""
    n = len(lengths)
    row = np.empty(n, dtype=np.int64)
    offset = np.empty(n, dtype=np.int64)
    free = np.full(n, capacity, dtype=np.int64)  # at most one row per segment
    used = 0
    for s in np.argsort(-lengths, kind="stable"):  # one step per segment (a user window), not per example
        r = int(np.argmax(free[: used + 1] >= lengths[s])) if used else 0
        if free[r] < lengths[s]:
            r = used
        if r == used:
            used += 1
        row[s], offset[s] = r, capacity - free[r]
        free[r] -= lengths[s]
    return row, offset, used


def _place_segments(seg_len: torch.Tensor, row_tokens: int, rows: int | None) -> tuple[int, int, torch.Tensor]:
    """Rows for segments of ``seg_len`` tokens: ``(capacity, n_rows, seg_start)``, the row length, the number
    of rows and each segment's flat start (into ``n_rows * capacity``)."""
    seg_len_np = seg_len.cpu().numpy()
    capacity = int(row_tokens)
    if rows is None:
        capacity = max(capacity, int(seg_len_np.max()))
    elif int(seg_len_np.max()) > capacity:
        raise ValueError(f"a segment of {int(seg_len_np.max())} tokens does not fit rows of {capacity}")
    seg_row_np, seg_off_np, used = _first_fit_decreasing(seg_len_np, capacity)
    n_rows = used if rows is None else int(rows)
    if n_rows < used:
        raise ValueError(f"the batch needs {used} rows of {capacity} tokens, only {n_rows} are allowed")
    seg_row = torch.from_numpy(seg_row_np).to(seg_len.device)
    return capacity, n_rows, torch.from_numpy(seg_off_np).to(seg_len.device) + seg_row * capacity


def _trunk_tokens(items: torch.Tensor, trunk_row: torch.Tensor, shared_len: torch.Tensor, seg_start: torch.Tensor,
                  item_tokens: torch.Tensor, prefix: torch.Tensor, bos_id: int, L: int):
    """The shared tokens ``[BOS] prefix h_0 .. h_{n-1}`` of every segment (each history item as its ``L`` code
    tokens): ``(flat, ids, seg, p)``, each token's flat index in the rows, id, segment and in-prompt position."""
    device = items.device
    n_pre, H = prefix.numel(), items.shape[1]
    seg = torch.repeat_interleave(torch.arange(shared_len.shape[0], device=device), shared_len)
    first = torch.cumsum(shared_len, 0) - shared_len
    p = torch.arange(int(shared_len.sum()), device=device) - first.index_select(0, seg)
    k = (p - 1 - n_pre).clamp_min(0)
    flat_item = trunk_row.index_select(0, seg) * H + (k // L).clamp_max(H - 1)
    trunk_items = items.reshape(-1).index_select(0, flat_item).clamp_min(0)
    ids = item_tokens.reshape(-1).index_select(0, trunk_items * L + k % L)
    if n_pre:
        ids = torch.where((p >= 1) & (p <= n_pre), prefix.index_select(0, (p - 1).clamp(0, n_pre - 1)), ids)
    ids = torch.where(p == 0, torch.full_like(ids, bos_id), ids)
    return seg_start.index_select(0, seg) + p, ids, seg, p


def _member_tokens(codes: torch.Tensor, base: torch.Tensor, level_tokens: torch.Tensor, suffix: torch.Tensor,
                   sep_id: int):
    """Each example's block ``suffix SEP`` then ``c_1 .. c_{L-1}`` of every trajectory, for ``codes [B, T, L]``
    and ``base [B, 1]``, the in-prompt position of the example's first decision token: ``(ids [B, M],
    pos [B, M], traj [M])``, ``traj`` being each block token's trajectory (``-1`` on the decision tokens)."""
    B, T, L = codes.shape
    device = codes.device
    n_suf = suffix.numel()
    n_dec, branch = n_suf + 1, L - 1
    q = torch.arange(n_dec + T * branch, device=device)
    r = (q - n_dec).clamp_min(0)
    traj = torch.where(q >= n_dec, r // max(branch, 1), torch.full_like(q, -1))
    lvl = r % max(branch, 1)
    if branch:
        code = codes.reshape(B, T * L).index_select(1, traj.clamp_min(0) * L + lvl)      # [B, M]
        k_max = level_tokens.shape[1]
        br_ids = level_tokens.reshape(-1).index_select(0, (lvl[None, :] * k_max + code).reshape(-1)).view(B, -1)
    else:
        br_ids = torch.zeros(B, q.numel(), dtype=torch.long, device=device)
    dec_ids = torch.full((q.numel(),), sep_id, dtype=torch.long, device=device)
    if n_suf:
        dec_ids = torch.where(q < n_suf, suffix.index_select(0, q.clamp_max(n_suf - 1)), dec_ids)
    ids = torch.where((q >= n_dec)[None, :], br_ids, dec_ids[None, :])
    pos = base + torch.where(q >= n_dec, n_dec + lvl, q)[None, :]
    return ids, pos, traj


@dataclass
class _Slots:
    """What each slot of the packed rows (flat over ``R * C``) holds: its token and the attributes the mask is
    built from."""

    ids: torch.Tensor        # token id (pad_id on padding)
    pos: torch.Tensor        # position id
    seg: torch.Tensor        # segment, -1 on padding
    trunk_pos: torch.Tensor  # position in the segment's trunk, -1 off the trunk
    limit: torch.Tensor      # how many of the segment's trunk tokens this token sees
    member: torch.Tensor     # example (in sorted order) of a decision or branch token, -1 elsewhere
    traj: torch.Tensor       # trajectory of a branch token, -1 elsewhere

    @classmethod
    def empty(cls, size: int, pad_id: int, device) -> "_Slots":
        def full(value):
            return torch.full((size,), value, dtype=torch.long, device=device)

        return cls(ids=full(pad_id), pos=full(0), seg=full(-1), trunk_pos=full(-1), limit=full(0), member=full(-1),
                   traj=full(-1))

    def fill(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        """Write each of ``values`` (broadcast to ``index``'s shape) at the slots ``index``."""
        flat = index.reshape(-1)
        for name, value in values.items():
            # index_copy_ rather than x[i] = v: advanced-index assignment is far slower on the CPU.
            getattr(self, name).index_copy_(0, flat, value.expand(index.shape).reshape(-1))


def _attention_mask(slots: _Slots, n_rows: int, capacity: int, T: int) -> torch.Tensor:
    """``allowed [R, C, C]`` of the filled rows (see the module docstring), from two integer keys per token.

    Few ``[R, C, C]`` ops, as this runs every step: a trunk token is visible to token ``j`` when its key
    ``seg * C + trunk position`` lies in ``j``'s range ``[seg_j * C, seg_j * C + limit_j)``; an example's own
    token when its (example, trajectory) key is ``j``'s decision key (trajectory -1) or ``j``'s own trajectory
    key, and it comes no later than ``j``. A padding token sees only itself.
    """
    def grid(x):
        return x.view(n_rows, capacity)

    i32 = torch.int32
    seg, member, tr = slots.seg, slots.member, slots.traj
    on_trunk, in_member = slots.trunk_pos >= 0, member >= 0
    trunk_key = grid(torch.where(on_trunk, seg * capacity + slots.trunk_pos, -1).to(i32))
    lo = grid(torch.where(seg >= 0, seg * capacity, 0).to(i32))
    hi = grid(torch.where(seg >= 0, seg * capacity + slots.limit, 0).to(i32))
    own_key = grid(torch.where(in_member, member * (T + 1) + tr + 1, -1).to(i32))
    dec_key = grid(torch.where(in_member, member * (T + 1), -2).to(i32))
    traj_key = grid(torch.where(in_member & (tr >= 0), member * (T + 1) + tr + 1, -2).to(i32))
    allowed = (trunk_key[:, None, :] >= lo[:, :, None]) & (trunk_key[:, None, :] < hi[:, :, None])
    qi = torch.arange(capacity, device=seg.device)
    causal = qi[None, :] <= qi[:, None]                                  # [C(j), C(i)]
    own = (own_key[:, None, :] == dec_key[:, :, None]) | (own_key[:, None, :] == traj_key[:, :, None])
    allowed |= own & causal[None]
    pad = grid(seg < 0)
    allowed |= torch.eye(capacity, dtype=torch.bool, device=seg.device)[None] & pad[:, :, None]
    return allowed


def pack_trajectories(history: torch.Tensor, codes: torch.Tensor, *, item_tokens: torch.Tensor,
                      level_tokens: torch.Tensor, bos_id: int, sep_id: int, pad_id: int,
                      prefix: torch.Tensor, suffix: torch.Tensor, window: torch.Tensor | None = None,
                      row_tokens: int = 256, rows: int | None = None) -> PackedLayout:
    """Build the packed layout of ``B`` examples with ``T`` trajectories each.

    Args:
        history: ``LongTensor[B, H]`` item ids, ``-1`` = no item.
        codes: ``LongTensor[B, T, L]`` SID codes of the trajectories.
        item_tokens: ``[n_items, L]`` token id of each item's codes; ``level_tokens``: ``[L, K_max]``.
        bos_id, sep_id, pad_id: special token ids; ``prefix``/``suffix``: template ids (may be empty).
        window: ``LongTensor[B]`` trunk-window id per example (examples with equal ids share one trunk;
            each must be a prefix of the longest); ``None``: every example its own segment.
        row_tokens: row capacity ``C``; longer windows are cut into several segments (raised to the longest
            segment when a single example does not fit, unless ``rows`` is given).
        rows: a fixed number of rows (static shapes); ``None`` uses as many as the packing needs.
    """
    device = history.device
    B, T, L = codes.shape
    items, lengths = left_align(history)
    n_pre, n_suf = prefix.numel(), suffix.numel()
    n_dec = n_suf + 1
    branch = L - 1
    member_len = n_dec + T * branch

    # Segments and their places: members per segment such that one with the longest possible trunk fits a row.
    max_members = max(1, (int(row_tokens) - (1 + n_pre + L * items.shape[1])) // member_len)
    order, seg_sorted, n_seg, trunk_row = _segments(items, lengths, window, max_members)
    shared_len = 1 + n_pre + L * lengths.index_select(0, trunk_row)  # [S]
    members = torch.bincount(seg_sorted, minlength=n_seg)            # [S]
    capacity, n_rows, seg_start = _place_segments(shared_len + members * member_len, row_tokens, rows)

    # Sorted example j's block follows its segment's trunk and the segment's earlier members.
    rank = torch.arange(B, device=device) - (torch.cumsum(members, 0) - members).index_select(0, seg_sorted)
    block = (seg_start.index_select(0, seg_sorted) + shared_len.index_select(0, seg_sorted)
             + rank * member_len)                                             # [B]
    base = 1 + n_pre + L * lengths.index_select(0, order)[:, None]            # [B, 1]

    slots = _Slots.empty(n_rows * capacity, pad_id, device)
    sh_flat, sh_ids, sh_seg, p = _trunk_tokens(items, trunk_row, shared_len, seg_start, item_tokens, prefix,
                                               bos_id, L)
    slots.fill(sh_flat, ids=sh_ids, pos=p, seg=sh_seg, trunk_pos=p, limit=p + 1)
    m_ids, m_pos, traj = _member_tokens(codes.index_select(0, order), base, level_tokens, suffix, sep_id)
    slots.fill(block[:, None] + torch.arange(member_len, device=device)[None, :], ids=m_ids, pos=m_pos,
               seg=seg_sorted[:, None], limit=base, member=torch.arange(B, device=device)[:, None],
               traj=traj[None, :])

    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=device)
    sep_flat = block + n_suf
    br_flat = (block[:, None] + n_dec + torch.arange(T * branch, device=device)[None, :]).view(B, T, branch)
    return PackedLayout(input_ids=slots.ids.view(n_rows, capacity), position_ids=slots.pos.view(n_rows, capacity),
                        allowed=_attention_mask(slots, n_rows, capacity, T),
                        sep_index=sep_flat.index_select(0, inverse), branch_index=br_flat.index_select(0, inverse),
                        tokens=int(sh_flat.numel() + B * member_len))


def attention_mask_for(model, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask ``[R, 1, C, C]`` in the form ``model``'s attention implementation reads.

    ``sdpa`` takes booleans; ``eager`` adds the mask to the attention scores, so it gets ``0`` /
    dtype-minimum, and so does ``sdpa`` on the CPU, whose fused kernel would otherwise turn a boolean mask into
    that additive one again in every layer, forward and backward (``dtype`` must then be the model's compute
    dtype). Flash-attention kernels take no arbitrary masks.
    """
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa" and allowed.device.type != "cpu":
        return allowed[:, None]
    if impl in ("eager", "sdpa"):
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
    raise PackingUnsupported(
        f"{type(model).__name__} uses attn_implementation={impl!r}, which takes no 4D attention mask: "
        f"load it with attn_implementation='sdpa' or 'eager', or train with packing: false")
