"""Helpers shared by the Triton op files of ``gflowgr_core.kernels``.

Plain Python (importable without triton): :data:`POISON_OUTPUTS` and :func:`alloc_output` (poisoned outputs
for tests), :func:`interpreting`, :func:`next_pow2`. With triton installed, the ``@triton.jit`` building
blocks both ops use: :func:`mm` (a ``tl.dot`` with fp32 accumulation) and :func:`logits_tile` (a
``[rows, codes]`` tile of ``h . W (+ bias)``), plus the constants of the sampling-noise hash as
``tl.constexpr`` values read from their specification, :mod:`gflowgr_core.decoding.step`.
"""
from __future__ import annotations

import os

import torch

from gflowgr_core.decoding import step as _step

try:
    import triton
    import triton.language as tl
except ImportError:  # the compiled constrained_step backends do not need triton
    triton = None

__all__ = ["POISON_OUTPUTS", "POISON_INT", "alloc_output", "interpreting", "next_pow2"]

# Tests set this to fill every kernel output (and scratch buffer) with NaN, or a sentinel for integer
# tensors, before the kernels run, so an element a kernel forgets to write cannot pass unnoticed.
POISON_OUTPUTS = False
POISON_INT = -987654321


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def alloc_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor for a kernel to fill, poisoned when :data:`POISON_OUTPUTS` is set."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else POISON_INT
    return torch.full(shape, fill, dtype=dtype, device=device)


def next_pow2(x: int) -> int:
    """Smallest power of two ``>= x`` (1 for ``x <= 1``)."""
    return 1 << max(0, int(x) - 1).bit_length()


if triton is not None:
    # Triton kernels may only read module globals that are constexpr.
    HASH_MASK32 = tl.constexpr(_step.HASH_MASK32)
    HASH_MUL1 = tl.constexpr(_step.HASH_MUL1)
    HASH_MUL2 = tl.constexpr(_step.HASH_MUL2)
    HASH_INC = tl.constexpr(_step.HASH_INC)

    @triton.jit
    def mm(a, b, acc, DOT_F32: tl.constexpr):
        """``acc + a @ b`` with fp32 accumulation; ``DOT_F32`` runs the product in IEEE fp32 (fp32 or mixed
        operands, and the interpreter, which multiplies 16-bit floats as their bit patterns)."""
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def logits_tile(H, W, BIAS, row_off, k_idx, row_ok, k_ok, D, stride_hd, stride_wk, stride_wd,
                    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """``[BLOCK_R, BLOCK_K]`` fp32 logits ``h[rows] . W[k_idx] (+ bias[k_idx])``, 0 where masked.

        ``row_off``: int64 element offset of each row's hidden state in ``H``; ``k_idx``: int64 row of ``W``
        (and entry of ``BIAS``) of each code.
        """
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a = tl.load(H + row_off[:, None] + ds[None, :].to(tl.int64) * stride_hd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            # W is read transposed, [BLOCK_D, BLOCK_K], straight from its row-major layout.
            b = tl.load(W + k_idx[None, :] * stride_wk + ds[:, None].to(tl.int64) * stride_wd,
                        mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            acc = mm(a, b, acc, DOT_F32)
        if HAS_BIAS:
            acc += tl.load(BIAS + k_idx, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        return acc
