"""One small class per training stage: its trajectories per example, its sampler and its loss.

* :class:`SFTStage` (``sft``, ``sft_continue``): cross-entropy of the positive's SID codes.
* :class:`GFlowGRStage` (``gflowgr``): ``CE(positive) + lambda_gfn * GFN`` where GFN is TB / DB / SubTB
  over the positive plus ``n_aug`` augmented items from the sampler, rewarded by
  :class:`gflowgr_core.reward.Reward`.
* :class:`PreferenceStage` (``dpo``, ``sdpo``): preference loss of the positive against sampled negatives,
  the frozen starting checkpoint as reference, plus ``pref.sft_weight`` times the CE anchor.

A stage turns an :class:`~gflowgr_core.trajectories.ExampleBatch` into
:class:`~gflowgr_core.trajectories.Trajectories` (the positive, then the candidates): :meth:`Stage.draw` with
its sampler (:meth:`~gflowgr_core.samplers.Sampler.trajectories`), :meth:`Stage.trajectories_for` with
candidates drawn before; its loss reads them. Every stage reads the policy's hidden states through
:meth:`StageContext.hidden`, which runs the packed forward (:meth:`SIDPolicy.packed_trajectory_hidden`) or the
per-prefix one: packing is an execution strategy, the losses are the same. The library
:class:`~gflowgr_core.train.trainer.Trainer` and the Hugging Face :class:`~gflowgr_core.hf_trainer.GFlowGRTrainer`
both call :meth:`Stage.loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gflowgr_core.model.policy import SIDPolicy
from gflowgr_core.objectives.gfn_loss import gfn_loss
from gflowgr_core.objectives.logpf import constrained_log_pf
from gflowgr_core.objectives.preference import dpo_loss, sdpo_loss, sft_cross_entropy
from gflowgr_core.reward import Reward, cm_component, lm_generation_prob, summary as reward_summary
from gflowgr_core.trajectories import ExampleBatch, Trajectories

__all__ = ["StageContext", "Stage", "SFTStage", "GFlowGRStage", "PreferenceStage"]


@dataclass
class StageContext:
    """What every stage reads: the trie and SID layout, the kernel backend and the forward strategy."""

    trie: object
    item_codes: torch.Tensor
    codes_per_level: Sequence[int]
    backend: str = "auto"
    packing: bool = True
    row_tokens: int = 256
    rows: Optional[int] = None
    sparse: bool = True

    def hidden(self, policy: SIDPolicy, trajectories: Trajectories):
        """``(h[B, T, L, d], log_z[B], log_f[B, T, L-1])`` of ``trajectories`` after each example's prompt."""
        return policy.encode_trajectories(trajectories, packing=self.packing, row_tokens=self.row_tokens,
                                          rows=self.rows, sparse=self.sparse)

    def log_pf(self, policy: SIDPolicy, h: torch.Tensor, codes: torch.Tensor, support: str) -> torch.Tensor:
        """Per-step log P_F ``[N, L]`` of ``codes[N, L]`` from hidden states ``h[N, L, d]`` of ``policy``."""
        extra = {}
        if support == "vocab":
            extra = dict(w_full=policy.full_head_weight(), sid_token_ids=policy.sid_token_ids)
        return constrained_log_pf(h, policy.sid_head_weight(), codes, self.trie, support,
                                  codes_per_level=self.codes_per_level, bias=policy.head_bias(),
                                  backend=self.backend, **extra)


class Stage:
    """A training stage: ``loss(ctx, policy, trajectories, step)`` and the sampler of its candidates.

    Attributes:
        name: the stage's name in :class:`~gflowgr_core.train.config.TrainConfig`.
        sampler: the candidate sampler (augmentations or negatives), ``None`` for stages without one.
        n_candidates: candidates drawn per example; ``trajectories`` = ``1 + n_candidates``.
    """

    name = ""
    sampler = None
    n_candidates = 0

    @property
    def trajectories(self) -> int:
        """Trajectories per example: the positive plus ``n_candidates``."""
        return 1 + self.n_candidates

    def trajectories_for(self, ctx: StageContext, batch: ExampleBatch,
                         candidates: Optional[torch.Tensor] = None) -> Trajectories:
        """``batch``'s trajectories: each positive, then its pre-drawn ``candidates[B, n]`` (``None``: none)."""
        return Trajectories.from_items(batch.example, batch.history, batch.positive, candidates, ctx.item_codes,
                                       window=batch.window)

    def draw(self, ctx: StageContext, batch: ExampleBatch, generator: torch.Generator) -> Trajectories:
        """``batch``'s trajectories with ``n_candidates`` fresh candidates per example from the sampler
        (:meth:`~gflowgr_core.samplers.Sampler.trajectories`, randomness from ``generator``); the positive
        alone without a sampler."""
        if self.sampler is None:
            return self.trajectories_for(ctx, batch)
        return self.sampler.trajectories(batch, self.n_candidates, generator, ctx.item_codes)

    def loss(self, ctx: StageContext, policy: SIDPolicy, trajectories: Trajectories,
             step: int) -> tuple[torch.Tensor, dict]:
        """The stage's loss (mean over the examples) on ``trajectories`` at optimisation ``step``, and the
        values to log."""
        raise NotImplementedError


