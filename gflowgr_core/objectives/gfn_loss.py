"""The GFlowNet loss from hidden states: constrained log P_F plus a balance objective, and its dispatcher.

:func:`gfn_loss_reference` is the specification of the fused path (docs/ARCHITECTURE.md, kernel
contract 2): per-step constrained ``log P_F`` from ``h`` and the SID rows of the head (never ``[T, L, V]``
logits), then the TB / DB / SubTB residuals and their weighted mean. :func:`gfn_loss` runs the
implementation :func:`gflowgr_core.backends.resolve_backend` picks for the ``gfn_loss`` op (the fused one,
``gflowgr_core.kernels.constrained_log_pf.gfn_loss_triton``, registers itself when that module is
imported) and returns which one ran.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from .. import backends
from .. import debug as _debug
from .balance import BalanceObjective, make_objective
from .logpf import autocast_operands, check_operand_dtypes, constrained_log_pf_torch

#: The op's name in :mod:`gflowgr_core.backends`.
OP = "gfn_loss"
# Modules that register accelerated implementations when imported (see backends.load_providers).
_PROVIDERS = ("gflowgr_core.kernels.constrained_log_pf",)


def resolve_objective(objective: Union[str, BalanceObjective], subtb_lambda: float = 0.9) -> BalanceObjective:
    """An objective instance from a name (``"tb"`` | ``"db"`` | ``"subtb"``, using ``subtb_lambda``) or as is."""
    if isinstance(objective, BalanceObjective):
        return objective
    if str(objective).lower() in ("subtb", "subtrajectory_balance"):
        return make_objective(objective, subtb_lambda=subtb_lambda)
    return make_objective(objective)


def gfn_loss_reference(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie,
                       log_f: Optional[torch.Tensor], log_z: torch.Tensor, log_r: torch.Tensor,
                       objective: Union[str, BalanceObjective] = "tb", subtb_lambda: float = 0.9,
                       weights: Optional[torch.Tensor] = None, support: str = "trie", *,
                       codes_per_level: Optional[Sequence[int]] = None, w_full: Optional[torch.Tensor] = None,
                       sid_token_ids: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GFlowNet loss of SID trajectories from hidden states (plain PyTorch; the spec of the fused kernel).

    ``log_pf = constrained_log_pf_torch(h, w_sid, codes, trie, support)`` and
    ``loss = sum_tau w_tau * L_obj(log_pf_tau, log_z_tau, log_f_tau, log_r_tau) / T``.

    Args:
        h: ``[T, L, d]`` hidden states at the decision positions.
        w_sid: ``[sum K_l, d]`` SID rows of the LM head, level-major.
        codes: ``LongTensor[T, L]`` trajectories' SIDs.
        trie: the catalogue :class:`~gflowgr_core.sid.trie.Trie` (required for ``support="trie"``).
        log_f: ``[T, L-1]`` ``log F(s_1..s_{L-1})``; may be ``None`` for TB.
        log_z: ``[T]`` ``log Z(U) = log F(s_0)``.
        log_r: ``[T]`` ``log R(s_L) = log F(s_L)``.
        objective: ``"tb"`` | ``"db"`` | ``"subtb"`` or a :class:`~.balance.BalanceObjective`.
        subtb_lambda: SubTB's ``lambda`` when ``objective="subtb"``.
        weights: optional ``[T]`` non-negative trajectory weights.
        support: ``"trie"`` | ``"level"`` | ``"vocab"`` (see :func:`~.logpf.constrained_log_pf_torch`).
        codes_per_level, w_full, sid_token_ids, bias: as in :func:`~.logpf.constrained_log_pf_torch`.

    Returns:
        ``(loss, log_pf)``: the scalar loss and the ``[T, L]`` per-step log-probabilities.
    """
    obj = resolve_objective(objective, subtb_lambda)
    log_pf = constrained_log_pf_torch(h, w_sid, codes, trie, support, codes_per_level=codes_per_level,
                                      w_full=w_full, sid_token_ids=sid_token_ids, bias=bias)
    return obj.loss(log_pf, log_z, log_f, log_r, weights), log_pf


class GFNLossOutput(NamedTuple):
    """What :func:`gfn_loss` returns: the scalar ``loss``, ``log_pf[T, L]`` and the ``backend`` that ran (why
    it was chosen: ``gflowgr_core.backends.last_resolution("gfn_loss").reason``)."""
    loss: torch.Tensor
    log_pf: torch.Tensor
    backend: str


def _reference_impl(h, w_sid, codes, trie, log_f, log_z, log_r, *, objective, weights, support,
                    codes_per_level, w_full, sid_token_ids, bias):
    return gfn_loss_reference(h, w_sid, codes, trie, log_f, log_z, log_r, objective, weights=weights,
                              support=support, codes_per_level=codes_per_level, w_full=w_full,
                              sid_token_ids=sid_token_ids, bias=bias)


backends.define_op(OP, _reference_impl, _PROVIDERS)


def gfn_loss(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie,
             log_f: Optional[torch.Tensor], log_z: torch.Tensor, log_r: torch.Tensor,
             objective: Union[str, BalanceObjective] = "tb", subtb_lambda: float = 0.9,
             weights: Optional[torch.Tensor] = None, support: str = "trie", *,
             codes_per_level: Optional[Sequence[int]] = None, w_full: Optional[torch.Tensor] = None,
             sid_token_ids: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
             backend: str = "auto") -> GFNLossOutput:
    """GFlowNet loss of SID trajectories from hidden states, on the best available backend.

    Same arguments and semantics as :func:`gfn_loss_reference`, plus ``backend``: ``"auto"`` or any name of
    :data:`gflowgr_core.backends.BACKENDS`, chosen by :func:`gflowgr_core.backends.resolve_backend` (a
    backend without a usable implementation for this call falls back to the ``"auto"`` choice: the fused
    Triton kernel for CUDA tensors and support ``"trie"``/``"level"`` in float32/bfloat16/float16, else the
    PyTorch reference: float64 inputs run there, the reason in ``last_resolution("gfn_loss")``). Under
    autocast ``h``, ``w_sid``, ``w_full`` and ``bias`` are cast to the autocast dtype first
    (:func:`~.logpf.autocast_operands`).

    Returns:
        :class:`GFNLossOutput` ``(loss, log_pf[T, L], backend)``, ``backend`` naming the implementation
        that ran.
    """
    if _debug.enabled():
        for name_, value in (("log_r", log_r), ("log_z", log_z), ("log_f", log_f), ("weights", weights)):
            _debug.check_finite(name_, value, "gfn_loss")
    obj = resolve_objective(objective, subtb_lambda)
    h, w_sid, w_full, bias = autocast_operands(h.device.type, h, w_sid, w_full, bias)
    check_operand_dtypes(h, w_sid, support, w_full, bias)
    options = dict(objective=obj, weights=weights, support=support, codes_per_level=codes_per_level,
                   w_full=w_full, sid_token_ids=sid_token_ids, bias=bias)
    name = backends.resolve_backend(OP, backend, h.device, options, dtype=h.dtype).name
    loss, log_pf = backends.implementation(OP, name)(h, w_sid, codes, trie, log_f, log_z, log_r, **options)
    return GFNLossOutput(loss, log_pf, name)
