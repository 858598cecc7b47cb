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

    # Members per segment such that a segment with the longest possible trunk fits a row.
    max_members = max(1, (int(row_tokens) - (1 + n_pre + L * items.shape[1])) // member_len)
    order, seg_sorted, n_seg, trunk_row = _segments(items, lengths, window, max_members)
    trunk_len = lengths.index_select(0, trunk_row)                   # [S]
    shared_len = 1 + n_pre + L * trunk_len                           # [S]
    members = torch.bincount(seg_sorted, minlength=n_seg)            # [S]
    seg_len = shared_len + members * member_len
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
    seg_row = torch.from_numpy(seg_row_np).to(device)
    seg_start = torch.from_numpy(seg_off_np).to(device) + seg_row * capacity   # flat start of segment

    # Shared trunk tokens: segment s, in-prompt position p.
    n_shared = int(shared_len.sum())
    sh_seg = torch.repeat_interleave(torch.arange(n_seg, device=device), shared_len)
    sh_first = torch.cumsum(shared_len, 0) - shared_len
    p = torch.arange(n_shared, device=device) - sh_first.index_select(0, sh_seg)
    k = (p - 1 - n_pre).clamp_min(0)
    H = items.shape[1]
    flat_item = trunk_row.index_select(0, sh_seg) * H + (k // L).clamp_max(H - 1)
    trunk_items = items.reshape(-1).index_select(0, flat_item).clamp_min(0)
    sh_ids = item_tokens.reshape(-1).index_select(0, trunk_items * L + k % L)
    if n_pre:
        sh_ids = torch.where((p >= 1) & (p <= n_pre), prefix.index_select(0, (p - 1).clamp(0, n_pre - 1)), sh_ids)
    sh_ids = torch.where(p == 0, torch.full_like(sh_ids, bos_id), sh_ids)
    sh_flat = seg_start.index_select(0, sh_seg) + p

    # Decision and branch tokens: sorted example j, token q of its block.
    rank = torch.arange(B, device=device) - (torch.cumsum(members, 0) - members).index_select(0, seg_sorted)
    n_hist = lengths.index_select(0, order)                                   # [B]
    block = (seg_start.index_select(0, seg_sorted) + shared_len.index_select(0, seg_sorted)
             + rank * member_len)                                             # [B]
    q = torch.arange(member_len, device=device)
    base = 1 + n_pre + L * n_hist[:, None]                                     # [B, 1]
    r = (q - n_dec).clamp_min(0)
    traj = torch.where(q >= n_dec, r // max(branch, 1), torch.full_like(q, -1))   # [member_len]
    lvl = r % max(branch, 1)
    sorted_codes = codes.index_select(0, order).reshape(B, T * L)
    if branch:
        code = sorted_codes.index_select(1, traj.clamp_min(0) * L + lvl)      # [B, member_len]
        k_max = level_tokens.shape[1]
        br_ids = level_tokens.reshape(-1).index_select(0, (lvl[None, :] * k_max + code).reshape(-1)).view(B, -1)
    else:
        br_ids = torch.zeros(B, member_len, dtype=torch.long, device=device)
    dec_ids = torch.full((member_len,), sep_id, dtype=torch.long, device=device)
    if n_suf:
        dec_ids = torch.where(q < n_suf, suffix.index_select(0, q.clamp_max(n_suf - 1)), dec_ids)
    m_ids = torch.where((q >= n_dec)[None, :], br_ids, dec_ids[None, :])
    m_pos = base + torch.where(q >= n_dec, n_dec + lvl, q)[None, :]
    m_flat = block[:, None] + q[None, :]

    # Scatter into rows: ids, positions and the attributes the mask is built from.
    size = n_rows * capacity
    ids = torch.full((size,), pad_id, dtype=torch.long, device=device)
    pos = torch.zeros(size, dtype=torch.long, device=device)
    seg = torch.full((size,), -1, dtype=torch.long, device=device)
    sidx = torch.full((size,), -1, dtype=torch.long, device=device)   # trunk position, -1 off the trunk
    limit = torch.zeros(size, dtype=torch.long, device=device)        # trunk tokens visible to this token
    member = torch.full((size,), -1, dtype=torch.long, device=device)
    tr = torch.full((size,), -1, dtype=torch.long, device=device)
    # index_copy_ rather than x[i] = v: advanced-index assignment is far slower on the CPU.
    for dst, src in ((ids, sh_ids), (pos, p), (seg, sh_seg), (sidx, p), (limit, p + 1)):
        dst.index_copy_(0, sh_flat, src)
    mf = m_flat.reshape(-1)
    for dst, src in ((ids, m_ids), (pos, m_pos), (seg, seg_sorted[:, None]), (limit, base),
                     (member, torch.arange(B, device=device)[:, None]), (tr, traj[None, :])):
        dst.index_copy_(0, mf, src.expand(B, member_len).reshape(-1))

    def grid(x):
        return x.view(n_rows, capacity)

    # The mask from two integer keys per token (few [R, C, C] ops: this runs every step):
    # a trunk token is visible to token j when its key seg*C + trunk position lies in j's range
    # [seg_j*C, seg_j*C + limit_j); an example's own token when its (example, trajectory) key is j's
    # decision key (trajectory -1) or j's own trajectory key, and it comes no later than j.
    i32 = torch.int32
    on_trunk, in_member = sidx >= 0, member >= 0
    trunk_key = grid(torch.where(on_trunk, seg * capacity + sidx, -1).to(i32))
    lo = grid(torch.where(seg >= 0, seg * capacity, 0).to(i32))
    hi = grid(torch.where(seg >= 0, seg * capacity + limit, 0).to(i32))
    own_key = grid(torch.where(in_member, member * (T + 1) + tr + 1, -1).to(i32))
    dec_key = grid(torch.where(in_member, member * (T + 1), -2).to(i32))
    traj_key = grid(torch.where(in_member & (tr >= 0), member * (T + 1) + tr + 1, -2).to(i32))
    allowed = (trunk_key[:, None, :] >= lo[:, :, None]) & (trunk_key[:, None, :] < hi[:, :, None])
    qi = torch.arange(capacity, device=device)
    causal = qi[None, :] <= qi[:, None]                                  # [C(j), C(i)]
    own = (own_key[:, None, :] == dec_key[:, :, None]) | (own_key[:, None, :] == traj_key[:, :, None])
    allowed |= own & causal[None]
    pad = grid(seg < 0)
    allowed |= torch.eye(capacity, dtype=torch.bool, device=device)[None] & pad[:, :, None]

    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=device)
    sep_flat = block + n_suf
    br_flat = (block[:, None] + n_dec + torch.arange(T * branch, device=device)[None, :]).view(B, T, branch)
    return PackedLayout(input_ids=grid(ids), position_ids=grid(pos), allowed=allowed,
                        sep_index=sep_flat.index_select(0, inverse), branch_index=br_flat.index_select(0, inverse),
                        tokens=int(n_shared + B * member_len))


def attention_mask_for(model, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask ``[R, 1, C, C]`` in the form ``model``'s attention implementation reads.

    ``sdpa`` and ``flex_attention`` (through transformers' conversion) take booleans; ``eager`` adds the
    mask to the attention scores, so it gets ``0`` / dtype-minimum. Flash-attention kernels take no
    arbitrary masks.
    """
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return allowed[:, None]
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
    raise PackingUnsupported(
        f"{type(model).__name__} uses attn_implementation={impl!r}, which takes no 4D attention mask: "
        f"load it with attn_implementation='sdpa' or 'eager', or train with packing: false")
