"""One trie-constrained decoding step: the reference op and its backend dispatcher.

``constrained_step`` turns hidden states at one decision level into the next SID code of every row:
logits only for the level's codes, masked to the trie children of each row's node, log-softmax
renormalised over those children; then either a seeded Gumbel-max sample per row or one step of beam
search. The plain-PyTorch version here is the specification; fused backends (Triton, C++/CUDA) register
themselves with ``gflowgr_core.backends.register("constrained_step", ...)`` and
:func:`constrained_step` runs the one :func:`gflowgr_core.backends.resolve_backend` picks.

No function here synchronises with the host or branches on tensor values, and output shapes depend only
on input shapes and Python ints, so the op can run inside CUDA graphs and device-side decode loops.

Sampling noise is not drawn from an RNG stream: the Gumbel variable of ``(row, code)`` at decision level
``level`` is a counter-based hash of ``(key, level, row, code)`` (:func:`gumbel_noise`), where ``key`` is
the ``seed`` or one int64 drawn from the ``generator`` (:func:`noise_key`). Every backend evaluates the
same hash, so all backends select the same codes for the same key.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import backends
from .. import debug as _debug
from ..sid.trie import Trie

__all__ = ["SampleStep", "BeamStep", "constrained_step", "constrained_step_torch", "OP", "MODES", "noise_key",
           "gumbel_noise"]

MODES = ("beam", "sample")
_NEG_INF = float("-inf")


class SampleStep(NamedTuple):
    """Result of a ``mode="sample"`` step (all ``[R]``).

    ``code``: chosen code (``-1`` for rows without children), ``next_node``: the child node (``-1``
    likewise), ``logp``: log-probability of the chosen code under the policy at temperature 1
    (renormalised over the children when ``renormalize``), ``-inf`` for rows without children.
    """

    code: torch.Tensor
    next_node: torch.Tensor
    logp: torch.Tensor


class BeamStep(NamedTuple):
    """Result of a ``mode="beam"`` step (all ``[B, beams]``, best first).

    ``parent``: index of the source beam in ``[0, beams_in)``; ``code``: appended code; ``next_node``:
    the new node; ``score``: running score (sum of step log-probs). Dead slots (fewer live candidates than
    beams) have ``score = -inf``, ``code = -1``, ``next_node = -1`` and a valid ``parent``.
    """

    parent: torch.Tensor
    code: torch.Tensor
    next_node: torch.Tensor
    score: torch.Tensor


def _step_log_probs(h: torch.Tensor, w_level: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                    renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(logits[R, K], logp[R, K])``: ``logp`` is ``-inf`` off the children.

    Rows without any child keep finite logits in the softmax so no NaN appears; their ``logp`` is all
    ``-inf``.
    """
    logits = h.float() @ w_level.float().t()
    if bias is not None:
        logits = logits + bias.float()
    if renormalize:
        has_child = mask.any(dim=-1, keepdim=True)
        normed = torch.where(mask | ~has_child, logits, torch.full_like(logits, _NEG_INF))
        logp = torch.log_softmax(normed, dim=-1)
    else:
        logp = torch.log_softmax(logits, dim=-1)
    return logits, logp.masked_fill(~mask, _NEG_INF)


# The noise hash works on 32-bit unsigned values held in int64; both multipliers are odd and below 2**31,
# so every product stays below 2**63 and the same arithmetic is exact in torch, Triton, C++ and CUDA.
# The Triton kernels read these constants from here (gflowgr_core.kernels.utils).
HASH_MASK32 = 0xFFFFFFFF
HASH_MUL1, HASH_MUL2, HASH_INC = 0x21F0AAAD, 0x735A2D97, 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective avalanche of 32-bit values (xor-shift / multiply rounds)."""
    x = x ^ (x >> 16)
    x = (x * HASH_MUL1) & HASH_MASK32
    x = x ^ (x >> 15)
    x = (x * HASH_MUL2) & HASH_MASK32
    return x ^ (x >> 15)


def _absorb(state: torch.Tensor, value) -> torch.Tensor:
    """Hash state after absorbing ``value`` (< 2**32); the increment keeps all-zero inputs off zero."""
    return _mix32(((state ^ value) + HASH_INC) & HASH_MASK32)


def noise_key(seed, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``LongTensor[1]`` on ``device``: the key of the sampling noise.

    ``seed`` (a Python int, taken modulo 2**64, or an integer tensor with one element, e.g. a device tensor
    updated inside a CUDA graph) is the key itself; otherwise one int64 is drawn from ``generator`` (or the
    global RNG of ``device``) on the device the generator lives on, without a host synchronisation.
    """
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"seed tensor must hold one integer, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if seed is not None:
        value = int(seed) & (2 ** 64 - 1)
        return torch.full((1,), value - 2 ** 64 if value >= 2 ** 63 else value, dtype=torch.int64, device=device)
    gen_device = generator.device if generator is not None else device
    key = torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return key.to(device)


