"""The GFlowNet loss from hidden states: constrained log P_F plus a balance objective, and its dispatcher.

:func:`gfn_loss_reference` is the specification of the fused kernel (docs/ARCHITECTURE.md, kernel
contract 2): per-step constrained ``log P_F`` from ``h`` and the SID rows of the head (never ``[T, L, V]``
logits), then the TB / DB / SubTB residuals and their weighted mean. :func:`gfn_loss` dispatches to the
best registered implementation for the device (``backend="auto"``) or to the one asked for, and returns
which one ran. Accelerated implementations register themselves with :func:`register_gfn_loss_backend`
when their module is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .. import backends
from .. import debug as _debug
from .balance import BalanceObjective, make_objective
from .logpf import constrained_log_pf

# Best first; "torch" is always registered and is the last resort.
_PREFERENCE = ("triton", "cuda", "cpp", "torch")

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
    """What :func:`gfn_loss` returns: the scalar ``loss``, ``log_pf[T, L]`` and the ``backend`` that ran."""
    loss: torch.Tensor
    log_pf: torch.Tensor
    backend: str


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    device_types: tuple[str, ...]
    supports: Optional[Callable[..., bool]]


_IMPLS: dict[str, _Impl] = {}


def register_gfn_loss_backend(name: str, fn: Callable, device_types: Sequence[str],
                              supports: Optional[Callable[..., bool]] = None) -> None:
    """Register an implementation of the GFlowNet loss for the dispatcher.

    Args:
        name: one of :data:`gflowgr_core.backends.BACKENDS` other than ``"torch"``.
        fn: called as ``fn(h, w_sid, codes, trie, log_f, log_z, log_r, objective=<BalanceObjective>,
            weights=..., support=..., codes_per_level=..., w_full=..., sid_token_ids=..., bias=...)`` and
            returning ``(loss, log_pf)`` with the semantics of :func:`gfn_loss_reference`.
        device_types: the ``torch.device.type`` values it runs on (e.g. ``("cuda",)``).
        supports: optional predicate taking the same keyword arguments as ``fn`` (without the tensors
            ``h``..``log_r``); ``False`` means this call's options are not implemented. Under
            ``backend="auto"`` such calls fall through to the next backend; an explicit request raises.
    """
    if name not in backends.BACKENDS or name == "torch":
        raise ValueError(f"cannot register {name!r}: expected one of {backends.BACKENDS[1:]}")
    _IMPLS[name] = _Impl(fn, tuple(device_types), supports)


def registered_gfn_loss_backends() -> tuple[str, ...]:
    """Names of the registered implementations, ``"torch"`` included."""
    return tuple(n for n in _PREFERENCE if n == "torch" or n in _IMPLS)


def _reference_impl(h, w_sid, codes, trie, log_f, log_z, log_r, *, objective, weights, support,
                    codes_per_level, w_full, sid_token_ids, bias):
    return gfn_loss_reference(h, w_sid, codes, trie, log_f, log_z, log_r, objective, weights=weights,
                              support=support, codes_per_level=codes_per_level, w_full=w_full,
                              sid_token_ids=sid_token_ids, bias=bias)


def _usable(name: str, device_type: str, options: dict) -> Optional[str]:
    """``None`` when backend ``name`` can run this call, otherwise the reason it cannot."""
    if name == "torch":
        return None
    impl = _IMPLS.get(name)
    if impl is None:
        return f"no {name!r} implementation of gfn_loss is registered"
    if device_type not in impl.device_types:
        return f"the {name!r} gfn_loss runs on {impl.device_types}, not on {device_type!r} tensors"
    if impl.supports is not None and not impl.supports(**options):
        return f"the {name!r} gfn_loss does not implement these options ({_describe(options)})"
    return None


def _describe(options: dict) -> str:
    return f"objective={options['objective']!r}, support={options['support']!r}"


def gfn_loss(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie,
             log_f: Optional[torch.Tensor], log_z: torch.Tensor, log_r: torch.Tensor,
             objective: Union[str, BalanceObjective] = "tb", lambda_subtb: float = 0.9,
             weights: Optional[torch.Tensor] = None, support: str = "trie", *,
             codes_per_level: Optional[Sequence[int]] = None, w_full: Optional[torch.Tensor] = None,
             sid_token_ids: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
             backend: str = "auto") -> GFNLossOutput:
    """GFlowNet loss of SID trajectories from hidden states, on the best available backend.

    Same arguments and semantics as :func:`gfn_loss_reference`, plus ``backend``: ``"auto"`` picks the first
    registered implementation in ``triton, cuda, cpp, torch`` order that is available here, runs on
    ``h.device`` and implements these options; a named backend runs that one or raises saying why not.

    Returns:
        :class:`GFNLossOutput` ``(loss, log_pf[T, L], backend)``, ``backend`` naming the implementation
        that ran.
    """
    backends.load_providers(*_PROVIDERS)
    if _debug.enabled():
        for name_, value in (("log_r", log_r), ("log_z", log_z), ("log_f", log_f), ("weights", weights)):
            _debug.check_finite(name_, value, "gfn_loss")
    obj = resolve_objective(objective, lambda_subtb)
    options = dict(objective=obj, weights=weights, support=support, codes_per_level=codes_per_level,
                   w_full=w_full, sid_token_ids=sid_token_ids, bias=bias)
    device_type = h.device.type
    preference = tuple(n for n in _PREFERENCE if _usable(n, device_type, options) is None)
    name = backends.resolve(backend, h.device, preference)
    reason = _usable(name, device_type, options)
    if reason is not None:
        raise RuntimeError(f"gfn_loss: backend {name!r} was requested but {reason}")
    fn = _reference_impl if name == "torch" else _IMPLS[name].fn
    loss, log_pf = fn(h, w_sid, codes, trie, log_f, log_z, log_r, **options)
    return GFNLossOutput(loss, log_pf, name)


def sid_log_probs(h: torch.Tensor, w_sid: Optional[torch.Tensor], codes: torch.Tensor, trie=None,
                  support: str = "trie", *, codes_per_level: Optional[Sequence[int]] = None,
                  w_full: Optional[torch.Tensor] = None, sid_token_ids: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Per-step ``log P_F[T, L]`` on the best backend: the fused Triton kernel or the reference.

    The same arguments as :func:`~.logpf.constrained_log_pf`. ``backend="auto"`` takes the fused kernel
    (:func:`~.fused.fused_constrained_log_pf`) for CUDA tensors when triton is available and the support is
    ``"trie"`` or ``"level"``, else the PyTorch reference; ``"torch"`` and ``"triton"`` force one. This is
    the path of the SFT cross-entropy and of the DPO / S-DPO log-probabilities.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"sid_log_probs: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    fused_ok = support in ("trie", "level") and "triton" in backends.available_backends()
    if backend == "triton" and not fused_ok:
        raise RuntimeError(f"sid_log_probs: the 'triton' backend needs triton (with a CUDA device or "
                           f"TRITON_INTERPRET=1) and support 'trie' or 'level'; got support={support!r}, "
                           f"available backends {backends.available_backends()}")
    if backend == "triton" or (backend == "auto" and fused_ok and h.is_cuda):
        from .fused import fused_constrained_log_pf

        return fused_constrained_log_pf(h, w_sid, codes, trie, support, codes_per_level=codes_per_level,
                                        bias=bias)
    return constrained_log_pf(h, w_sid, codes, trie, support, codes_per_level=codes_per_level, w_full=w_full,
                              sid_token_ids=sid_token_ids, bias=bias)
