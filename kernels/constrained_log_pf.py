"""Constrained log P_F, fused with the LM-head SID rows: Triton kernels, launchers and autograd function.

The op (public entry :func:`gflowgr_core.objectives.constrained_log_pf`; PyTorch reference
:func:`gflowgr_core.objectives.logpf.constrained_log_pf_torch`): per-step log-probabilities of given SID
trajectories, renormalised over each level's trie-valid children (support ``"trie"``) or all its codes
(``"level"``), from hidden states and the SID rows of the head, never materialising logits.

Rows are the decisions ``r = (t, l)`` of ``T`` trajectories over ``L`` SID levels. For row ``r`` with hidden
state ``h[t, l]`` (``[d]``), target code ``c = codes[t, l]`` and node ``n = nodes[t, l]`` (the prefix
``s_l``), the logits are ``z[k] = h[t, l] . W_l[k] (+ b_l[k])`` over the level's ``K_l`` rows of the SID
head ``W_l = w_sid[off_l : off_l + K_l]`` only, and::

    lse[r]    = logsumexp_{k in A(r)} z[k]          A(r) = children of n (support "trie") or all K_l codes
    log_pf[r] = z[c] - lse[r]

Backward, with ``g[r] = dL/dlog_pf[r]`` and ``p[r, k] = exp(z[k] - lse[r])`` on ``A(r)`` (0 elsewhere)::

    G[r, k]      = g[r] * (1[k = c] - p[r, k])          (dL/dz)
    grad_h[r]    = sum_k G[r, k] W_l[k]                  = g[r] * (W_l[c] - sum_k p[r, k] W_l[k])
    grad_W_l[k]  = sum_{r of level l} G[r, k] h[r]
    grad_b_l[k]  = sum_{r of level l} G[r, k]

Kernels (all accumulate in fp32; logits are recomputed in the backward, never kept from the forward):

* ``_logpf_fwd_kernel``, grid ``(row blocks, L)``: tiles rows x codes with ``tl.dot`` over ``d``, masks each
  tile to the valid children (a per-node child bitmap: bit ``k`` of word ``k // 32`` of row ``n``), keeps an
  online log-sum-exp and picks the target logit. Writes ``log_pf[T, L]`` and ``lse[T, L]`` only.
* ``_logpf_bwd_dz_kernel``, grid ``(row blocks, code blocks, L)``: recomputes a logits tile, turns it into
  ``G`` with the saved ``lse``. ``G`` is the one ``[T, L, K_max]`` intermediate: the weight gradient sums it
  over every row of a level, and holding it once (``K_max`` values per row, fewer bytes than the row of ``h``
  itself for ``d >= K_max``) is far cheaper than recomputing the logits per ``d`` tile or reducing ``[K, d]``
  partials with atomics from every row block.
* ``_logpf_bwd_dh_kernel``, grid ``(row blocks, d blocks, L)``: ``grad_h = G @ W_l``.
* ``_logpf_bwd_dw_kernel``, grid ``(code blocks, d blocks, L * splits)``: ``grad_W_l = G^T @ h_l`` over a
  slice of the rows; with several splits the fp32 partials are summed afterwards (deterministic, no atomics).

Nothing of size ``[T, L, V]`` or ``[T, L, K]`` logits exists in memory. bf16 / fp16 operands go to the tensor
cores as they are (products are exact in fp32); fp32 operands use IEEE fp32 dot products so results match
the PyTorch reference to ~1e-6. Under ``TRITON_INTERPRET=1`` the operands are upcast to fp32 before ``tl.dot``
because the interpreter multiplies bf16 bit patterns as integers; with exact products this is the same math.

Importing this module (the dispatcher does on its first call) registers :func:`constrained_log_pf_triton` as
the ``"triton"`` backend of the ``constrained_log_pf`` op and :func:`gfn_loss_triton` as that of
``gfn_loss``, when triton is installed. Under ``TRITON_INTERPRET=1`` both also run on CPU tensors (slowly:
for tests), but ``backend="auto"`` keeps CPU tensors on the PyTorch reference.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from gflowgr_core import backends
from gflowgr_core.objectives.gfn_loss import OP as GFN_LOSS_OP
from gflowgr_core.objectives.logpf import (OP, _check_codes, _resolve_codes_per_level, check_trajectory_shapes,
                                           trie_walk)

from .utils import alloc_output, interpreting
from .utils import triton  # None when triton is not installed

if triton is not None:
    import triton.language as tl

    from .utils import logits_tile, mm

__all__ = ["constrained_log_pf_triton", "gfn_loss_triton", "ConstrainedLogPF", "logpf_forward",
           "logpf_backward", "trie_child_bits", "KernelConfig", "default_config", "SUPPORTED_DTYPES",
           "TRITON_SUPPORTS"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: The policy supports the kernels implement ("vocab" stays on the reference path).
TRITON_SUPPORTS = ("trie", "level")


# ============================================================================================ Triton
if triton is not None:

    @triton.jit
    def _allowed(BITS, node, ks, row_ok, k_ok, stride_bits, MASK_TRIE: tl.constexpr):
        """``[BLOCK_T, BLOCK_K]`` bool: code ``ks`` is in the row's support (a child of ``node`` for "trie")."""
        ok = row_ok[:, None] & k_ok[None, :]
        if MASK_TRIE:
            word = tl.load(BITS + node[:, None] * stride_bits + (ks >> 5)[None, :], mask=ok, other=0)
            ok = ok & (((word >> (ks & 31)[None, :]) & 1) != 0)
        return ok


    @triton.jit
    def _level_codes(LOFF, lvl):
        """``(k_lo, n_k)``: the first row of level ``lvl``'s codes in ``W`` and how many codes it has."""
        k_lo = tl.load(LOFF + lvl)
        return k_lo, tl.load(LOFF + lvl + 1) - k_lo


    @triton.jit
    def _step_rows(CODES, NODES, pid_t, lvl, T, stride_ht, stride_hl, stride_ct, stride_cl, stride_nt,
                   stride_nl, MASK_TRIE: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's ``BLOCK_T`` trajectories at level ``lvl``: ``(rows, row_ok, row_off, target, node)``,
        the row indices and mask, each row's hidden-state offset in ``H``, its taken code and its trie node
        (0 unless ``MASK_TRIE``)."""
        rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rows < T
        row_off = rows * stride_ht + lvl * stride_hl
        target = tl.load(CODES + rows * stride_ct + lvl * stride_cl, mask=row_ok, other=0)
        node = tl.zeros([BLOCK_T], dtype=tl.int64)
        if MASK_TRIE:
            node = tl.load(NODES + rows * stride_nt + lvl * stride_nl, mask=row_ok, other=0).to(tl.int64)
        return rows, row_ok, row_off, target, node


    @triton.jit
    def _logpf_fwd_kernel(H, W, BIAS, CODES, NODES, BITS, LOFF, LOGPF, LSE,
                          T, D,
                          stride_ht, stride_hl, stride_hd, stride_wk, stride_wd,
                          stride_ct, stride_cl, stride_nt, stride_nl, stride_bits, stride_ot, stride_ol,
                          HAS_BIAS: tl.constexpr, MASK_TRIE: tl.constexpr, DOT_F32: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_t = tl.program_id(0)
        lvl = tl.program_id(1)
        k_lo, n_k = _level_codes(LOFF, lvl)
        rows, row_ok, row_off, target, node = _step_rows(CODES, NODES, pid_t, lvl, T, stride_ht, stride_hl,
                                                         stride_ct, stride_cl, stride_nt, stride_nl,
                                                         MASK_TRIE, BLOCK_T)

        run_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
        tgt = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k0 in range(0, n_k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < n_k
            k_glob = (k_lo + ks).to(tl.int64)
            z = logits_tile(H, W, BIAS, row_off, k_glob, row_ok, k_ok, D, stride_hd, stride_wk, stride_wd,
                            HAS_BIAS, DOT_F32, BLOCK_T, BLOCK_K, BLOCK_D)
            tgt += tl.sum(tl.where(ks[None, :] == target[:, None], z, 0.0), axis=1)
            z = tl.where(_allowed(BITS, node, ks, row_ok, k_ok, stride_bits, MASK_TRIE), z, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            # A row may have no allowed code in this tile yet (max still -inf): shift by 0 to avoid inf - inf.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
            run_max = new_max
        lse = run_max + tl.log(tl.where(row_ok, run_sum, 1.0))
        out = rows * stride_ot + lvl * stride_ol
        tl.store(LSE + out, lse, mask=row_ok)
        tl.store(LOGPF + out, tgt - lse, mask=row_ok)


    @triton.jit
    def _logpf_bwd_dz_kernel(H, W, BIAS, CODES, NODES, BITS, LOFF, LSE, GRAD, DZ,
                             T, D,
                             stride_ht, stride_hl, stride_hd, stride_wk, stride_wd,
                             stride_ct, stride_cl, stride_nt, stride_nl, stride_bits, stride_ot, stride_ol,
                             stride_gt, stride_gl, stride_zt, stride_zl,
                             HAS_BIAS: tl.constexpr, MASK_TRIE: tl.constexpr, DOT_F32: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_k = tl.program_id(1)
        lvl = tl.program_id(2)
        k_lo, n_k = _level_codes(LOFF, lvl)
        k0 = pid_k * BLOCK_K
        if k0 < n_k:
            rows, row_ok, row_off, target, node = _step_rows(CODES, NODES, pid_t, lvl, T, stride_ht, stride_hl,
                                                             stride_ct, stride_cl, stride_nt, stride_nl,
                                                             MASK_TRIE, BLOCK_T)
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < n_k
            k_glob = (k_lo + ks).to(tl.int64)
            out = rows * stride_ot + lvl * stride_ol
            lse = tl.load(LSE + out, mask=row_ok, other=0.0)
            g = tl.load(GRAD + rows * stride_gt + lvl * stride_gl, mask=row_ok, other=0.0)

            z = logits_tile(H, W, BIAS, row_off, k_glob, row_ok, k_ok, D, stride_hd, stride_wk, stride_wd,
                            HAS_BIAS, DOT_F32, BLOCK_T, BLOCK_K, BLOCK_D)
            allowed = _allowed(BITS, node, ks, row_ok, k_ok, stride_bits, MASK_TRIE)
            p = tl.where(allowed, tl.exp(z - lse[:, None]), 0.0)
            onehot = tl.where(ks[None, :] == target[:, None], 1.0, 0.0)
            dz = g[:, None] * (onehot - p)
            tl.store(DZ + rows[:, None] * stride_zt + lvl * stride_zl + ks[None, :],
                     dz.to(DZ.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


    @triton.jit
    def _logpf_bwd_dh_kernel(DZ, W, LOFF, GH,
                             T, D,
                             stride_zt, stride_zl, stride_wk, stride_wd, stride_gt, stride_gl, stride_gd,
                             DOT_F32: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        lvl = tl.program_id(2)
        k_lo, n_k = _level_codes(LOFF, lvl)
        rows = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        row_ok = rows < T
        ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, n_k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < n_k
            dz = tl.load(DZ + rows[:, None] * stride_zt + lvl * stride_zl + ks[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + (k_lo + ks).to(tl.int64)[:, None] * stride_wk + ds[None, :].to(tl.int64) * stride_wd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = mm(dz, w, acc, DOT_F32)
        tl.store(GH + rows[:, None] * stride_gt + lvl * stride_gl + ds[None, :].to(tl.int64) * stride_gd,
                 acc.to(GH.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


    @triton.jit
    def _logpf_bwd_dw_kernel(DZ, H, LOFF, GW,
                             T, D, n_levels, rows_per_split,
                             stride_zt, stride_zl, stride_ht, stride_hl, stride_hd,
                             stride_gs, stride_gk, stride_gd,
                             DOT_F32: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_k = tl.program_id(0)
        pid_d = tl.program_id(1)
        pid_ls = tl.program_id(2)
        lvl = pid_ls % n_levels
        split = pid_ls // n_levels
        k_lo, n_k = _level_codes(LOFF, lvl)
        k0 = pid_k * BLOCK_K
        if k0 < n_k:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < n_k
            ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            t_lo = split * rows_per_split
            t_hi = tl.minimum(t_lo + rows_per_split, T)
            acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
            for t0 in range(t_lo, t_hi, BLOCK_T):
                rows = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
                row_ok = rows < t_hi
                # G^T tile [BLOCK_K, BLOCK_T], read transposed from the [T, L, K] layout.
                dz_t = tl.load(DZ + rows[None, :] * stride_zt + lvl * stride_zl + ks[:, None],
                               mask=k_ok[:, None] & row_ok[None, :], other=0.0)
                h = tl.load(H + rows[:, None] * stride_ht + lvl * stride_hl + ds[None, :].to(tl.int64) * stride_hd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                acc = mm(dz_t, h, acc, DOT_F32)
            k_glob = (k_lo + ks).to(tl.int64)
            tl.store(GW + split * stride_gs + k_glob[:, None] * stride_gk + ds[None, :].to(tl.int64) * stride_gd,
                     acc.to(GW.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])


# ============================================================================================ launchers
@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of the four kernels (every block size a power of two, >= 16).

    ``fwd_*`` serve the forward and the ``G`` (dz) kernel, ``dh_*`` the ``grad_h`` kernel, ``dw_*`` the
    ``grad_W`` kernel. ``dw_min_programs``: the weight-gradient kernel splits the rows of a level into
    chunks until it has at least this many programs (fp32 partials, summed after).
    """
    fwd_block_t: int = 64
    fwd_block_k: int = 64
    fwd_block_d: int = 64
    dh_block_t: int = 64
    dh_block_k: int = 64
    dh_block_d: int = 128
    dw_block_t: int = 64
    dw_block_k: int = 64
    dw_block_d: int = 128
    dw_min_programs: int = 264
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("fwd_block_t", "fwd_block_k", "fwd_block_d", "dh_block_t", "dh_block_k", "dh_block_d",
                     "dw_block_t", "dw_block_k", "dw_block_d"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16 (tl.dot tiles), got {v}")


def default_config(d: int, k_max: int, dtype: torch.dtype) -> KernelConfig:
    """Launch settings for hidden size ``d``, largest level ``k_max`` and operand ``dtype``.

    On a GPU: 64-row tiles (one row block per 64 trajectories and level), code tiles up to 128 for 16-bit
    operands (two tiles cover a 256-code level) and half that for fp32, whose tiles take twice the shared
    memory. Under the interpreter, the smallest tiles that still cover the toy shapes in few programs.
    """
    if interpreting():
        return KernelConfig(fwd_block_t=16, fwd_block_k=32, fwd_block_d=32, dh_block_t=16, dh_block_k=32,
                            dh_block_d=32, dw_block_t=16, dw_block_k=32, dw_block_d=32, dw_min_programs=1,
                            num_warps=1, num_stages=1)
    wide = dtype != torch.float32
    block_k = 128 if wide and k_max > 64 else 64
    block_d = 64 if wide else 32
    return KernelConfig(fwd_block_t=64, fwd_block_k=block_k, fwd_block_d=block_d,
                        dh_block_t=64, dh_block_k=64, dh_block_d=128 if wide else 64,
                        dw_block_t=64, dw_block_k=64, dw_block_d=128 if wide else 64,
                        num_warps=8 if wide else 4, num_stages=3)


_OFFSETS_CACHE: dict[tuple, torch.Tensor] = {}


def _code_offsets(codes_per_level: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 ``[L + 1]`` row offsets of the levels in ``w_sid``, cached per device (no copy per call)."""
    key = (codes_per_level, str(device))
    off = _OFFSETS_CACHE.get(key)
    if off is None:
        acc = [0]
        for k in codes_per_level:
            acc.append(acc[-1] + k)
        off = torch.tensor(acc, dtype=torch.int32, device=device)
        _OFFSETS_CACHE[key] = off
    return off


def _check_inputs(h: torch.Tensor, w_sid: torch.Tensor, codes: torch.Tensor,
                  codes_per_level: tuple[int, ...], bias: Optional[torch.Tensor], *others: torch.Tensor) -> None:
    if h.dim() != 3 or h.stride(2) != 1:
        raise ValueError(f"h must be [T, L, d] with a contiguous last dim, got shape {tuple(h.shape)} and "
                         f"strides {h.stride()}")
    t, n_levels, d = h.shape
    if len(codes_per_level) != n_levels:
        raise ValueError(f"h has {n_levels} levels but codes_per_level has {len(codes_per_level)}")
    if w_sid.shape != (sum(codes_per_level), d):
        raise ValueError(f"w_sid must be [sum K_l, d] = {(sum(codes_per_level), d)}, got {tuple(w_sid.shape)}")
    if h.dtype not in SUPPORTED_DTYPES or w_sid.dtype != h.dtype:
        raise TypeError(f"h and w_sid must share one dtype of {SUPPORTED_DTYPES}, got {h.dtype} and "
                        f"{w_sid.dtype}")
    if codes.shape != (t, n_levels):
        raise ValueError(f"codes must be [T, L] = {(t, n_levels)}, got {tuple(codes.shape)}")
    if bias is not None and bias.shape != (w_sid.shape[0],):
        raise ValueError(f"bias must be [sum K_l] = [{w_sid.shape[0]}], got {tuple(bias.shape)}")
    if bias is not None and bias.numel() > 1 and bias.stride(0) != 1:
        raise ValueError(f"bias must be contiguous (the kernels read it as a packed vector), got stride "
                         f"{bias.stride(0)}; pass bias.contiguous()")
    dev = h.device
    for x in (w_sid, codes, bias) + others:
        if x is not None and x.device != dev:
            raise ValueError(f"all tensors must be on one device; got {dev} and {x.device}")
    if triton is None:
        raise RuntimeError("triton is not installed: the 'triton' constrained_log_pf backend is unavailable")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"the fused log P_F kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                           f"got tensors on {dev}")


def _mask_args(nodes: Optional[torch.Tensor], child_bits: Optional[torch.Tensor], h: torch.Tensor):
    """Pointer/stride arguments for the trie mask; dummies (never read) for the "level" support."""
    if (nodes is None) != (child_bits is None):
        raise ValueError("nodes and child_bits go together: both for the trie support, neither for 'level'")
    if nodes is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=h.device)
        return False, dummy, dummy, (0, 0), 0
    if nodes.shape != h.shape[:2]:
        raise ValueError(f"nodes must be [T, L] = {tuple(h.shape[:2])}, got {tuple(nodes.shape)}")
    if child_bits.dtype != torch.int32 or child_bits.dim() != 2:
        raise ValueError(f"child_bits must be an int32 [n_internal_nodes, words] table, got "
                         f"{child_bits.dtype} {tuple(child_bits.shape)}")
    return True, nodes, child_bits, (nodes.stride(0), nodes.stride(1)), child_bits.stride(0)


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreting()


def logpf_forward(h: torch.Tensor, w_sid: torch.Tensor, codes: torch.Tensor, codes_per_level: tuple[int, ...],
                  nodes: Optional[torch.Tensor] = None, child_bits: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None,
                  config: Optional[KernelConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step constrained log-probabilities and log-partition functions.

    Args:
        h: ``[T, L, d]`` hidden states (fp32 / bf16 / fp16; last dim contiguous, any row strides).
        w_sid: ``[sum K_l, d]`` SID head rows, level-major, same dtype as ``h``.
        codes: integer ``[T, L]`` target codes; each must lie in its row's support (the caller checks).
        codes_per_level: ``(K_0, ..., K_{L-1})``.
        nodes: integer ``[T, L]`` trie node of each state ``s_l`` (support "trie"), or ``None`` ("level").
        child_bits: int32 ``[n_internal_nodes, ceil(K_max / 32)]``: bit ``k % 32`` of word ``k // 32`` of row
            ``n`` is set when code ``k`` is a child of node ``n``; ``None`` for "level".
        bias: optional ``[sum K_l]`` head bias.
        config: launch settings (:func:`default_config` when omitted).

    Returns:
        ``(log_pf, lse)``, both fp32 ``[T, L]``.
    """
    cpl = tuple(int(k) for k in codes_per_level)
    _check_inputs(h, w_sid, codes, cpl, bias, *(x for x in (nodes, child_bits) if x is not None))
    t, n_levels, d = h.shape
    mask_trie, nodes_a, bits_a, n_strides, bits_stride = _mask_args(nodes, child_bits, h)
    cfg = config or default_config(d, max(cpl), h.dtype)
    log_pf = alloc_output((t, n_levels), torch.float32, h.device)
    lse = alloc_output((t, n_levels), torch.float32, h.device)
    if t == 0:
        return log_pf, lse
    bias_a = bias if bias is not None else h
    grid = (triton.cdiv(t, cfg.fwd_block_t), n_levels)
    _logpf_fwd_kernel[grid](
        h, w_sid, bias_a, codes, nodes_a, bits_a, _code_offsets(cpl, h.device), log_pf, lse,
        t, d,
        h.stride(0), h.stride(1), h.stride(2), w_sid.stride(0), w_sid.stride(1),
        codes.stride(0), codes.stride(1), n_strides[0], n_strides[1], bits_stride,
        log_pf.stride(0), log_pf.stride(1),
        HAS_BIAS=bias is not None, MASK_TRIE=mask_trie, DOT_F32=_dot_f32(h.dtype),
        BLOCK_T=cfg.fwd_block_t, BLOCK_K=cfg.fwd_block_k, BLOCK_D=cfg.fwd_block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return log_pf, lse


@dataclass(frozen=True)
class _Backward:
    """What the three gradient launches share: the inputs of :func:`logpf_backward` and its settings."""
    h: torch.Tensor
    w_sid: torch.Tensor
    cpl: tuple[int, ...]
    cfg: KernelConfig
    dot_f32: bool
    # The interpreter truncates fp32 -> 16-bit conversions where GPUs round to nearest even, so under it
    # 16-bit results are written in fp32 and rounded by torch: CPU tests then see the GPU's numerics.
    round_in_torch: bool


def _grad_logits(b: _Backward, grad_log_pf, codes, lse, nodes, child_bits, bias) -> torch.Tensor:
    """``G = dL/dz``, the one ``[T, L, K_max]`` intermediate (see the module docstring), in the operand dtype:
    the products that read it take it in that dtype anyway. Entries past a smaller level's ``K_l`` are never
    read."""
    h, w_sid, cfg = b.h, b.w_sid, b.cfg
    t, n_levels, d = h.shape
    k_max = max(b.cpl)
    mask_trie, nodes_a, bits_a, n_strides, bits_stride = _mask_args(nodes, child_bits, h)
    dz = torch.empty((t, n_levels, k_max), dtype=torch.float32 if b.round_in_torch else h.dtype,
                     device=h.device)
    grid = (triton.cdiv(t, cfg.fwd_block_t), triton.cdiv(k_max, cfg.fwd_block_k), n_levels)
    _logpf_bwd_dz_kernel[grid](
        h, w_sid, bias if bias is not None else h, codes, nodes_a, bits_a, _code_offsets(b.cpl, h.device),
        lse, grad_log_pf, dz,
        t, d,
        h.stride(0), h.stride(1), h.stride(2), w_sid.stride(0), w_sid.stride(1),
        codes.stride(0), codes.stride(1), n_strides[0], n_strides[1], bits_stride,
        lse.stride(0), lse.stride(1), grad_log_pf.stride(0), grad_log_pf.stride(1), dz.stride(0), dz.stride(1),
        HAS_BIAS=bias is not None, MASK_TRIE=mask_trie, DOT_F32=b.dot_f32,
        BLOCK_T=cfg.fwd_block_t, BLOCK_K=cfg.fwd_block_k, BLOCK_D=cfg.fwd_block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dz.to(h.dtype)


def _grad_hidden(b: _Backward, dz: torch.Tensor, grad_h: torch.Tensor) -> None:
    """``grad_h = G @ W_l`` per level, written into ``grad_h``."""
    h, w_sid, cfg = b.h, b.w_sid, b.cfg
    t, n_levels, d = h.shape
    out = alloc_output(h.shape, torch.float32, h.device) if b.round_in_torch else grad_h
    grid = (triton.cdiv(t, cfg.dh_block_t), triton.cdiv(d, cfg.dh_block_d), n_levels)
    _logpf_bwd_dh_kernel[grid](
        dz, w_sid, _code_offsets(b.cpl, h.device), out,
        t, d,
        dz.stride(0), dz.stride(1), w_sid.stride(0), w_sid.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        DOT_F32=b.dot_f32,
        BLOCK_T=cfg.dh_block_t, BLOCK_K=cfg.dh_block_k, BLOCK_D=cfg.dh_block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if out is not grad_h:
        grad_h.copy_(out)


def _grad_head(b: _Backward, dz: torch.Tensor, grad_w: torch.Tensor) -> None:
    """``grad_W_l = G^T @ h_l`` per level, written into ``grad_w``; the rows of a level are split into chunks
    until there are ``cfg.dw_min_programs`` programs, whose fp32 partials are summed in a fixed order."""
    h, w_sid, cfg = b.h, b.w_sid, b.cfg
    t, n_levels, d = h.shape
    k_max = max(b.cpl)
    base = triton.cdiv(k_max, cfg.dw_block_k) * triton.cdiv(d, cfg.dw_block_d) * n_levels
    splits = max(1, min(triton.cdiv(t, cfg.dw_block_t), triton.cdiv(cfg.dw_min_programs, base)))
    rows_per_split = triton.cdiv(triton.cdiv(t, splits), cfg.dw_block_t) * cfg.dw_block_t
    splits = triton.cdiv(t, rows_per_split)
    # One split writes grad_w directly; several write fp32 partials.
    direct = splits == 1 and not b.round_in_torch
    target = grad_w.unsqueeze(0) if direct else alloc_output((splits,) + tuple(w_sid.shape), torch.float32,
                                                             h.device)
    grid = (triton.cdiv(k_max, cfg.dw_block_k), triton.cdiv(d, cfg.dw_block_d), n_levels * splits)
    _logpf_bwd_dw_kernel[grid](
        dz, h, _code_offsets(b.cpl, h.device), target,
        t, d, n_levels, rows_per_split,
        dz.stride(0), dz.stride(1), h.stride(0), h.stride(1), h.stride(2),
        target.stride(0), target.stride(1), target.stride(2),
        DOT_F32=b.dot_f32,
        BLOCK_T=cfg.dw_block_t, BLOCK_K=cfg.dw_block_k, BLOCK_D=cfg.dw_block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not direct:
        grad_w.copy_(target.sum(dim=0))


def _grad_bias(b: _Backward, dz: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``grad_b_l[k]`` = sum over the level's rows of ``G[:, l, k]``: an O(T * L * K) reduction of ``G``."""
    k_max = max(b.cpl)
    col = dz.float().sum(dim=0)  # [L, K_max]
    keep = torch.arange(k_max, device=dz.device)[None, :] < torch.tensor(b.cpl, device=dz.device)[:, None]
    return col[keep].to(bias.dtype)


def logpf_backward(grad_log_pf: torch.Tensor, h: torch.Tensor, w_sid: torch.Tensor, codes: torch.Tensor,
                   codes_per_level: tuple[int, ...], lse: torch.Tensor, nodes: Optional[torch.Tensor] = None,
                   child_bits: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                   need_h: bool = True, need_w: bool = True, need_bias: bool = False,
                   config: Optional[KernelConfig] = None
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``sum(grad_log_pf * log_pf)`` w.r.t. ``h``, ``w_sid`` and ``bias``.

    Args:
        grad_log_pf: ``[T, L]`` upstream gradient of ``log_pf``.
        h, w_sid, codes, codes_per_level, nodes, child_bits, bias: as given to :func:`logpf_forward`.
        lse: fp32 ``[T, L]`` from :func:`logpf_forward`.
        need_h, need_w, need_bias: which gradients to compute (the others come back ``None``).
        config: launch settings (:func:`default_config` when omitted).

    Returns:
        ``(grad_h [T, L, d], grad_w [sum K_l, d], grad_bias [sum K_l])`` in the dtypes of ``h``, ``w_sid`` and
        ``bias`` (accumulated in fp32), ``None`` for those not asked for.
    """
    cpl = tuple(int(k) for k in codes_per_level)
    _check_inputs(h, w_sid, codes, cpl, bias, lse, grad_log_pf,
                  *(x for x in (nodes, child_bits) if x is not None))
    for name, x in (("grad_log_pf", grad_log_pf), ("lse", lse)):
        if x.shape != h.shape[:2]:
            raise ValueError(f"{name} must be [T, L] = {tuple(h.shape[:2])}, got {tuple(x.shape)}")
    if need_bias and bias is None:
        raise ValueError("need_bias=True but no bias was given")
    grad_h = alloc_output(h.shape, h.dtype, h.device) if need_h else None
    grad_w = alloc_output(w_sid.shape, w_sid.dtype, h.device) if need_w else None
    if h.shape[0] == 0:
        return (grad_h.zero_() if need_h else None, grad_w.zero_() if need_w else None,
                torch.zeros_like(bias) if need_bias else None)
    if not (need_h or need_w or need_bias):
        return None, None, None
    b = _Backward(h, w_sid, cpl, config or default_config(h.shape[2], max(cpl), h.dtype), _dot_f32(h.dtype),
                  round_in_torch=interpreting() and h.dtype != torch.float32)
    # Any strides work (autograd often passes an expanded, 0-stride gradient); only the dtype is fixed.
    dz = _grad_logits(b, grad_log_pf.to(torch.float32), codes, lse, nodes, child_bits, bias)
    if need_h:
        _grad_hidden(b, dz, grad_h)
    if need_w:
        _grad_head(b, dz, grad_w)
    return grad_h, grad_w, _grad_bias(b, dz, bias) if need_bias else None


# ============================================================================================ the trie mask
_BITS_CACHE: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def trie_child_bits(trie) -> torch.Tensor:
    """Child bitmap of every internal trie node, the mask the kernels read.

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


# ============================================================================================ autograd
class ConstrainedLogPF(torch.autograd.Function):
    """``log_pf[T, L]`` (fp32) from ``h``, ``w_sid``, ``bias`` on the kernels above (fused backward); the
    other inputs are not differentiable. Inputs are checked by :func:`constrained_log_pf_triton`."""

    @staticmethod
    def forward(ctx, h, w_sid, bias, codes, nodes, child_bits, codes_per_level, config):
        log_pf, lse = logpf_forward(h, w_sid, codes, codes_per_level, nodes, child_bits, bias, config)
        ctx.save_for_backward(h, w_sid, bias, codes, nodes, child_bits, lse)
        ctx.codes_per_level = codes_per_level
        ctx.config = config
        return log_pf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_pf):
        h, w_sid, bias, codes, nodes, child_bits, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h, grad_w, grad_b = logpf_backward(
            grad_log_pf, h, w_sid, codes, ctx.codes_per_level, lse, nodes, child_bits, bias,
            need_h=need_h, need_w=need_w, need_bias=need_b and bias is not None, config=ctx.config)
        return grad_h, grad_w, grad_b, None, None, None, None, None


# ============================================================================================ entry points
def constrained_log_pf_triton(h: torch.Tensor, w_sid: torch.Tensor, codes: torch.Tensor, trie=None,
                              support: str = "trie", *, codes_per_level: Optional[Sequence[int]] = None,
                              w_full: Optional[torch.Tensor] = None, sid_token_ids: Optional[torch.Tensor] = None,
                              bias: Optional[torch.Tensor] = None,
                              config: Optional[KernelConfig] = None) -> torch.Tensor:
    """Per-step ``log P_F(c_{l+1} | s_l)`` of given SID trajectories on the fused Triton kernels.

    Arguments and values as :func:`~gflowgr_core.objectives.logpf.constrained_log_pf_torch` for ``support``
    ``"trie"`` (log-softmax over the children of ``s_l``) and ``"level"`` (over all ``K_l`` codes);
    ``"vocab"`` raises here (``w_full`` and ``sid_token_ids`` belong to it and are unused). Extra keyword
    ``config``: a :class:`KernelConfig` (tile sizes).

    ``h`` and ``w_sid`` share one dtype (fp32, bf16 or fp16); the result is fp32 whatever the input dtype
    (the kernels accumulate in fp32), differentiable w.r.t. ``h``, ``w_sid`` and ``bias``; no double
    backward. The input checks cost one host synchronisation.

    Raises:
        ValueError: unsupported ``support``, shape mismatches, codes out of range, or (``"trie"``) a SID that
            is not in the trie, naming the offending rows.
        TypeError: ``h`` and ``w_sid`` of different or unsupported dtypes.
    """
    if support not in TRITON_SUPPORTS:
        raise ValueError(f"the fused log P_F kernel implements support {TRITON_SUPPORTS}, not {support!r}; "
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
    return ConstrainedLogPF.apply(h, w_sid, bias, codes, nodes, child_bits, cpl, config)


def gfn_loss_triton(h, w_sid, codes, trie, log_f, log_z, log_r, *, objective, weights=None, support="trie",
                    codes_per_level=None, w_full=None, sid_token_ids=None, bias=None,
                    config: Optional[KernelConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The GFlowNet loss with ``log_pf`` from :func:`constrained_log_pf_triton`: ``(loss, log_pf)`` with the
    semantics of :func:`~gflowgr_core.objectives.gfn_loss.gfn_loss_reference`; ``objective`` is a
    :class:`~gflowgr_core.objectives.balance.BalanceObjective`, whose loss on the small ``[T, L]`` result is
    plain PyTorch (``log_z``, ``log_f``, ``log_r`` and ``weights`` get their gradients from autograd)."""
    log_pf = constrained_log_pf_triton(h, w_sid, codes, trie, support, codes_per_level=codes_per_level,
                                       bias=bias, config=config)
    return objective.loss(log_pf, log_z, log_f, log_r, weights), log_pf


# ============================================================================================ registration
def _implements(*, support, **_options) -> bool:
    return support in TRITON_SUPPORTS


if triton is not None:
    # The kernels compute in the dtypes of SUPPORTED_DTYPES: other inputs (float64) run on the reference.
    backends.register(OP, "triton", constrained_log_pf_triton, supports=_implements, dtypes=SUPPORTED_DTYPES)
    backends.register(GFN_LOSS_OP, "triton", gfn_loss_triton, supports=_implements, dtypes=SUPPORTED_DTYPES)