class SFTStage(Stage):
    """``sft`` / ``sft_continue``: cross-entropy of the positive's codes over ``support``."""

    def __init__(self, name: str, support: str):
        self.name, self.support = name, support

    def loss(self, ctx, policy, trajectories, step):
        h, _, _ = ctx.hidden(policy, trajectories)
        loss = sft_cross_entropy(ctx.log_pf(policy, h[:, 0], trajectories.codes[:, 0], self.support))
        return loss, {"loss": loss.item(), "ce": loss.item()}


class GFlowGRStage(Stage):
    """``gflowgr``: ``CE(positive) + lambda_gfn * balance loss`` over the positive and ``n_aug`` augmentations.

    Args:
        gfn: the run's :class:`~gflowgr_core.train.config.GFNConfig`.
        likelihood_support: support of the CE anchor (the same as stage ``sft``'s, so the anchor does not
            change with the GFlowNet's ``policy_support`` ablation).
        reward: the :class:`Reward`; ``cm_scorer``: the collaborative model's scores (or ``None``).
        sampler: the augmentation sampler.
    """

    name = "gflowgr"

    def __init__(self, gfn, likelihood_support: str, reward: Reward, cm_scorer, sampler,
                 diagnostics_every: int = 1):
        self.gfn, self.likelihood_support, self.reward, self.cm_scorer = gfn, likelihood_support, reward, cm_scorer
        self.sampler, self.n_candidates = sampler, gfn.n_aug
        self.diagnostics_every = max(1, int(diagnostics_every))

    def _catalogue_cm(self, example: torch.Tensor) -> Optional[torch.Tensor]:
        """Normalised CM score of every catalogue item for training rows ``example[B]``, ``float[B, n_items]``."""
        cfg = self.gfn.reward
        if not cfg.use_cm:
            return None
        with torch.no_grad():
            if cfg.cm_norm == "sigmoid_z":
                s = self.cm_scorer.full_scores(example)
                # The catalogue moments of each row, as CMScorer.normalized uses them.
                mean, std = s.mean(1, keepdim=True), s.std(1, unbiased=False, keepdim=True)
                z = (s - mean) / std.clamp_min(torch.finfo(torch.float32).tiny)
                return torch.where(std > 0, torch.sigmoid(z), torch.full_like(z, 0.5))
            items = torch.arange(self.cm_scorer.num_items, device=example.device)
            return self.cm_scorer.normalized(example, items.expand(example.shape[0], -1), method=cfg.cm_norm,
                                             temperature=cfg.cm_temperature)

    def catalogue_mass(self, ctx: StageContext, example: torch.Tensor, positive: torch.Tensor):
        """:meth:`Reward.catalogue_mass` of training rows ``example[B]`` with positives ``positive[B]``: the
        reward of every catalogue item per example (``None`` when the reward reads the LM's own
        probabilities, which exist only for candidates)."""
        cfg = self.gfn.reward
        if cfg.use_cm and cfg.cm_source == "lm":
            return None
        return self.reward.catalogue_mass(positive, self._catalogue_cm(example), ctx.item_codes)

    def loss(self, ctx, policy, trajectories, step):
        gfn, traj = self.gfn, trajectories
        B, T = traj.num_examples, traj.per_example
        h, log_z, log_f = ctx.hidden(policy, traj)
        flat_codes = traj.flat_codes                                                 # [B*T, L]
        extra = {}
        if gfn.policy_support == "vocab":
            extra = dict(w_full=policy.full_head_weight(), sid_token_ids=policy.sid_token_ids)
        if gfn.reward.use_cm and gfn.reward.cm_source == "lm":
            with torch.no_grad():
                step_logp = ctx.log_pf(policy, traj.flat(h.detach()), flat_codes, "trie")
            cm_norm = lm_generation_prob(step_logp).view(B, T)
        else:
            cm_norm = cm_component(gfn.reward, self.cm_scorer, traj.example, traj.items)
        # The catalogue-wide reward mass sets r_pos in "catalogue" mode and is logged (the positive's implied
        # target share) every diagnostics_every steps.
        mass = None
        if gfn.reward.r_pos_mode == "catalogue" or step % self.diagnostics_every == 0:
            mass = self.catalogue_mass(ctx, traj.example, traj.positive)
        log_r, components = self.reward.score_trajectories(traj, cm_norm, ctx.item_codes,
                                                           log_rest=None if mass is None else mass.log_rest)
        weights = None
        if gfn.weighting == "reward":
            r = components["R"].detach()
            weights = (T * r / r.sum(dim=1, keepdim=True)).reshape(-1)
        w_sid, bias = policy.sid_head_weight(), policy.head_bias()
        flow_warmup = step < gfn.flow_warmup_steps
        h_gfn = h
        if flow_warmup:
            # Only the flow heads learn from the balance loss until log Z has caught up with the
            # policy: the huge early residuals would otherwise push the LM away from its SFT solution.
            h_gfn = h.detach()
            w_sid, bias = w_sid.detach(), None if bias is None else bias.detach()
            log_z = policy.log_z_head(h_gfn[:, 0, 0])
            log_f = policy.log_f_head(h_gfn[:, :, 1:])
        out = gfn_loss(traj.flat(h_gfn), w_sid, flat_codes, ctx.trie,
                       traj.flat(log_f), traj.per_trajectory(log_z), traj.flat(log_r),
                       objective=gfn.objective, subtb_lambda=gfn.subtb_lambda, weights=weights,
                       support=gfn.policy_support, codes_per_level=ctx.codes_per_level,
                       bias=bias, backend=ctx.backend, **extra)
        if flow_warmup or gfn.policy_support != self.likelihood_support:
            ce = sft_cross_entropy(ctx.log_pf(policy, h[:, 0], traj.codes[:, 0], self.likelihood_support))
        else:
            ce = sft_cross_entropy(out.log_pf.view(B, T, traj.num_levels)[:, 0])
        loss = ce + gfn.lambda_gfn * out.loss
        logs = {"loss": loss.item(), "ce": ce.item(), "gfn": out.loss.item(), "log_z": log_z.mean().item(),
                "backend": out.backend}
        logs.update(reward_summary({k: v for k, v in components.items() if k in ("r_a", "r_cm", "r_sim", "R")}))
        with torch.no_grad():
            # Whole-trajectory balance residual log Z + sum log P_F - log R (TB's; DB/SubTB report it too).
            residual = (traj.per_trajectory(log_z.detach()) + out.log_pf.detach().sum(-1)
                        - traj.flat(log_r.detach()))
            logs["tb_residual"] = residual.mean().item()
            if mass is not None:
                log_pos = log_r.detach()[:, 0].float()
                share = torch.exp(log_pos - torch.logaddexp(log_pos, mass.log_rest.float()))
                logs["target_share"] = share.mean().item()
                logs["log_reward_mass"] = torch.logaddexp(log_pos, mass.log_rest.float()).mean().item()
        return loss, logs


