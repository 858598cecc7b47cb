"""Constrained log P_F: per-step forward-policy log-probabilities log P_F(c_{l+1} | s_l) of SID trajectories.

A trajectory is an item's SID ``(c_1, ..., c_L)``; step ``l`` (0-based) chooses code ``c_{l+1}`` in the
state ``s_l`` (the prefix of length ``l``) from the hidden state ``h[:, l]`` at that decision position.
The policy's logits for level ``l`` are ``h[:, l] @ W_l^T (+ b_l)`` where ``W_l`` is the level's block of
the SID rows of the LM head (``w_sid`` is level-major: rows ``offset_l .. offset_l + K_l - 1``).

Three supports (METHOD.md §2, ``policy_support``):

* ``"trie"``:  log-softmax over the valid trie children of ``s_l`` only (no flow to SIDs that do not exist);
* ``"level"``: log-softmax over all ``K_l`` codes of the level;
* ``"vocab"``: log-softmax over the whole LM vocabulary (needs the full head ``w_full[V, d]``).

:func:`constrained_log_pf` is the op: it runs the implementation :func:`gflowgr_core.backends.resolve_backend`
picks (``backend="auto"``: the fused Triton kernels of ``gflowgr_core.kernels.constrained_log_pf`` for CUDA
tensors and support ``"trie"``/``"level"``, else the reference) and records which one ran and why
(``gflowgr_core.backends.last_resolution("constrained_log_pf")``). :func:`constrained_log_pf_torch` is the
plain-PyTorch reference, the specification the kernels are tested against; it never builds ``[T, L, V]``
logits (the ``"vocab"`` path builds ``[T, V]`` one level at a time).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import backends

SUPPORTS = ("trie", "level", "vocab")
#: The op's name in :mod:`gflowgr_core.backends`.
OP = "constrained_log_pf"

# How many offending rows an error message lists before summarising the rest.
_MAX_ROWS_IN_ERROR = 8


def code_offsets(codes_per_level: Sequence[int]) -> list[int]:
    """Row offsets of each level's block in a level-major ``w_sid``: ``[0, K_0, K_0 + K_1, ..., sum K]``."""
    offsets = [0]
    for k in codes_per_level:
        offsets.append(offsets[-1] + int(k))
    return offsets


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are normalised in float32: a bf16 logsumexp over hundreds of codes loses the
    small differences the balance residuals are made of."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _rows_text(rows: torch.Tensor) -> str:
    rows = rows.tolist()
    shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_ERROR])
    more = len(rows) - _MAX_ROWS_IN_ERROR
    return shown + (f" (and {more} more)" if more > 0 else "")


def _resolve_codes_per_level(codes_per_level, trie) -> tuple[int, ...]:
    if codes_per_level is None:
        if trie is None:
            raise ValueError("codes_per_level is required when no trie is given")
        codes_per_level = trie.codes_per_level
    cpl = tuple(int(k) for k in codes_per_level)
    if not cpl or any(k <= 0 for k in cpl):
        raise ValueError(f"codes_per_level must be a non-empty sequence of positive ints, got {cpl}")
    if trie is not None and tuple(int(k) for k in trie.codes_per_level) != cpl:
        raise ValueError(f"codes_per_level {cpl} does not match the trie's {tuple(trie.codes_per_level)}")
    return cpl


def _check_codes(codes: torch.Tensor, cpl: tuple[int, ...]) -> None:
    """Raise naming the first trajectories whose code at some level is outside ``0..K_l-1``."""
    for lvl, k in enumerate(cpl):
        bad = (codes[:, lvl] < 0) | (codes[:, lvl] >= k)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            raise ValueError(
                f"codes[:, {lvl}] must lie in [0, {k}) (level {lvl} has {k} codes); out-of-range values "
                f"{codes[rows[:_MAX_ROWS_IN_ERROR], lvl].tolist()} at trajectory rows {_rows_text(rows)}")


def trie_walk(trie, codes: torch.Tensor) -> torch.Tensor:
    """Trie nodes of the states visited by each trajectory.

    Args:
        trie: a :class:`gflowgr_core.sid.trie.Trie` (on the device of ``codes``).
        codes: ``LongTensor[T, L]`` SID codes, one trajectory per row.

    Returns:
        ``LongTensor[T, L + 1]``: column ``l`` is the node of ``s_l`` (column 0 is the root, column ``L`` the
        leaf).

    Raises:
        ValueError: naming the rows whose code path is not in the trie, with the level where it leaves it.
    """
    t, n_levels = codes.shape
    nodes = torch.empty(t, n_levels + 1, dtype=torch.long, device=codes.device)
    nodes[:, 0] = 0
    for lvl in range(n_levels):
        nxt = trie.next_node(nodes[:, lvl], codes[:, lvl], level=lvl)
        missing = nxt < 0
        if bool(missing.any()):
            rows = missing.nonzero().flatten()
            examples = codes[rows[:3]].tolist()
            raise ValueError(
                f"trajectory rows {_rows_text(rows)} have a SID that is not in the trie: the prefix has no child "
                f"with code at level {lvl} (first offending SIDs: {examples})")
        nodes[:, lvl + 1] = nxt
    return nodes


