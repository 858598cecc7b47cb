"""Fused trie-constrained decoding step: Triton kernels, and the wrappers of the compiled C++ / CUDA ops.

Every function here computes exactly :func:`gflowgr_core.decoding.step.constrained_step_torch` (the
specification) and registers itself with :mod:`gflowgr_core.backends` as the ``"triton"``, ``"cpp"`` or
``"cuda"`` backend of the ``constrained_step`` op when this module is imported (the dispatcher imports it on
its first call).

Triton (GPU; CPU tensors under ``TRITON_INTERPRET=1``). One program owns ``BLOCK_R`` rows of the level:

1. logits ``z = h[rows] @ W_level^T (+ bias)`` as one ``[BLOCK_R, BLOCK_K]`` tile (``BLOCK_K >= K_level``),
   ``tl.dot`` over ``d`` with fp32 accumulation;
2. the child node of every ``(row, code)`` of the tile, ``-1`` where the code is not an edge of the row's
   node, from one of three lookups chosen per level at launch: the trie's dense table (levels that have one),
   a scan over the node's CSR edges (small ``max_branch``), or a vectorised binary search of each code in the
   node's sorted CSR edge codes (large ``max_branch``);
3. log-softmax over the children (``renormalize``) or over all ``K_level`` codes, ``-inf`` off the children;
4. ``sample``: Gumbel-max of ``z * (1 / temperature) + g`` over the children (the reference divides; the
   two agree to one ulp, exactly at ``temperature = 1``) with the counter-based noise of
   :func:`~gflowgr_core.decoding.step.gumbel_noise` (same hash, so the same codes as the reference), or
   ``beam``: candidates ``score[row] + logp`` and the row's own top-``min(beams, K)`` of them.

The beam step then needs the top-``beams`` over ``beams_in x K`` candidates per batch element. The global
top-``beams`` takes at most ``beams`` candidates from any one row, and those are that row's own best under the
same order, so the first kernel keeps only each row's top ``min(beams, K)`` (``[R, topk]`` values, codes and
child nodes) and a second small kernel (one program per batch element) merges ``beams_in * topk``
candidates. That is chosen over ``torch.topk`` on ``[B, beams_in * K]`` scores because it never writes the
``R x K`` candidate matrix, and because ``torch.topk`` does not promise the reference's tie order (equal
scores: lower flat index ``parent * K + code`` first); both kernels select with that exact order.

No kernel reads a value back to the host and all shapes come from Python ints, so a beam or sampling loop
over the levels can be captured in a CUDA graph (the noise key may be a device tensor updated in place).

Compiled ops (``csrc/constrained_step.cpp``, ``csrc/constrained_step_cuda.cu``): the same step as
``torch.ops.gflowgr.constrained_step_beam`` / ``constrained_step_sample``, walking each row's CSR edges.
"""
from __future__ import annotations

import logging

import torch

from gflowgr_core import backends
from gflowgr_core.decoding.step import (OP, BeamStep, SampleStep, _check_inputs, beam_shape, constrained_step_torch,
                                        noise_key)

from .utils import alloc_output, interpreting, next_pow2
from .utils import triton  # None when triton is not installed (the compiled backends do not need it)

if triton is not None:
    import triton.language as tl

    from .utils import HASH_INC, HASH_MASK32, HASH_MUL1, HASH_MUL2, logits_tile

__all__ = ["constrained_step_triton", "constrained_step_cpp", "constrained_step_cuda", "TritonConfig",
           "default_config", "MAX_TRITON_CODES", "LOOKUPS"]

log = logging.getLogger("gflowgr")

#: Largest ``K_level`` the Triton kernel handles (one code tile per row block); wider levels use the
#: reference (a warning is logged once).
MAX_TRITON_CODES = 1024
#: Child lookups of the Triton kernel: dense table, scan of the CSR edges, binary search of the CSR edges.
LOOKUPS = ("dense", "scan", "search")
#: ``max_branch`` up to which the scan lookup is used on levels without a dense table.
SCAN_MAX_BRANCH = 16

