"""Supervised and preference objectives on SID sequence log-probabilities: SFT cross-entropy, DPO, S-DPO.

Sequence log-probabilities are sums of per-step ``log P_F`` (see :mod:`.logpf`), so the same constrained
policy (trie / level / vocab support) serves SFT, the preference baselines and the GFlowNet losses.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def sft_cross_entropy(log_pf_pos: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross-entropy of the positives: ``mean_b ( -sum_l mask[b, l] * log_pf_pos[b, l] )``.

    Args:
        log_pf_pos: ``[B, L]`` per-step log-probabilities of each example's positive SID.
        mask: optional ``[B, L]`` bool (or 0/1 float) of the steps that count; all steps when omitted.
            The mean is over all ``B`` examples (an example with no counted step contributes 0).

    Returns:
        scalar loss.
    """
    if log_pf_pos.dim() != 2:
        raise ValueError(f"log_pf_pos must be [B, L], got shape {tuple(log_pf_pos.shape)}")
    if mask is not None:
        if mask.shape != log_pf_pos.shape:
            raise ValueError(f"mask must be [B, L] = {tuple(log_pf_pos.shape)}, got {tuple(mask.shape)}")
        # where() rather than a product so a -inf log-prob at an excluded step cannot produce NaN.
        log_pf_pos = torch.where(mask.bool(), log_pf_pos, torch.zeros_like(log_pf_pos))
    return -log_pf_pos.sum(dim=1).mean()


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: {a_name} and {b_name} must have the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def _check_beta(name: str, beta) -> float:
    """``beta`` as a float; ``ValueError`` naming it unless it is a finite number > 0 (beta <= 0 flips or
    removes the preference: the loss would then push the positive down or do nothing)."""
    if isinstance(beta, torch.Tensor) and beta.numel() == 1 and not beta.requires_grad:
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"{name}: beta must be a real number > 0, got {type(beta).__name__} {beta!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"{name}: beta must be a finite number > 0 (the inverse temperature of the implicit "
                         f"reward; beta <= 0 reverses or removes the preference), got {beta!r}")
    return float(beta)


def dpo_loss(logp_pos: torch.Tensor, logp_neg: torch.Tensor, ref_pos: torch.Tensor, ref_neg: torch.Tensor,
             beta: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """Direct preference optimisation: ``-log sigmoid(beta * [(pi_pos - ref_pos) - (pi_neg - ref_neg)])``.

    Args:
        logp_pos, logp_neg: ``[B]`` sequence log-probabilities of the positive / negative under the policy.
        ref_pos, ref_neg: ``[B]`` the same under the frozen reference model (no gradient is taken).
        beta: inverse temperature of the implicit reward, a finite number ``> 0``.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` (``[B]``).

    Raises:
        ValueError: ``beta <= 0`` (or not finite), naming ``beta``; shape mismatches, naming the arguments.
    """
    beta = _check_beta("dpo_loss", beta)
    if logp_pos.dim() != 1:
        raise ValueError(f"dpo_loss: logp_pos must be [B], got shape {tuple(logp_pos.shape)}")
    for other, nm in ((logp_neg, "logp_neg"), (ref_pos, "ref_pos"), (ref_neg, "ref_neg")):
        _check_pair("dpo_loss", logp_pos, other, "logp_pos", nm)
    margin = (logp_pos - ref_pos.detach()) - (logp_neg - ref_neg.detach())
    return _reduce(-F.logsigmoid(beta * margin), reduction)


def sdpo_loss(logp_pos: torch.Tensor, logp_negs: torch.Tensor, ref_pos: torch.Tensor,
              ref_negs: torch.Tensor, beta: float = 1.0, neg_mask: Optional[torch.Tensor] = None,
              reduction: str = "mean") -> torch.Tensor:
    """Softmax DPO with several negatives (S-DPO):
    ``-log sigmoid(-log sum_j exp(beta * [(pi_neg_j - ref_neg_j) - (pi_pos - ref_pos)]))``.

    With one negative this equals :func:`dpo_loss` with the same ``beta``.

    Args:
        logp_pos: ``[B]`` policy log-probability of each positive.
        logp_negs: ``[B, N]`` policy log-probabilities of the negatives.
        ref_pos, ref_negs: ``[B]`` / ``[B, N]`` the same under the frozen reference (no gradient).
        beta: inverse temperature, a finite number ``> 0``.
        neg_mask: optional ``[B, N]`` bool of the negatives that exist (padding otherwise); every row needs
            at least one.
        reduction: ``"mean"`` (default) | ``"sum"`` | ``"none"`` (``[B]``).

    Raises:
        ValueError: ``beta <= 0`` (or not finite), naming ``beta``; shape mismatches or a row without a
            negative, naming the arguments.
    """
    beta = _check_beta("sdpo_loss", beta)
    if logp_pos.dim() != 1 or logp_negs.dim() != 2 or logp_negs.shape[0] != logp_pos.shape[0]:
        raise ValueError(f"sdpo_loss: expected logp_pos[B] and logp_negs[B, N], got {tuple(logp_pos.shape)} "
                         f"and {tuple(logp_negs.shape)}")
    _check_pair("sdpo_loss", logp_pos, ref_pos, "logp_pos", "ref_pos")
    _check_pair("sdpo_loss", logp_negs, ref_negs, "logp_negs", "ref_negs")
    diff = beta * ((logp_negs - ref_negs.detach()) - (logp_pos - ref_pos.detach())[:, None])
    if neg_mask is not None:
        _check_pair("sdpo_loss", logp_negs, neg_mask, "logp_negs", "neg_mask")
        empty = ~neg_mask.bool().any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"sdpo_loss: rows {empty.nonzero().flatten()[:8].tolist()} have no negative "
                             f"in neg_mask")
        diff = diff.masked_fill(~neg_mask.bool(), float("-inf"))
    return _reduce(-F.logsigmoid(-torch.logsumexp(diff, dim=1)), reduction)