def gumbel_noise(key: torch.Tensor, level: int, rows: int, codes: int) -> torch.Tensor:
    """Float32 ``[rows, codes]`` standard Gumbel noise, a pure function of ``(key, level, row, code)``.

    ``x = mix(absorb(absorb(absorb(absorb(absorb(0, key_lo), key_hi), level), row), code))`` with the
    32-bit :func:`_absorb` / :func:`_mix32` above, ``u = ((x >> 8) | 1) * 2**-24`` (exact in fp32, strictly
    inside (0, 1)) and ``g = -log(-log(u))`` in fp32. Fused backends compute exactly this.
    """
    key = key.reshape(1).long()
    state = _absorb(torch.zeros_like(key), key & HASH_MASK32)
    state = _absorb(_absorb(state, (key >> 32) & HASH_MASK32), int(level))
    row = _absorb(state, torch.arange(rows, device=key.device))[:, None]
    x = _mix32(_absorb(row, torch.arange(codes, device=key.device)[None, :]))
    u = ((x >> 8) | 1).to(torch.float32) * 2.0 ** -24
    return -torch.log(-torch.log(u))


def _check_inputs(h, w_level, node, level, trie, mode, bias):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if h.dim() != 2 or w_level.dim() != 2 or h.shape[1] != w_level.shape[1]:
        raise ValueError(f"h must be [R, d] and w_level [K, d] with the same d, got {tuple(h.shape)} and "
                         f"{tuple(w_level.shape)}")
    if not 0 <= level < trie.num_levels:
        raise ValueError(f"level {level} outside [0, {trie.num_levels})")
    k = trie.codes_per_level[level]
    if w_level.shape[0] != k:
        raise ValueError(f"w_level has {w_level.shape[0]} rows, level {level} has K = {k} codes")
    if node.shape != (h.shape[0],):
        raise ValueError(f"node must be [R] = [{h.shape[0]}], got {tuple(node.shape)}")
    if bias is not None and bias.shape != (k,):
        raise ValueError(f"bias must be [K] = [{k}], got {tuple(bias.shape)}")


def beam_shape(scores: torch.Tensor | None, beams: int | None, rows: int) -> tuple[int, int, int]:
    """``(B, beams_in, beams)`` of a beam step over ``rows = B * beams_in`` rows; raises on a mismatch."""
    if scores is None or scores.dim() != 2:
        raise ValueError("beam mode needs running scores [B, beams_in]")
    b, beams_in = scores.shape
    if b * beams_in != rows:
        raise ValueError(f"scores {tuple(scores.shape)} do not match R = {rows} rows (need B * beams_in = R)")
    beams = beams_in if beams is None else int(beams)
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    return b, beams_in, beams