def constrained_log_softmax_rows(h: torch.Tensor, w_level: torch.Tensor, nodes: torch.Tensor, level: int,
                                 trie, bias: Optional[torch.Tensor] = None,
                                 support: str = "trie") -> torch.Tensor:
    """Log-probabilities of every code of one level, renormalised over the valid children of each node.

    ``logp[r, c] = z[r, c] - logsumexp_{c' in children(nodes[r])} z[r, c']`` with
    ``z = h @ w_level^T + bias``, and ``-inf`` for codes that are not children of ``nodes[r]``. With
    ``support="level"`` every code of the level is allowed (``trie`` and ``nodes`` are then unused).

    Args:
        h: ``[R, d]`` hidden states at the decision positions.
        w_level: ``[K_l, d]`` the level's SID rows of the LM head.
        nodes: ``LongTensor[R]`` trie nodes of level ``level`` (the current prefixes).
        level: the level ``l`` being decided (0-based).
        trie: the :class:`~gflowgr_core.sid.trie.Trie` (needed for ``support="trie"``).
        bias: optional ``[K_l]`` bias of those head rows.
        support: ``"trie"`` or ``"level"``.

    Returns:
        ``[R, K_l]`` log-probabilities (float32 for half/bfloat16 inputs, else the inputs' dtype); each row's
        ``exp`` sums to 1 over its allowed codes.
    """
    if support not in ("trie", "level"):
        raise ValueError(f"support must be 'trie' or 'level' for per-level rows, got {support!r}")
    if h.dim() != 2 or w_level.dim() != 2 or h.shape[1] != w_level.shape[1]:
        raise ValueError(f"expected h[R, d] and w_level[K, d] with the same d, got {tuple(h.shape)} and "
                         f"{tuple(w_level.shape)}")
    logits = h @ w_level.t()
    if bias is not None:
        logits = logits + bias
    logits = _upcast(logits)
    if support == "trie":
        if trie is None:
            raise ValueError("support='trie' needs a trie")
        if bool((nodes < 0).any()):
            rows = (nodes < 0).nonzero().flatten()
            raise ValueError(f"nodes must be valid trie nodes; rows {_rows_text(rows)} hold -1")
        mask = trie.child_mask(nodes, level)
        if mask.shape != logits.shape:
            raise ValueError(f"trie.child_mask returned {tuple(mask.shape)} for level {level}, expected "
                             f"{tuple(logits.shape)}: w_level does not hold that level's {mask.shape[-1]} codes")
        # Every internal trie node has at least one child, so no row is fully masked (no NaN).
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def check_operand_dtypes(h: torch.Tensor, w_sid: Optional[torch.Tensor], support: str = "trie",
                         w_full: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> None:
    """Raise ``TypeError`` naming the argument when ``h`` is not floating point, or when the head it is
    multiplied with (``w_sid``; ``w_full`` for ``support="vocab"``) has another dtype (a matmul of two
    dtypes would fail deep inside with no argument named), or ``bias`` is not floating point."""
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise TypeError(f"h must be a floating-point tensor, got "
                        f"{h.dtype if isinstance(h, torch.Tensor) else type(h).__name__}")
    head_name, head = ("w_full", w_full) if support == "vocab" else ("w_sid", w_sid)
    if head is not None and head.dtype != h.dtype:
        raise TypeError(f"{head_name} must have the dtype of h ({h.dtype}), got {head.dtype}: cast one of them "
                        f"(torch.autocast casts both)")
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")


def check_trajectory_shapes(h: torch.Tensor, codes: torch.Tensor, cpl: tuple[int, ...]) -> torch.Tensor:
    """Check ``h[T, L, d]`` against ``codes[T, L]`` and the number of levels; return the codes as int64."""
    if h.dim() != 3:
        raise ValueError(f"h must be [T, L, d], got shape {tuple(h.shape)}")
    t, n_levels, _ = h.shape
    if codes.shape != (t, n_levels):
        raise ValueError(f"codes must be [T, L] = {(t, n_levels)} to match h, got {tuple(codes.shape)}")
    if n_levels != len(cpl):
        raise ValueError(f"h has {n_levels} decision positions but codes_per_level has {len(cpl)} levels")
    if codes.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    return codes.long()


def constrained_log_pf_torch(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie=None,
                             support: str = "trie", *, codes_per_level: Optional[Sequence[int]] = None,
                             w_full: Optional[torch.Tensor] = None, sid_token_ids: Optional[torch.Tensor] = None,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-step forward log-probabilities ``log P_F(c_{l+1} | s_l)`` of given SID trajectories (the
    plain-PyTorch reference of :func:`constrained_log_pf`).

    For step ``l`` with logits ``z_l = h[:, l] @ W^T + b``:

    * ``"trie"``:  ``log P_F = z_l[c] - logsumexp_{c' in children(s_l)} z_l[c']`` over the level's codes;
    * ``"level"``: ``log P_F = z_l[c] - logsumexp_{c' < K_l} z_l[c']``;
    * ``"vocab"``: ``log P_F = z_l[tok(l, c)] - logsumexp_{v < V} z_l[v]`` with ``W = w_full`` and
      ``tok(l, c) = sid_token_ids[offset_l + c]``.

    Args:
        h: ``[T, L, d]`` hidden states; ``h[:, l]`` is the state that chooses ``c_{l+1}``.
        w_sid: ``[sum K_l, d]`` SID rows of the LM head, level-major (unused, may be ``None``, for
            ``"vocab"``).
        codes: ``LongTensor[T, L]`` the trajectories' SIDs.
        trie: the :class:`~gflowgr_core.sid.trie.Trie` of the catalogue (required for ``"trie"``).
        support: ``"trie"`` | ``"level"`` | ``"vocab"``.
        codes_per_level: ``(K_0, ..., K_{L-1})``; taken from ``trie`` when omitted.
        w_full: ``[V, d]`` the whole LM head (``"vocab"`` only).
        sid_token_ids: ``LongTensor[sum K_l]`` vocabulary rows of the SID tokens, level-major (``"vocab"``).
        bias: optional head bias: ``[sum K_l]`` aligned with ``w_sid`` for ``"trie"``/``"level"``, ``[V]``
            aligned with ``w_full`` for ``"vocab"``.

    Returns:
        ``[T, L]`` log-probabilities (float32 for half/bfloat16 inputs, whose logits are normalised in
        float32; else the inputs' dtype), differentiable w.r.t. ``h``, ``w_sid`` (or ``w_full``) and ``bias``.

    Raises:
        ValueError: on shape mismatches, codes outside their level's range, or (``"trie"``) a trajectory
            whose SID is not in the trie, naming the offending rows.
        TypeError: non-integer ``codes``, or ``h`` and its head (``w_sid``, ``w_full`` for ``"vocab"``) of
            different dtypes (:func:`check_operand_dtypes`), naming the argument.
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    check_operand_dtypes(h, w_sid, support, w_full, bias)
    cpl = _resolve_codes_per_level(codes_per_level, trie)
    codes = check_trajectory_shapes(h, codes, cpl)
    n_levels, d = h.shape[1], h.shape[2]
    _check_codes(codes, cpl)
    offsets = code_offsets(cpl)

    if support == "vocab":
        return _vocab_log_pf(h, codes, offsets, w_full, sid_token_ids, bias)

    if w_sid is None or w_sid.dim() != 2 or w_sid.shape != (offsets[-1], d):
        got = None if w_sid is None else tuple(w_sid.shape)
        raise ValueError(f"w_sid must be [sum K_l, d] = {(offsets[-1], d)}, got {got}")
    if bias is not None and bias.shape != (offsets[-1],):
        raise ValueError(f"bias must be [sum K_l] = [{offsets[-1]}] for support {support!r}, got "
                         f"{tuple(bias.shape)}")
    if support == "trie" and trie is None:
        raise ValueError("support='trie' needs a trie")
    nodes = trie_walk(trie, codes) if support == "trie" else None

    steps = []
    for lvl in range(n_levels):
        lo, hi = offsets[lvl], offsets[lvl + 1]
        logp = constrained_log_softmax_rows(
            h[:, lvl], w_sid[lo:hi], None if nodes is None else nodes[:, lvl], lvl, trie,
            bias=None if bias is None else bias[lo:hi], support=support)
        steps.append(logp.gather(1, codes[:, lvl:lvl + 1]))
    return torch.cat(steps, dim=1)


def _vocab_log_pf(h, codes, offsets, w_full, sid_token_ids, bias):
    """``"vocab"`` support: full-vocabulary log-softmax, one level at a time (``[T, V]`` at most)."""
    t, n_levels, d = h.shape
    if w_full is None or sid_token_ids is None:
        raise ValueError("support='vocab' needs w_full[V, d] and sid_token_ids[sum K_l]")
    if w_full.dim() != 2 or w_full.shape[1] != d:
        raise ValueError(f"w_full must be [V, {d}], got {tuple(w_full.shape)}")
    vocab = w_full.shape[0]
    if sid_token_ids.shape != (offsets[-1],):
        raise ValueError(f"sid_token_ids must be [sum K_l] = [{offsets[-1]}], got {tuple(sid_token_ids.shape)}")
    if bool(((sid_token_ids < 0) | (sid_token_ids >= vocab)).any()):
        raise ValueError(f"sid_token_ids must be rows of w_full (0..{vocab - 1}); got ids outside that range")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [V] = [{vocab}] for support 'vocab', got {tuple(bias.shape)}")
    sid_token_ids = sid_token_ids.to(device=codes.device, dtype=torch.long)
    steps = []
    for lvl in range(n_levels):
        logits = h[:, lvl] @ w_full.t()
        if bias is not None:
            logits = logits + bias
        logits = _upcast(logits)
        target = sid_token_ids[offsets[lvl] + codes[:, lvl]]
        # log_softmax(z)[target] computed as z[target] - logsumexp(z) so only [T, V] is ever alive.
        steps.append(logits.gather(1, target[:, None]) - torch.logsumexp(logits, dim=1, keepdim=True))
    return torch.cat(steps, dim=1)


# --------------------------------------------------------------------------- dispatch
# Modules that register accelerated implementations when imported (see backends.load_providers).
_PROVIDERS = ("gflowgr_core.kernels.constrained_log_pf",)
backends.define_op(OP, constrained_log_pf_torch, _PROVIDERS)


def autocast_operands(device_type: str, *tensors: Optional[torch.Tensor]) -> tuple:
    """The floating-point ``tensors`` in the autocast dtype when autocast is on for ``device_type``.

    Autocast does not cast the inputs of custom autograd functions (the fused kernels), so without this the
    kernels would get fp32 hidden states and head rows under bf16 autocast. Every backend (the reference
    too) gets the cast operands, so all of them compute the same thing.
    """
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def constrained_log_pf(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie=None,
                       support: str = "trie", *, codes_per_level: Optional[Sequence[int]] = None,
                       w_full: Optional[torch.Tensor] = None, sid_token_ids: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Per-step ``log P_F(c_{l+1} | s_l)`` of given SID trajectories, ``[T, L]``, on the best backend.

    Logits are formed only for each level's SID rows of the head (never ``[T, L, V]``) and normalised over
    the trie children of the prefix (``support="trie"``), all ``K_l`` codes (``"level"``) or the whole
    vocabulary (``"vocab"``, needs ``w_full[V, d]`` and ``sid_token_ids``). This is the path of the GFlowNet
    losses, the SFT cross-entropy and the DPO / S-DPO log-probabilities.

    Arguments, values and errors are those of :func:`constrained_log_pf_torch`, plus ``backend``: ``"auto"``
    or any name of :data:`gflowgr_core.backends.BACKENDS`, chosen by
    :func:`gflowgr_core.backends.resolve_backend` (``"auto"``: the fused Triton kernel for CUDA tensors when
    triton is installed and the support is ``"trie"``/``"level"``, else the reference; a named backend
    without a usable implementation for this call falls back to that choice). Which one ran and why:
    ``gflowgr_core.backends.last_resolution("constrained_log_pf")``. Under autocast ``h``, ``w_sid``,
    ``w_full`` and ``bias`` are cast to the autocast dtype first (:func:`autocast_operands`).

    The dtype of ``h`` takes part in the choice: a backend that does not compute in it (the fused kernel
    computes in float32, bfloat16 and float16) is passed over, so float64 inputs run on the reference, with
    the reason in ``last_resolution``.

    Returns:
        ``[T, L]`` log-probabilities, differentiable w.r.t. ``h``, ``w_sid`` (or ``w_full``) and ``bias``:
        float32 from the fused kernel and for half-precision inputs, else the inputs' dtype.

    Raises:
        TypeError: ``h`` and ``w_sid`` (``w_full`` for ``"vocab"``) of different dtypes, naming them (after
            the autocast cast); otherwise the errors of :func:`constrained_log_pf_torch`.
    """
    h, w_sid, w_full, bias = autocast_operands(h.device.type, h, w_sid, w_full, bias)
    check_operand_dtypes(h, w_sid, support, w_full, bias)
    options = dict(support=support, codes_per_level=codes_per_level, w_full=w_full, sid_token_ids=sid_token_ids,
                   bias=bias)
    name = backends.resolve_backend(OP, backend, h.device, options, dtype=h.dtype).name
    return backends.implementation(OP, name)(h, w_sid, codes, trie, **options)
