"""Fused (Triton) trie-constrained log P_F and the losses built on it: GFlowNet balance losses, SFT CE.

:func:`fused_constrained_log_pf` computes the same per-step ``log P_F(c_{l+1} | s_l)`` as
:func:`~.logpf.constrained_log_pf` (supports ``"trie"`` and ``"level"``) with the kernels of
``gflowgr_core.kernels.gfn_loss``: logits only for each level's SID rows, masked in the kernel, never kept in
memory, recomputed in a fused backward that returns the gradients of ``h``, ``w_sid`` and ``bias``. The
balance objective on the small ``[T, L]`` result is plain PyTorch, so ``log_z``, ``log_f``, ``log_r`` and
``weights`` get their gradients from autograd.

Importing this module registers :func:`fused_gfn_loss` as the ``"triton"`` backend of
:func:`~.gfn_loss.gfn_loss` for CUDA tensors (when triton is installed). Under ``TRITON_INTERPRET=1`` the
functions here also run on CPU tensors (slowly: for tests), but ``backend="auto"`` keeps CPU tensors on the
PyTorch reference.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from .. import backends
from .balance import BalanceObjective
from .gfn_loss import register_gfn_loss_backend, resolve_objective
from .logpf import _check_codes, _resolve_codes_per_level, check_trajectory_shapes, trie_walk
from .preference import sft_cross_entropy

__all__ = ["fused_constrained_log_pf", "fused_gfn_loss", "fused_sft_cross_entropy", "trie_child_bits",
           "FUSED_SUPPORTS"]

#: The policy supports the fused kernel implements ("vocab" stays on the reference path).
FUSED_SUPPORTS = ("trie", "level")

def _kernel_module():
    """``gflowgr_core.kernels.gfn_loss``, imported on first use (triton is imported only then)."""
    return backends.kernel_module("gfn_loss")


# ------------------------------------------------------------------------------------ trie child bitmap

_BITS_CACHE: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def trie_child_bits(trie) -> torch.Tensor:
    """Child bitmap of every internal trie node, the mask the kernel reads.

    Bit ``k % 32`` of word ``k // 32`` of row ``n`` is set when node ``n`` (of a level ``l < L``) has a child
    with code ``k``. Built from the CSR edges (``child_code``, ``child_node``, ``parent``) once per trie and
    device, then cached while the trie lives.

    Returns:
        ``IntTensor[n_internal_nodes, ceil(max K_l / 32)]`` (int32) on ``trie.device``.
    """
    key = (trie.device, trie.num_nodes, trie.child_code.data_ptr())
    hit = _BITS_CACHE.get(id(trie))
    if hit is not None and hit[0]() is trie and hit[1] == key:
        return hit[2]
    n_internal = sum(trie.nodes_per_level[:trie.num_levels])
    words = (trie.max_codes + 31) // 32
    code = trie.child_code
    # Built in int32 throughout: at 10M items an int64 table (and its conversion copies) would be several
    # hundred MB. child_node[e] == e + 1, so parent[1:] is the source node of every edge.
    index = trie.parent[1:] * words
    index += code >> 5
    bits = torch.bitwise_left_shift(torch.ones(code.shape, dtype=torch.int32, device=trie.device),
                                    (code & 31).to(torch.int32))
    # Codes are distinct within a node, so summing the bits of its edges is their bitwise OR; bit 31 is the
    # int32 sign bit (-2**31), and sums of distinct bits never overflow, so the words come out exact.
    table = torch.zeros(n_internal * words, dtype=torch.int32, device=trie.device)
    table.index_add_(0, index, bits)
    table = table.view(n_internal, words)
    _BITS_CACHE[id(trie)] = (weakref.ref(trie), key, table)
    weakref.finalize(trie, _BITS_CACHE.pop, id(trie), None)
    return table


# ------------------------------------------------------------------------------------ input checks
# One host synchronisation per call: the checks run on the device and only a failure goes back to the
# reference helpers, which name the offending rows.

_LIMITS_CACHE: dict[tuple, torch.Tensor] = {}


def _check_range(codes: torch.Tensor, cpl: tuple[int, ...]) -> None:
    key = (cpl, str(codes.device))
    limits = _LIMITS_CACHE.get(key)
    if limits is None:
        limits = _LIMITS_CACHE.setdefault(key, torch.tensor(cpl, dtype=torch.long, device=codes.device))
    if bool(((codes < 0) | (codes >= limits)).any()):
        _check_codes(codes, cpl)


def _checked_walk(trie, codes: torch.Tensor) -> torch.Tensor:
    """``LongTensor[T, L]``: node of ``s_l`` for every step; raises naming the rows whose SID is not in
    the trie (or has a code out of range)."""
    t, n_levels = codes.shape
    nodes = torch.empty(t, n_levels, dtype=torch.long, device=codes.device)
    cur = torch.zeros(t, dtype=torch.long, device=codes.device)
    for lvl in range(n_levels):
        nodes[:, lvl] = cur
        # -1 (no such edge, or a code out of range) propagates through the later levels.
        cur = trie.next_node(cur, codes[:, lvl], level=lvl)
    if bool((cur < 0).any()):
        _check_codes(codes, trie.codes_per_level)
        trie_walk(trie, codes)
        raise RuntimeError("the trie walk left the trie but the reference walk found no offending row; "
                           "the trie's tables are inconsistent")
    return nodes


# ------------------------------------------------------------------------------------ autograd function

class _FusedLogPF(torch.autograd.Function):
    """``log_pf[T, L]`` (fp32) from ``h``, ``w_sid``, ``bias``; the other inputs are not differentiable."""

    @staticmethod
    def forward(ctx, h, w_sid, bias, codes, nodes, child_bits, codes_per_level, config):
        kern = _kernel_module()
        log_pf, lse = kern.logpf_forward(h, w_sid, codes, codes_per_level, nodes, child_bits, bias, config)
        ctx.save_for_backward(h, w_sid, bias, codes, nodes, child_bits, lse)
        ctx.codes_per_level = codes_per_level
        ctx.config = config
        return log_pf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_pf):
        h, w_sid, bias, codes, nodes, child_bits, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_b = _kernel_module().logpf_backward(
            grad_log_pf, h, w_sid, codes, ctx.codes_per_level, lse, nodes, child_bits, bias,
            need_h=need_h, need_w=need_w, need_bias=need_b and bias is not None, config=ctx.config)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_constrained_log_pf(h: torch.Tensor, w_sid: torch.Tensor, codes: torch.Tensor, trie=None,
                             support: str = "trie", *, codes_per_level: Optional[Sequence[int]] = None,
                             bias: Optional[torch.Tensor] = None, config=None) -> torch.Tensor:
    """Per-step ``log P_F(c_{l+1} | s_l)`` of given SID trajectories on the fused Triton kernels.

    Same values as :func:`~.logpf.constrained_log_pf` for ``support`` ``"trie"`` (log-softmax over the
    children of ``s_l``) and ``"level"`` (over all ``K_l`` codes); the per-step values serve the GFlowNet
    losses, the SFT cross-entropy and, summed over steps, the sequence log-probabilities of DPO / S-DPO.

    Args:
        h: ``[T, L, d]`` hidden states (fp32, bf16 or fp16); ``h[:, l]`` chooses ``c_{l+1}``.
        w_sid: ``[sum K_l, d]`` SID rows of the LM head, level-major, same dtype as ``h``.
        codes: ``LongTensor[T, L]`` the trajectories' SIDs.
        trie: the catalogue :class:`~gflowgr_core.sid.trie.Trie` on the device of ``h`` (``"trie"``).
        support: ``"trie"`` or ``"level"``; ``"vocab"`` is only on the reference path and raises here.
        codes_per_level: ``(K_0, ..., K_{L-1})``; taken from ``trie`` when omitted.
        bias: optional ``[sum K_l]`` head bias.
        config: optional ``gflowgr_core.kernels.gfn_loss.KernelConfig`` (tile sizes).

    Returns:
        fp32 ``[T, L]`` log-probabilities (fp32 whatever the input dtype: the kernel accumulates in fp32),
        differentiable w.r.t. ``h``, ``w_sid`` and ``bias``; no double backward.

    Raises:
        ValueError: unsupported ``support``, shape mismatches, codes out of range, or (``"trie"``) a SID that
            is not in the trie, naming the offending rows.
        TypeError: ``h`` and ``w_sid`` of different or unsupported dtypes.
    """
    if support not in FUSED_SUPPORTS:
        raise ValueError(f"the fused log P_F kernel implements support {FUSED_SUPPORTS}, not {support!r}; "
                         f"the full-vocabulary support runs on the reference path (backend='torch')")
    cpl = _resolve_codes_per_level(codes_per_level, trie)
    codes = check_trajectory_shapes(h, codes, cpl)
    d = h.shape[2]
    if w_sid is None or w_sid.shape != (sum(cpl), d):
        raise ValueError(f"w_sid must be [sum K_l, d] = {(sum(cpl), d)}, got "
                         f"{None if w_sid is None else tuple(w_sid.shape)}")
    if support == "trie":
        if trie is None:
            raise ValueError("support='trie' needs a trie")
        if trie.device != h.device:
            raise ValueError(f"the trie is on {trie.device} but h is on {h.device}; move it with trie.to()")
        nodes = _checked_walk(trie, codes)
        child_bits = trie_child_bits(trie)
    else:
        _check_range(codes, cpl)
        nodes = child_bits = None
    if h.stride(-1) != 1:
        h = h.contiguous()
    if w_sid.stride(-1) != 1:
        w_sid = w_sid.contiguous()
    if bias is not None:  # read by the kernels as a packed vector
        bias = bias.contiguous()
    return _FusedLogPF.apply(h, w_sid, bias, codes, nodes, child_bits, cpl, config)


def fused_sft_cross_entropy(h: torch.Tensor, w_sid: torch.Tensor, codes: torch.Tensor, trie=None,
                            support: str = "trie", *, codes_per_level: Optional[Sequence[int]] = None,
                            bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                            config=None) -> torch.Tensor:
    """Constrained next-token cross-entropy of the positives' SIDs on the fused kernel.

    ``mean_b(-sum_l mask[b, l] * log P_F(c_{l+1} | s_l))`` (see :func:`~.preference.sft_cross_entropy`),
    with ``log P_F`` from :func:`fused_constrained_log_pf` (``h[B, L, d]``, ``codes[B, L]``).

    Returns:
        fp32 scalar.
    """
    log_pf = fused_constrained_log_pf(h, w_sid, codes, trie, support, codes_per_level=codes_per_level,
                                      bias=bias, config=config)
    return sft_cross_entropy(log_pf, mask)


def fused_gfn_loss(h: torch.Tensor, w_sid: torch.Tensor, codes: torch.Tensor, trie,
                   log_f: Optional[torch.Tensor], log_z: torch.Tensor, log_r: torch.Tensor,
                   objective: Union[str, BalanceObjective] = "tb", lambda_subtb: float = 0.9,
                   weights: Optional[torch.Tensor] = None, support: str = "trie", *,
                   codes_per_level: Optional[Sequence[int]] = None, w_full: Optional[torch.Tensor] = None,
                   sid_token_ids: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """GFlowNet loss of SID trajectories from hidden states with the fused log P_F kernel.

    The semantics of :func:`~.gfn_loss.gfn_loss_reference`: ``log_pf`` from
    :func:`fused_constrained_log_pf`, then ``sum_tau w_tau * L_obj(tau) / T`` for the TB / DB / SubTB
    objective. ``w_full`` and ``sid_token_ids`` belong to the ``"vocab"`` support, which this path does not
    implement; they are accepted for signature compatibility and, as by the reference, unused here.

    Args:
        h: ``[T, L, d]``; w_sid: ``[sum K_l, d]``; codes: ``LongTensor[T, L]``; trie: the catalogue trie.
        log_f: ``[T, L-1]`` or ``None`` (TB); log_z: ``[T]``; log_r: ``[T]``; weights: optional ``[T]``.
        objective, lambda_subtb: ``"tb"`` | ``"db"`` | ``"subtb"`` (with ``lambda_subtb``) or an objective.
        support: ``"trie"`` | ``"level"``.
        codes_per_level, bias, config: as in :func:`fused_constrained_log_pf`.

    Returns:
        ``(loss, log_pf)``: fp32 scalar and fp32 ``[T, L]``.
    """
    obj = resolve_objective(objective, lambda_subtb)
    log_pf = fused_constrained_log_pf(h, w_sid, codes, trie, support, codes_per_level=codes_per_level,
                                      bias=bias, config=config)
    return obj.loss(log_pf, log_z, log_f, log_r, weights), log_pf


def _dispatch_impl(h, w_sid, codes, trie, log_f, log_z, log_r, *, objective, weights, support,
                   codes_per_level, w_full, sid_token_ids, bias):
    """The :func:`~.gfn_loss.gfn_loss` calling convention, forwarded to :func:`fused_gfn_loss`."""
    return fused_gfn_loss(h, w_sid, codes, trie, log_f, log_z, log_r, objective, weights=weights,
                          support=support, codes_per_level=codes_per_level, bias=bias)


def _dispatch_log_pf(h, w_sid, codes, trie, support, *, codes_per_level, w_full, sid_token_ids, bias):
    """The :func:`~.gfn_loss.sid_log_probs` calling convention, forwarded to :func:`fused_constrained_log_pf`
    (``w_full`` / ``sid_token_ids`` belong to the ``"vocab"`` support, which :func:`_dispatch_supports`
    keeps off this path)."""
    return fused_constrained_log_pf(h, w_sid, codes, trie, support, codes_per_level=codes_per_level, bias=bias)


def _dispatch_supports(*, support, **_options) -> bool:
    return support in FUSED_SUPPORTS


if backends.triton_available():
    register_gfn_loss_backend("triton", _dispatch_impl, supports=_dispatch_supports)
    backends.register("sid_log_probs", "triton", _dispatch_log_pf, supports=_dispatch_supports)
