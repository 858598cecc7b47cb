"""The GFlowNet loss from hidden states: constrained log P_F plus a balance objective, and its dispatcher.

:func:`gfn_loss_reference` is the specification of the fused kernel (docs/ARCHITECTURE.md, kernel
contract 2): per-step constrained ``log P_F`` from ``h`` and the SID rows of the head (never ``[T, L, V]``
logits), then the TB / DB / SubTB residuals and their weighted mean. :func:`gfn_loss` dispatches to the
best registered implementation for the device (``backend="auto"``) or to the one asked for, and returns
which one ran (the rule is :func:`gflowgr_core.backends.resolve_backend`). Accelerated implementations
register themselves with :func:`register_gfn_loss_backend` when their module is imported.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .. import backends
from .. import debug as _debug
from .balance import BalanceObjective, make_objective
from .logpf import constrained_log_pf

# Modules that register accelerated implementations when imported (see backends.load_providers).
_PROVIDERS = ("gflowgr_core.objectives.fused",)


def resolve_objective(objective: Union[str, BalanceObjective], lambda_subtb: float = 0.9) -> BalanceObjective:
    """An objective instance from a name (``"tb"`` | ``"db"`` | ``"subtb"``, using ``lambda_subtb``) or as is."""
    if isinstance(objective, BalanceObjective):
        return objective
    if str(objective).lower() in ("subtb", "subtrajectory_balance"):
        return make_objective(objective, lamda=lambda_subtb)
    return make_objective(objective)


def gfn_loss_reference(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie,
                       log_f: Optional[torch.Tensor], log_z: torch.Tensor, log_r: torch.Tensor,
                       objective: Union[str, BalanceObjective] = "tb", lambda_subtb: float = 0.9,
                       weights: Optional[torch.Tensor] = None, support: str = "trie", *,
                       codes_per_level: Optional[Sequence[int]] = None, w_full: Optional[torch.Tensor] = None,
                       sid_token_ids: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GFlowNet loss of SID trajectories from hidden states (plain PyTorch; the spec of the fused kernel).

    ``log_pf = constrained_log_pf(h, w_sid, codes, trie, support)`` and
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
        lambda_subtb: SubTB's ``lambda`` when ``objective="subtb"``.
        weights: optional ``[T]`` non-negative trajectory weights.
        support: ``"trie"`` | ``"level"`` | ``"vocab"`` (see :func:`~.logpf.constrained_log_pf`).
        codes_per_level, w_full, sid_token_ids, bias: as in :func:`~.logpf.constrained_log_pf`.

    Returns:
        ``(loss, log_pf)``: the scalar loss and the ``[T, L]`` per-step log-probabilities.
    """
    obj = resolve_objective(objective, lambda_subtb)
    log_pf = constrained_log_pf(h, w_sid, codes, trie, support, codes_per_level=codes_per_level,
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


def _log_pf_reference(h, w_sid, codes, trie, support, *, codes_per_level, w_full, sid_token_ids, bias):
    return constrained_log_pf(h, w_sid, codes, trie, support, codes_per_level=codes_per_level, w_full=w_full,
                              sid_token_ids=sid_token_ids, bias=bias)


backends.define_op("gfn_loss", _reference_impl, _PROVIDERS)
backends.define_op("sid_log_probs", _log_pf_reference, _PROVIDERS)


def register_gfn_loss_backend(name: str, fn: Callable, device_types: Optional[Sequence[str]] = None,
                              supports: Optional[Callable[..., bool]] = None) -> None:
    """Register an implementation of the GFlowNet loss for the dispatcher.

    Args:
        name: one of :data:`gflowgr_core.backends.BACKENDS` other than ``"torch"``.
        fn: called as ``fn(h, w_sid, codes, trie, log_f, log_z, log_r, objective=<BalanceObjective>,
            weights=..., support=..., codes_per_level=..., w_full=..., sid_token_ids=..., bias=...)`` and
            returning ``(loss, log_pf)`` with the semantics of :func:`gfn_loss_reference`.
        device_types: the ``torch.device.type`` values it runs on (default: those of ``name`` in
            :data:`gflowgr_core.backends.RUNS_ON`).
        supports: optional predicate taking the same keyword arguments as ``fn`` (without the tensors
            ``h``..``log_r``); ``False`` means this call's options are not implemented, and the call runs on
            the backend ``"auto"`` picks instead.
    """
    backends.register("gfn_loss", name, fn, device_types, supports)


def registered_gfn_loss_backends() -> tuple[str, ...]:
    """Names of the registered implementations, ``"torch"`` included, fastest first."""
    return backends.registered("gfn_loss")


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


def gfn_loss(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie,
             log_f: Optional[torch.Tensor], log_z: torch.Tensor, log_r: torch.Tensor,
             objective: Union[str, BalanceObjective] = "tb", lambda_subtb: float = 0.9,
             weights: Optional[torch.Tensor] = None, support: str = "trie", *,
             codes_per_level: Optional[Sequence[int]] = None, w_full: Optional[torch.Tensor] = None,
             sid_token_ids: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
             backend: str = "auto") -> GFNLossOutput:
    """GFlowNet loss of SID trajectories from hidden states, on the best available backend.

    Same arguments and semantics as :func:`gfn_loss_reference`, plus ``backend``: ``"auto"`` or any name of
    :data:`gflowgr_core.backends.BACKENDS`, chosen by :func:`gflowgr_core.backends.resolve_backend` (a
    backend without a usable implementation for this call falls back to the ``"auto"`` choice: the fused
    Triton kernel for CUDA tensors and support ``"trie"``/``"level"``, else the PyTorch reference). Under
    autocast ``h``, ``w_sid``, ``w_full`` and ``bias`` are cast to the autocast dtype first
    (:func:`autocast_operands`).

    Returns:
        :class:`GFNLossOutput` ``(loss, log_pf[T, L], backend)``, ``backend`` naming the implementation
        that ran.
    """
    if _debug.enabled():
        for name_, value in (("log_r", log_r), ("log_z", log_z), ("log_f", log_f), ("weights", weights)):
            _debug.check_finite(name_, value, "gfn_loss")
    obj = resolve_objective(objective, lambda_subtb)
    h, w_sid, w_full, bias = autocast_operands(h.device.type, h, w_sid, w_full, bias)
    options = dict(objective=obj, weights=weights, support=support, codes_per_level=codes_per_level,
                   w_full=w_full, sid_token_ids=sid_token_ids, bias=bias)
    name = backends.resolve_backend("gfn_loss", backend, h.device, options).name
    loss, log_pf = backends.implementation("gfn_loss", name)(h, w_sid, codes, trie, log_f, log_z, log_r,
                                                              **options)
    return GFNLossOutput(loss, log_pf, name)


def sid_log_probs(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie=None,
                  support: str = "trie", *, codes_per_level: Optional[Sequence[int]] = None,
                  w_full: Optional[torch.Tensor] = None, sid_token_ids: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Per-step ``log P_F[T, L]`` on the best backend: the fused Triton kernel or the reference.

    The same arguments as :func:`~.logpf.constrained_log_pf`, plus ``backend``, chosen by the rule of
    :func:`gflowgr_core.backends.resolve_backend` as in :func:`gfn_loss` (the backend that ran:
    ``gflowgr_core.backends.last_resolution("sid_log_probs")``), and the same autocast rule. ``"auto"``
    takes the fused kernel (:func:`~.fused.fused_constrained_log_pf`) for CUDA tensors when triton is
    available and the support is ``"trie"`` or ``"level"``, else the PyTorch reference. This is the path of
    the SFT cross-entropy and of the DPO / S-DPO log-probabilities.
    """
    h, w_sid, w_full, bias = autocast_operands(h.device.type, h, w_sid, w_full, bias)
    options = dict(support=support, codes_per_level=codes_per_level, w_full=w_full, sid_token_ids=sid_token_ids,
                   bias=bias)
    name = backends.resolve_backend("sid_log_probs", backend, h.device, options).name
    return backends.implementation("sid_log_probs", name)(h, w_sid, codes, trie, **options)