class PreferenceStage(Stage):
    """``dpo`` (first negative) / ``sdpo`` (all negatives) against a frozen ``reference`` policy."""

    def __init__(self, name: str, pref, support: str, reference: SIDPolicy, sampler):
        self.name, self.pref, self.support, self.reference = name, pref, support, reference
        self.sampler, self.n_candidates = sampler, pref.n_neg

    def loss(self, ctx, policy, trajectories, step):
        p, traj = self.pref, trajectories
        shape = traj.codes.shape                                                     # [B, T, L]
        flat = traj.flat_codes
        h, _, _ = ctx.hidden(policy, traj)
        log_pf = ctx.log_pf(policy, traj.flat(h), flat, self.support).view(shape)
        with torch.no_grad():
            h_ref, _, _ = ctx.hidden(self.reference, traj)
            ref = ctx.log_pf(self.reference, traj.flat(h_ref), flat, self.support).view(shape)
        logp, ref_logp = log_pf.sum(-1), ref.sum(-1)
        if self.name == "dpo":
            pref = dpo_loss(logp[:, 0], logp[:, 1], ref_logp[:, 0], ref_logp[:, 1], beta=p.beta)
        else:
            pref = sdpo_loss(logp[:, 0], logp[:, 1:], ref_logp[:, 0], ref_logp[:, 1:], beta=p.beta)
        ce = sft_cross_entropy(log_pf[:, 0])
        loss = pref + p.sft_weight * ce
        return loss, {"loss": loss.item(), "ce": ce.item(), "pref": pref.item()}