def constrained_step_torch(h: torch.Tensor, w_level: torch.Tensor, node: torch.Tensor, level: int, trie: Trie,
                           mode: str = "beam", *, scores: torch.Tensor | None = None, beams: int | None = None,
                           temperature: float = 1.0, generator: torch.Generator | None = None,
                           seed=None, renormalize: bool = True, bias: torch.Tensor | None = None):
    """Plain-PyTorch reference of the constrained step (the specification of every backend).

    Args:
        h: ``[R, d]`` hidden states at decision level ``level``.
        w_level: ``[K_level, d]`` LM-head rows of the level's codes (code order).
        node: ``LongTensor[R]`` current trie node of each row (a level-``level`` node; ``-1`` = dead row).
        level: decision level ``l`` (chooses code ``c_{l+1}``).
        trie: the catalogue :class:`~gflowgr_core.sid.trie.Trie`, on ``h``'s device.
        mode: ``"sample"`` or ``"beam"``.
        scores: beam mode: running scores ``[B, beams_in]`` with ``R = B * beams_in`` (row ``b*beams_in+i``
            is beam ``i`` of batch element ``b``); ``-inf`` marks a dead beam.
        beams: beam mode: beams kept per batch element (default ``beams_in``).
        temperature: sample mode: logits are divided by it before sampling (``> 0``).
        generator: sample mode, when no ``seed`` is given: draws the noise key (:func:`noise_key`).
        seed: sample mode: the noise key, a Python int or a one-element integer tensor (:func:`noise_key`).
        renormalize: log-softmax over the node's children (``True``) or over all the level's codes, then
            masked to the children (``False``).
        bias: ``[K_level]`` LM-head bias of the level's codes, if the head has one.
    Returns:
        :class:`SampleStep` (``[R]`` each) or :class:`BeamStep` (``[B, beams]`` each).
    """
    _check_inputs(h, w_level, node, level, trie, mode, bias)
    mask = trie.child_mask(node, level)
    logits, logp = _step_log_probs(h, w_level, bias, mask, renormalize)
    R, K = logp.shape
    if mode == "sample":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # Relative probabilities among the children are the same with or without renormalisation.
        noise = gumbel_noise(noise_key(seed, generator, h.device), level, R, K)
        perturbed = (logits / temperature + noise).masked_fill(~mask, _NEG_INF)
        code = perturbed.argmax(dim=-1)
        has_child = mask.any(dim=-1)
        code = torch.where(has_child, code, torch.full_like(code, -1))
        lp = logp.gather(1, code.clamp_min(0)[:, None]).squeeze(1)
        lp = torch.where(has_child, lp, torch.full_like(lp, _NEG_INF))
        nxt = trie.next_node(node, code, level=level)
        return SampleStep(code=code, next_node=nxt, logp=lp)

    B, beams_in, beams = beam_shape(scores, beams, R)
    cand = (scores.float().reshape(R, 1) + logp).reshape(B, beams_in * K)
    if beams > beams_in * K:
        cand = torch.cat([cand, cand.new_full((B, beams - beams_in * K), _NEG_INF)], dim=1)
    # A stable descending sort keeps equal scores in flat-index order: ties go to the lower index.
    top, flat = torch.sort(cand, dim=1, descending=True, stable=True)
    top, flat = top[:, :beams], flat[:, :beams]
    alive = top > _NEG_INF
    flat = torch.where(alive, flat, torch.zeros_like(flat))
    parent = flat // K
    code = torch.where(alive, flat % K, torch.full_like(flat, -1))
    parent_node = node.reshape(B, beams_in).gather(1, parent)
    nxt = trie.next_node(parent_node, code, level=level)
    return BeamStep(parent=parent, code=code, next_node=nxt, score=top)


# --------------------------------------------------------------------------- dispatch
#: The op's name in :mod:`gflowgr_core.backends` (``backends.register(OP, ...)``, ``backends.last_resolution(OP)``).
OP = "constrained_step"
# Modules that register accelerated implementations when imported (see backends.load_providers).
_PROVIDERS = ("gflowgr_core.kernels.constrained_step",)
backends.define_op(OP, constrained_step_torch, _PROVIDERS)


def constrained_step(h: torch.Tensor, w_level: torch.Tensor, node: torch.Tensor, level: int, trie: Trie,
                     mode: str = "beam", *, scores: torch.Tensor | None = None, beams: int | None = None,
                     temperature: float = 1.0, generator: torch.Generator | None = None,
                     seed: int | None = None, renormalize: bool = True, bias: torch.Tensor | None = None,
                     backend: str = "auto"):
    """Trie-constrained decoding step on the best available backend.

    Arguments and results are those of :func:`constrained_step_torch`, plus:

    Args:
        seed: sample mode: the noise key (see :func:`noise_key`); takes precedence over ``generator``.
        backend: ``"auto"`` or a name from :data:`gflowgr_core.backends.BACKENDS`, chosen by
            :func:`gflowgr_core.backends.resolve_backend`; which one ran and why is
            ``gflowgr_core.backends.last_resolution("constrained_step")``.
    """
    if _debug.enabled():  # node ids index the kernels' tables: out-of-range ids would read past them
        _debug.check_trie_nodes(node, trie, level, "constrained_step")
    name = backends.resolve_backend(OP, backend, h.device).name
    return backends.implementation(OP, name)(h, w_level, node, level, trie, mode, scores=scores, beams=beams,
                                              temperature=temperature, generator=generator, seed=seed,
                                              renormalize=renormalize, bias=bias)