_warned_wide = False


# ============================================================================================ Triton
if triton is not None:

    @triton.jit
    def _mix32(x):
        # The 32-bit mixer of gflowgr_core.decoding.step._mix32 on int64 lanes holding values < 2**32.
        x = x ^ (x >> 16)
        x = (x * HASH_MUL1) & HASH_MASK32
        x = x ^ (x >> 15)
        x = (x * HASH_MUL2) & HASH_MASK32
        return x ^ (x >> 15)

    @triton.jit
    def _absorb(state, value):
        return _mix32(((state ^ value) + HASH_INC) & HASH_MASK32)

    @triton.jit
    def _gumbel_tile(KEY, level, rows, ks):
        """``[BLOCK_R, BLOCK_K]`` fp32 Gumbel noise of ``gumbel_noise(key, level, ...)[rows][:, ks]``."""
        key = tl.load(KEY)
        state = _absorb(key * 0, key & HASH_MASK32)
        state = _absorb(state, (key >> 32) & HASH_MASK32)
        state = _absorb(state, key * 0 + level)
        row_state = _absorb(state, rows.to(tl.int64))
        x = _mix32(_absorb(row_state[:, None], ks[None, :].to(tl.int64)))
        u = ((x >> 8) | 1).to(tl.float32) * 5.9604644775390625e-08
        return -tl.log(-tl.log(u))

    @triton.jit
    def _child_tile(NODE, DENSE, INDPTR, CHILD_CODE, CHILD_NODE, rows, row_ok, ks, k_ok, lvl_lo, lvl_hi,
                    stride_dense, LOOKUP: tl.constexpr, MAX_BRANCH: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """``[BLOCK_R, BLOCK_K]`` int32: child node of each row's node along code ``ks``, ``-1`` if none.

        Rows whose node is not of this level (``-1`` for a dead row) have no children. Node ids are held in
        int32 (the launcher checks the trie has fewer than 2**31 nodes): the tile is as large as the logits.
        """
        node = tl.load(NODE + rows, mask=row_ok, other=-1)
        in_level = row_ok & (node >= lvl_lo) & (node < lvl_hi)
        ok = in_level[:, None] & k_ok[None, :]
        safe = tl.where(in_level, node, lvl_lo)
        if LOOKUP == 0:  # dense table of the level: [nodes_at_level, K]
            child = tl.load(DENSE + (safe - lvl_lo)[:, None] * stride_dense + ks[None, :], mask=ok,
                            other=-1).to(tl.int32)
        else:
            start = tl.load(INDPTR + safe, mask=in_level, other=0)
            end = tl.load(INDPTR + safe + 1, mask=in_level, other=0)
            if LOOKUP == 1:  # scan: every edge of the node against every code of the tile
                child = tl.full([BLOCK_R, BLOCK_K], -1, tl.int32)
                for j in range(MAX_BRANCH):
                    edge = start + j
                    has = edge < end
                    code = tl.load(CHILD_CODE + edge, mask=has, other=-1)
                    nxt = tl.load(CHILD_NODE + edge, mask=has, other=-1).to(tl.int32)
                    hit = (ks[None, :] == code[:, None]) & has[:, None]
                    child = tl.where(hit, nxt[:, None], child)
            else:  # lower_bound of each code in the node's sorted edge codes
                zero = tl.zeros([BLOCK_R, BLOCK_K], tl.int64)
                first = start[:, None] + zero
                count = (end - start)[:, None] + zero
                for _ in range(SEARCH_STEPS):
                    half = count // 2
                    mid = first + half
                    live = ok & (count > 0)
                    code = tl.load(CHILD_CODE + mid, mask=live, other=0)
                    right = live & (code < ks[None, :])
                    first = tl.where(right, mid + 1, first)
                    count = tl.where(right, count - half - 1, half)
                inside = ok & (first < end[:, None])
                code = tl.load(CHILD_CODE + first, mask=inside, other=-1)
                found = inside & (code == ks[None, :])
                child = tl.load(CHILD_NODE + first, mask=found, other=-1).to(tl.int32)
        return tl.where(ok, child, -1)

    @triton.jit
    def _log_probs(z, valid, row_ok, k_ok, RENORM: tl.constexpr):
        """fp32 log-probabilities, ``-inf`` off the children: ``(z - max) - log(sum exp(z - max))`` over the
        children (``RENORM``) or over all the level's codes."""
        neg = float("-inf")
        if RENORM:
            support = valid
        else:
            support = row_ok[:, None] & k_ok[None, :]
        m = tl.max(tl.where(support, z, neg), axis=1)
        m = tl.where(m == neg, 0.0, m)
        shifted = z - m[:, None]
        total = tl.sum(tl.where(support, tl.exp(shifted), 0.0), axis=1)
        # A row without support (no children) has total 0; its entries are all -inf anyway.
        total = tl.where(total > 0, total, 1.0)
        return tl.where(valid, shifted - tl.log(total)[:, None], neg)

    @triton.jit
    def _row_block(H, W, BIAS, NODE, DENSE, INDPTR, CHILD_CODE, CHILD_NODE, R, K, D, lvl_lo, lvl_hi,
                   stride_hr, stride_hd, stride_wk, stride_wd, stride_dense,
                   HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, DOT_F32: tl.constexpr,
                   LOOKUP: tl.constexpr, MAX_BRANCH: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Steps 1-3 for this program's ``BLOCK_R`` rows, the part both modes share: ``(rows, row_ok, ks,
        z, child, valid, logp)``, the row and code indices, logits, child nodes, child mask and log-probs."""
        pid = tl.program_id(0)
        rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_ok = rows < R
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        z = logits_tile(H, W, BIAS, rows * stride_hr, ks.to(tl.int64), row_ok, k_ok, D, stride_hd, stride_wk,
                        stride_wd, HAS_BIAS, DOT_F32, BLOCK_R, BLOCK_K, BLOCK_D)
        child = _child_tile(NODE, DENSE, INDPTR, CHILD_CODE, CHILD_NODE, rows, row_ok, ks, k_ok, lvl_lo, lvl_hi,
                            stride_dense, LOOKUP, MAX_BRANCH, SEARCH_STEPS, BLOCK_R, BLOCK_K)
        valid = child >= 0
        logp = _log_probs(z, valid, row_ok, k_ok, RENORM)
        return rows, row_ok, ks, z, child, valid, logp

    @triton.jit
    def _sample_kernel(H, W, BIAS, NODE, DENSE, INDPTR, CHILD_CODE, CHILD_NODE, KEY,
                       OUT_CODE, OUT_NODE, OUT_LOGP,
                       R, K, D, level, lvl_lo, lvl_hi, inv_temp,
                       stride_hr, stride_hd, stride_wk, stride_wd, stride_dense,
                       HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, DOT_F32: tl.constexpr,
                       LOOKUP: tl.constexpr, MAX_BRANCH: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, row_ok, ks, z, child, valid, logp = _row_block(
            H, W, BIAS, NODE, DENSE, INDPTR, CHILD_CODE, CHILD_NODE, R, K, D, lvl_lo, lvl_hi,
            stride_hr, stride_hd, stride_wk, stride_wd, stride_dense, HAS_BIAS, RENORM, DOT_F32,
            LOOKUP, MAX_BRANCH, SEARCH_STEPS, BLOCK_R, BLOCK_K, BLOCK_D)
        # The reference perturbs logits / temperature (not log-probs): same argmax, same rounding.
        pert = tl.where(valid, z * inv_temp + _gumbel_tile(KEY, level, rows, ks), float("-inf"))
        best = tl.max(pert, axis=1)
        has = tl.max(valid.to(tl.int32), axis=1) > 0
        pick = tl.min(tl.where(valid & (pert == best[:, None]), ks[None, :], BLOCK_K), axis=1)
        sel = ks[None, :] == pick[:, None]
        code = tl.where(has, pick.to(tl.int64), -1)
        nxt = tl.where(has, tl.sum(tl.where(sel, child, 0), axis=1), -1).to(tl.int64)
        lp = tl.where(has, tl.sum(tl.where(sel, logp, 0.0), axis=1), float("-inf"))
        tl.store(OUT_CODE + rows, code, mask=row_ok)
        tl.store(OUT_NODE + rows, nxt, mask=row_ok)
        tl.store(OUT_LOGP + rows, lp, mask=row_ok)

    @triton.jit
    def _beam_rows_kernel(H, W, BIAS, NODE, DENSE, INDPTR, CHILD_CODE, CHILD_NODE, SCORES,
                          CAND_V, CAND_C, CAND_N,
                          R, K, D, lvl_lo, lvl_hi,
                          stride_hr, stride_hd, stride_wk, stride_wd, stride_dense, stride_s,
                          HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, DOT_F32: tl.constexpr,
                          LOOKUP: tl.constexpr, MAX_BRANCH: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                          TOPK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        """Each row's top ``TOPK`` candidates ``score + logp`` (value desc, code asc) into ``[R, TOPK]``."""
        rows, row_ok, ks, z, child, valid, logp = _row_block(
            H, W, BIAS, NODE, DENSE, INDPTR, CHILD_CODE, CHILD_NODE, R, K, D, lvl_lo, lvl_hi,
            stride_hr, stride_hd, stride_wk, stride_wd, stride_dense, HAS_BIAS, RENORM, DOT_F32,
            LOOKUP, MAX_BRANCH, SEARCH_STEPS, BLOCK_R, BLOCK_K, BLOCK_D)
        score = tl.load(SCORES + rows * stride_s, mask=row_ok, other=float("-inf")).to(tl.float32)
        cand = tl.where(valid, score[:, None] + logp, float("-inf"))
        for j in range(TOPK):
            best = tl.max(cand, axis=1)
            pick = tl.min(tl.where(cand == best[:, None], ks[None, :], BLOCK_K), axis=1)
            alive = best > float("-inf")
            sel = ks[None, :] == pick[:, None]
            nxt = tl.sum(tl.where(sel, child, 0), axis=1)
            tl.store(CAND_V + rows * TOPK + j, best, mask=row_ok)
            tl.store(CAND_C + rows * TOPK + j, tl.where(alive, pick, -1), mask=row_ok)
            tl.store(CAND_N + rows * TOPK + j, tl.where(alive, nxt, -1).to(tl.int64), mask=row_ok)
            cand = tl.where(sel, float("-inf"), cand)

    @triton.jit
    def _beam_merge_kernel(CAND_V, CAND_C, CAND_N, OUT_PARENT, OUT_CODE, OUT_NODE, OUT_SCORE,
                           K, N_CAND, NONE_FLAT,
                           TOPK: tl.constexpr, BEAMS: tl.constexpr, BLOCK_C: tl.constexpr):
        """Top ``BEAMS`` of one batch element's ``beams_in * TOPK`` row candidates, by value desc then flat
        index ``parent * K + code`` asc; dead slots get parent 0, code -1, node -1, score -inf."""
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_C)
        ok = i < N_CAND
        base = b * N_CAND
        v = tl.load(CAND_V + base + i, mask=ok, other=float("-inf"))
        c = tl.load(CAND_C + base + i, mask=ok, other=-1)
        n = tl.load(CAND_N + base + i, mask=ok, other=-1)
        v = tl.where(c >= 0, v, float("-inf"))
        flat = (i // TOPK).to(tl.int64) * K + c
        for j in range(BEAMS):
            best = tl.max(v, axis=0)
            alive = best > float("-inf")
            f = tl.min(tl.where(v == best, flat, NONE_FLAT), axis=0)
            sel = (flat == f) & (v == best)
            nxt = tl.sum(tl.where(sel, n, 0), axis=0)
            tl.store(OUT_PARENT + b * BEAMS + j, tl.where(alive, f // K, 0))
            tl.store(OUT_CODE + b * BEAMS + j, tl.where(alive, f % K, -1))
            tl.store(OUT_NODE + b * BEAMS + j, tl.where(alive, nxt, -1))
            tl.store(OUT_SCORE + b * BEAMS + j, best)
            v = tl.where(sel, float("-inf"), v)


# ============================================================================================ launchers
def _level_bounds(trie, level: int) -> tuple[int, int]:
    """``[lo, hi)``: the node ids of trie level ``level``."""
    lo = sum(trie.nodes_per_level[:level])
    return lo, lo + trie.nodes_per_level[level]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class TritonConfig:
    """Launch settings of the Triton step: rows per program, the ``d`` tile, warps, pipeline stages."""

    def __init__(self, block_r: int, block_d: int, num_warps: int, num_stages: int = 3):
        for name, v in (("block_r", block_r), ("block_d", block_d)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16 (tl.dot tiles), got {v}")
        self.block_r, self.block_d = int(block_r), int(block_d)
        self.num_warps, self.num_stages = int(num_warps), int(num_stages)

    def __repr__(self) -> str:
        return (f"TritonConfig(block_r={self.block_r}, block_d={self.block_d}, num_warps={self.num_warps}, "
                f"num_stages={self.num_stages})")


def default_config(k: int, d: int, dtype: torch.dtype) -> TritonConfig:
    """Tiles for a level of ``k`` codes and hidden size ``d``.

    On a GPU: 16 rows x 256 codes per program for SID-sized levels with 8 warps (each program holds the
    logits, child, log-prob and candidate tiles; measured by compiling for sm_90: no register spills), one
    warp per 512 tile elements up to 16 warps, and a ``d`` tile that keeps the pipelined ``W`` tiles in
    shared memory for levels up to :data:`MAX_TRITON_CODES` codes. The smallest tiles under the interpreter.
    """
    block_k = max(16, next_pow2(k))
    if interpreting():
        return TritonConfig(16, 16 if d <= 16 else 32, 1, 1)
    block_r = max(16, min(64, 4096 // block_k))
    wide = block_k > 256
    block_d = 16 if wide else (64 if dtype != torch.float32 else 32)
    block_d = max(16, min(block_d, next_pow2(d)))
    num_warps = max(4, min(16, block_r * block_k // 512))
    return TritonConfig(block_r, block_d, num_warps, 2 if wide else 3)


def _lookup(trie, level: int, lookup: str | None) -> tuple[int, torch.Tensor | None]:
    """``(lookup id, dense table or None)`` for ``level``: dense when the trie has a table for it, else scan
    for small ``max_branch``, else binary search; ``lookup`` forces one (tests)."""
    if lookup is None:
        if level < trie.num_dense:
            lookup = "dense"
        else:
            lookup = "scan" if trie.max_branch[level] <= SCAN_MAX_BRANCH else "search"
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
    if lookup == "dense":
        if level >= trie.num_dense:
            raise ValueError(f"lookup 'dense' needs a dense table for level {level}; the trie has "
                             f"{trie.num_dense} dense level(s)")
        return 0, trie.dense[level]
    return LOOKUPS.index(lookup), None


def _check_triton_inputs(h, w_level, node, level, trie, mode, scores, bias) -> None:
    """The reference's argument checks, plus: every tensor on ``h``'s device, a CUDA device (or the
    interpreter), node ids that fit the kernels' int32."""
    if triton is None:
        raise RuntimeError("triton is not installed: the 'triton' constrained_step backend is unavailable")
    _check_inputs(h, w_level, node, level, trie, mode, bias)
    dev = h.device
    for name, t in (("w_level", w_level), ("node", node), ("bias", bias), ("scores", scores),
                    ("trie", trie.indptr)):
        if t is not None and t.device != dev:
            raise ValueError(f"constrained_step_triton: {name} is on {t.device}, h on {dev}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton constrained step runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1),"
                           f" got tensors on {dev}")


def _warn_wide_level(level: int, k: int) -> None:
    global _warned_wide
    if not _warned_wide:
        log.warning("constrained_step: level %d has %d codes > %d, the Triton kernel's limit; using the "
                    "PyTorch reference for such levels", level, k, MAX_TRITON_CODES)
        _warned_wide = True


def _row_tile_args(h, w_level, node, level, trie, renormalize, bias, config, lookup) -> tuple[tuple, tuple, dict]:
    """What both row kernels take: ``(leading tensors, the strides, the constexpr and launch keywords)``.

    ``h`` and ``w_level`` are read through their strides; the node ids and the bias as packed vectors.
    """
    if trie.num_nodes >= 2 ** 31:
        raise ValueError(f"the Triton constrained step holds node ids in int32; this trie has {trie.num_nodes} "
                         f"nodes (use backend='cuda' or 'torch')")
    K = trie.codes_per_level[level]
    cfg = config or default_config(K, h.shape[1], h.dtype)
    lookup_id, dense = _lookup(trie, level, lookup)
    max_branch = trie.max_branch[level]
    bias = None if bias is None else bias.contiguous()
    tensors = (h, w_level, bias if bias is not None else h, node.long().contiguous(),
               dense if dense is not None else trie.indptr, trie.indptr, trie.child_code, trie.child_node)
    dot_f32 = (interpreting() or h.dtype == torch.float32 or w_level.dtype == torch.float32
               or h.dtype != w_level.dtype)
    constexprs = dict(HAS_BIAS=bias is not None, RENORM=bool(renormalize), DOT_F32=dot_f32, LOOKUP=lookup_id,
                      MAX_BRANCH=max_branch, SEARCH_STEPS=max(1, max_branch.bit_length()),
                      BLOCK_R=cfg.block_r, BLOCK_K=max(16, next_pow2(K)), BLOCK_D=cfg.block_d,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides = (h.stride(0), h.stride(1), w_level.stride(0), w_level.stride(1),
               dense.stride(0) if dense is not None else 0)
    return tensors, strides, constexprs


def _sample_triton(tensors, strides, constexprs, level, trie, temperature, generator, seed) -> SampleStep:
    """Sample mode: one Gumbel-max code per row, with its child and log-probability."""
    h = tensors[0]
    R, d, dev = h.shape[0], h.shape[1], h.device
    key = noise_key(seed, generator, dev)
    code = alloc_output((R,), torch.long, dev)
    nxt = alloc_output((R,), torch.long, dev)
    logp = alloc_output((R,), torch.float32, dev)
    if R > 0:
        lo, hi = _level_bounds(trie, level)
        _sample_kernel[(triton.cdiv(R, constexprs["BLOCK_R"]),)](
            *tensors, key, code, nxt, logp,
            R, trie.codes_per_level[level], d, level, lo, hi, 1.0 / float(temperature),
            *strides, **constexprs)
    return SampleStep(code=code, next_node=nxt, logp=logp)


def _beam_triton(tensors, strides, constexprs, level, trie, scores, B, beams_in, beams) -> BeamStep:
    """Beam mode: each row's top ``min(beams, K)`` candidates, then one merge program per batch element."""
    h = tensors[0]
    R, d, dev = h.shape[0], h.shape[1], h.device
    K = trie.codes_per_level[level]
    parent = alloc_output((B, beams), torch.long, dev)
    code = alloc_output((B, beams), torch.long, dev)
    nxt = alloc_output((B, beams), torch.long, dev)
    score = alloc_output((B, beams), torch.float32, dev)
    if R == 0:
        return BeamStep(parent=parent, code=code, next_node=nxt, score=score)
    topk = min(beams, K)
    cand_v = alloc_output((R, topk), torch.float32, dev)
    cand_c = alloc_output((R, topk), torch.int32, dev)
    cand_n = alloc_output((R, topk), torch.long, dev)
    flat_scores = scores.reshape(R)
    lo, hi = _level_bounds(trie, level)
    _beam_rows_kernel[(triton.cdiv(R, constexprs["BLOCK_R"]),)](
        *tensors, flat_scores, cand_v, cand_c, cand_n,
        R, K, d, lo, hi,
        *strides, flat_scores.stride(0), TOPK=topk, **constexprs)
    n_cand = beams_in * topk
    _beam_merge_kernel[(B,)](
        cand_v, cand_c, cand_n, parent, code, nxt, score, K, n_cand, n_cand * K,
        TOPK=topk, BEAMS=beams, BLOCK_C=max(16, next_pow2(n_cand)), num_warps=4 if n_cand >= 256 else 1)
    return BeamStep(parent=parent, code=code, next_node=nxt, score=score)


#: The operand dtypes the kernels read as they are.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_operand(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as the kernels read it: as is in a dtype of :data:`KERNEL_DTYPES`, else (float64) in fp32."""
    return t if t is None or t.dtype in KERNEL_DTYPES else t.float()


def constrained_step_triton(h: torch.Tensor, w_level: torch.Tensor, node: torch.Tensor, level: int, trie,
                            mode: str = "beam", *, scores: torch.Tensor | None = None, beams: int | None = None,
                            temperature: float = 1.0, generator: torch.Generator | None = None, seed=None,
                            renormalize: bool = True, bias: torch.Tensor | None = None,
                            config: TritonConfig | None = None, lookup: str | None = None):
    """The constrained step on the Triton kernels; arguments and results as
    :func:`~gflowgr_core.decoding.step.constrained_step_torch`.

    Tensors live on one CUDA device (or the CPU under ``TRITON_INTERPRET=1``). ``h`` / ``w_level`` may be
    fp32, bf16 or fp16 (any row strides); logits accumulate in fp32. Other floating dtypes (float64) are
    rounded to fp32 first, which is what the reference does with every input (``h.float() @ w.float().T``).
    Extra keywords: ``config`` (tiles, :func:`default_config` when omitted) and ``lookup`` (force
    ``"dense"`` / ``"scan"`` / ``"search"``). Levels wider than :data:`MAX_TRITON_CODES` codes run on the
    reference.
    """
    _check_triton_inputs(h, w_level, node, level, trie, mode, scores, bias)
    h, w_level, bias = (_kernel_operand(t) for t in (h, w_level, bias))
    if mode == "sample":
        _check_temperature(temperature)
    else:
        B, beams_in, beams = beam_shape(scores, beams, h.shape[0])
    K = trie.codes_per_level[level]
    if K > MAX_TRITON_CODES:
        _warn_wide_level(level, K)
        return constrained_step_torch(h, w_level, node, level, trie, mode, scores=scores, beams=beams,
                                      temperature=temperature, generator=generator, seed=seed,
                                      renormalize=renormalize, bias=bias)
    tensors, strides, constexprs = _row_tile_args(h, w_level, node, level, trie, renormalize, bias, config,
                                                  lookup)
    if mode == "sample":
        return _sample_triton(tensors, strides, constexprs, level, trie, temperature, generator, seed)
    return _beam_triton(tensors, strides, constexprs, level, trie, scores, B, beams_in, beams)


# ============================================================================================ compiled ops
def _compiled_op(mode: str):
    return backends.extension_op("constrained_step_beam" if mode == "beam" else "constrained_step_sample")


def _has_cuda_kernel(op) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op.default._schema.name, "CUDA"))
    except (AttributeError, RuntimeError):
        return False


def _compiled_step(device_type: str, h, w_level, node, level, trie, mode, scores, beams, temperature, generator,
                   seed, renormalize, bias):
    _check_inputs(h, w_level, node, level, trie, mode, bias)
    op = _compiled_op(mode)
    backend = "cpp" if device_type == "cpu" else "cuda"
    if op is None:
        raise RuntimeError(f"the '{backend}' constrained_step backend needs the compiled extension "
                           f"gflowgr_core._C with its constrained_step ops (pip install --no-build-isolation -e .)")
    if h.device.type != device_type:
        raise ValueError(f"the '{backend}' constrained_step backend runs on {device_type} tensors, got h on "
                         f"{h.device}")
    lo, hi = _level_bounds(trie, level)
    # The ops read every tensor through its data pointer: strided views (e.g. ``nodes[:, 0]``) are packed here.
    h, w_level, node = h.contiguous(), w_level.contiguous(), node.long().contiguous()
    bias = None if bias is None else bias.contiguous()
    if mode == "sample":
        _check_temperature(temperature)
        key = noise_key(seed, generator, h.device)
        code, nxt, logp = op(h, w_level, bias, node, trie.indptr, trie.child_code, trie.child_node, lo, hi,
                             key, int(level), float(temperature), bool(renormalize))
        return SampleStep(code=code, next_node=nxt, logp=logp)
    _, _, beams = beam_shape(scores, beams, h.shape[0])
    parent, code, nxt, score = op(h, w_level, bias, node, trie.indptr, trie.child_code, trie.child_node, lo, hi,
                                  scores.contiguous(), beams, bool(renormalize))
    return BeamStep(parent=parent, code=code, next_node=nxt, score=score)


def constrained_step_cpp(h: torch.Tensor, w_level: torch.Tensor, node: torch.Tensor, level: int, trie,
                         mode: str = "beam", *, scores: torch.Tensor | None = None, beams: int | None = None,
                         temperature: float = 1.0, generator: torch.Generator | None = None, seed=None,
                         renormalize: bool = True, bias: torch.Tensor | None = None):
    """The constrained step on the C++ CPU op (OpenMP over rows; only each row's children are scored when
    ``renormalize``); arguments and results as :func:`~gflowgr_core.decoding.step.constrained_step_torch`."""
    return _compiled_step("cpu", h, w_level, node, level, trie, mode, scores, beams, temperature, generator, seed,
                          renormalize, bias)


def constrained_step_cuda(h: torch.Tensor, w_level: torch.Tensor, node: torch.Tensor, level: int, trie,
                          mode: str = "beam", *, scores: torch.Tensor | None = None, beams: int | None = None,
                          temperature: float = 1.0, generator: torch.Generator | None = None, seed=None,
                          renormalize: bool = True, bias: torch.Tensor | None = None):
    """The constrained step on the CUDA op (cuBLAS logits, then one warp per row for the mask, log-softmax
    and the row's top-k, and one warp per batch element for the merge); arguments and results as
    :func:`~gflowgr_core.decoding.step.constrained_step_torch`."""
    return _compiled_step("cuda", h, w_level, node, level, trie, mode, scores, beams, temperature, generator,
                          seed, renormalize, bias)


# ============================================================================================ registration
# What this installation provides: triton importable; the extension's constrained_step ops; their CUDA kernels.
if triton is not None:
    backends.register(OP, "triton", constrained_step_triton)
if _compiled_op("beam") is not None:
    backends.register(OP, "cpp", constrained_step_cpp)
    if _has_cuda_kernel(_compiled_op("beam")):
        backends.register(OP, "cuda", constrained_step_cuda)
