"""GFlowNet balance objectives over SID trajectories: trajectory, detailed and sub-trajectory balance.

Notation (docs/ARCHITECTURE.md): a batch holds ``T`` trajectories ``s_0 -> ... -> s_L``;
``log_pf[T, L]`` are ``log P_F(c_{l+1} | s_l)``; ``log_z[T] = log F(s_0) = log Z(U)``;
``log_f[T, L-1] = log F(s_1 .. s_{L-1})``; the terminal flow is the reward, ``log F(s_L) := log_r[T]``.
The backward policy is 1 (the trie is a tree), so it does not appear.

Each objective is a small class with ``residuals(...) -> [T]`` (the per-trajectory loss ``L_tau``) and
``loss(...) -> scalar``, the weighted mean over trajectories ``sum_tau w_tau * L_tau / T`` (with ``w = 1``
when no weights are given; note the division is by ``T``, not by ``sum w``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _check(log_pf: torch.Tensor, log_z: torch.Tensor, log_f: Optional[torch.Tensor], log_r: torch.Tensor,
           needs_log_f: bool, name: str) -> None:
    if log_pf.dim() != 2 or log_pf.shape[1] < 1:
        raise ValueError(f"{name}: log_pf must be [T, L] with L >= 1, got {tuple(log_pf.shape)}")
    t, n_levels = log_pf.shape
    if log_z.shape != (t,):
        raise ValueError(f"{name}: log_z must be [T] = [{t}], got {tuple(log_z.shape)}")
    if log_r.shape != (t,):
        raise ValueError(f"{name}: log_r must be [T] = [{t}], got {tuple(log_r.shape)}")
    if needs_log_f:
        if log_f is None:
            raise ValueError(f"{name} needs the intermediate flows log_f[T, L-1] = log F(s_1..s_(L-1))")
        if log_f.shape != (t, n_levels - 1):
            raise ValueError(f"{name}: log_f must be [T, L-1] = {(t, n_levels - 1)}, got {tuple(log_f.shape)}")


def log_flows(log_z: torch.Tensor, log_f: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """All state log-flows along each trajectory, ``[T, L+1]``: ``[log Z, log F(s_1..s_{L-1}), log R]``."""
    return torch.cat([log_z[:, None], log_f, log_r[:, None]], dim=1)


def weighted_mean(residuals: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_tau w_tau * residuals_tau / T`` (plain mean when ``weights`` is ``None``).

    Args:
        residuals: ``[T]`` per-trajectory losses.
        weights: optional ``[T]`` non-negative trajectory weights.
    """
    if weights is None:
        return residuals.mean()
    if weights.shape != residuals.shape:
        raise ValueError(f"weights must be [T] = {tuple(residuals.shape)}, got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        rows = ((weights < 0) | ~torch.isfinite(weights)).nonzero().flatten()[:8].tolist()
        raise ValueError(f"weights must be finite and non-negative; rows {rows} are not")
    return (weights.to(residuals.dtype) * residuals).sum() / residuals.shape[0]


class BalanceObjective:
    """Common interface: ``residuals`` gives ``L_tau`` per trajectory, ``loss`` their weighted mean."""

    name: str = ""
    #: whether the objective reads the intermediate flows ``log_f`` (TB does not).
    needs_log_f: bool = True

    def residuals(self, log_pf: torch.Tensor, log_z: torch.Tensor, log_f: Optional[torch.Tensor],
                  log_r: torch.Tensor) -> torch.Tensor:
        """Per-trajectory loss ``L_tau``, ``[T]``."""
        raise NotImplementedError

    def loss(self, log_pf: torch.Tensor, log_z: torch.Tensor, log_f: Optional[torch.Tensor],
             log_r: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar ``sum_tau w_tau * L_tau / T``.

        Args:
            log_pf: ``[T, L]`` per-step forward log-probabilities.
            log_z: ``[T]`` ``log Z(U)``.
            log_f: ``[T, L-1]`` intermediate log-flows, or ``None`` when the objective does not use them.
            log_r: ``[T]`` log-rewards of the terminal states.
            weights: optional ``[T]`` non-negative trajectory weights (1 when omitted).
        """
        return weighted_mean(self.residuals(log_pf, log_z, log_f, log_r), weights)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TrajectoryBalance(BalanceObjective):
    """Trajectory balance: ``L_TB(tau) = (log Z + sum_{l<L} log P_F(c_{l+1}|s_l) - log R(s_L))^2``.

    ``log_f`` is accepted and ignored (may be ``None``).
    """

    name = "tb"
    needs_log_f = False

    def residuals(self, log_pf, log_z, log_f, log_r):
        _check(log_pf, log_z, log_f, log_r, False, "TrajectoryBalance")
        return (log_z + log_pf.sum(dim=1) - log_r).square()


class DetailedBalance(BalanceObjective):
    """Detailed balance: ``L_DB(tau) = sum_{l<L} (log F(s_l) + log P_F(c_{l+1}|s_l) - log F(s_{l+1}))^2``
    with ``F(s_0) = Z`` and ``F(s_L) = R`` (a sum over the ``L`` transitions, not a mean: ``L`` times torchgfn's
    ``DBGFlowNet`` loss, which averages over the batch's transitions; docs/ARCHITECTURE.md).
    """

    name = "db"

    def residuals(self, log_pf, log_z, log_f, log_r):
        _check(log_pf, log_z, log_f, log_r, True, "DetailedBalance")
        flows = log_flows(log_z, log_f, log_r)
        return (flows[:, :-1] + log_pf - flows[:, 1:]).square().sum(dim=1)


class SubTrajectoryBalance(BalanceObjective):
    """Sub-trajectory balance SubTB(lambda) over all sub-trajectories ``0 <= i < j <= L``:

    ``L_SubTB(tau) = sum_{i<j} lambda^(j-i) * delta_ij^2 / sum_{i<j} lambda^(j-i)`` with
    ``delta_ij = log F(s_i) + sum_{i<=l<j} log P_F(c_{l+1}|s_l) - log F(s_j)``.

    With ``A_i = log F(s_i) - sum_{l<i} log P_F`` (a cumulative sum), ``delta_ij = A_i - A_j``, so all pairs
    come from one ``[T, L+1, L+1]`` difference. The weights are normalised in log space, so large or small
    ``lambda`` neither overflows nor underflows. Limits: ``lambda -> 0`` gives ``L_DB / L``; ``lambda -> inf``
    gives ``L_TB`` (only the pair ``(0, L)`` keeps weight).

    This is torchgfn's ``SubTBGFlowNet`` with ``weighting="geometric_within"`` (docs/ARCHITECTURE.md).

    Args:
        subtb_lambda: ``lambda > 0``, the geometric weight of a sub-trajectory per transition it spans (the
            spelling of the config key ``gfn.subtb_lambda``).
    """

    name = "subtb"

    def __init__(self, subtb_lambda: float = 0.9):
        subtb_lambda = float(subtb_lambda)
        if not (subtb_lambda > 0 and math.isfinite(subtb_lambda)):
            raise ValueError(f"SubTrajectoryBalance: subtb_lambda must be finite and > 0, got {subtb_lambda}")
        self.subtb_lambda = subtb_lambda

    def pair_weights(self, n_levels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Normalised weights ``[L+1, L+1]`` of the pairs ``(i, j)``, zero unless ``i < j``; they sum to 1."""
        idx = torch.arange(n_levels + 1, device=device)
        span = (idx[None, :] - idx[:, None]).to(torch.float64)
        log_w = (span * math.log(self.subtb_lambda)).masked_fill(span <= 0, float("-inf"))
        return torch.softmax(log_w.flatten(), dim=0).view_as(log_w).to(dtype)

    def residuals(self, log_pf, log_z, log_f, log_r):
        _check(log_pf, log_z, log_f, log_r, True, "SubTrajectoryBalance")
        flows = log_flows(log_z, log_f, log_r)
        cum = torch.cat([torch.zeros_like(log_pf[:, :1]), log_pf.cumsum(dim=1)], dim=1)
        a = flows - cum
        delta = a[:, :, None] - a[:, None, :]
        w = self.pair_weights(log_pf.shape[1], log_pf.dtype, log_pf.device)
        return (delta.square() * w).sum(dim=(1, 2))

    def __repr__(self) -> str:
        return f"SubTrajectoryBalance(subtb_lambda={self.subtb_lambda})"


_OBJECTIVES = {
    "tb": TrajectoryBalance, "trajectory_balance": TrajectoryBalance,
    "db": DetailedBalance, "detailed_balance": DetailedBalance,
    "subtb": SubTrajectoryBalance, "subtrajectory_balance": SubTrajectoryBalance,
}


def make_objective(name: str, **kwargs) -> BalanceObjective:
    """Build an objective by name: ``"tb"`` | ``"db"`` | ``"subtb"`` (``subtb_lambda=...`` for SubTB).

    The long names ``trajectory_balance``, ``detailed_balance`` and ``subtrajectory_balance`` are accepted
    too. Keyword arguments an objective does not take raise ``TypeError``.
    """
    key = str(name).lower()
    if key not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected 'tb', 'db' or 'subtb'")
    cls = _OBJECTIVES[key]
    if cls is not SubTrajectoryBalance and kwargs:
        raise TypeError(f"objective {key!r} takes no options, got {sorted(kwargs)}")
    return cls(**kwargs)
