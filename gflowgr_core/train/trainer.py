"""One training loop for every stage: ``sft``, ``gflowgr``, and the baselines ``sft_continue``, ``dpo``, ``sdpo``.

A step reads a batch of pre-built training tensors (history, target), builds the stage's trajectories and
computes its loss from the policy's hidden states at the decision positions:

* ``sft`` / ``sft_continue``: cross-entropy of the positive's SID codes (support ``sft_support``).
* ``gflowgr``: ``CE(positive) + lambda_gfn * GFN`` where GFN is TB / DB / SubTB over the positive plus
  ``n_aug`` augmented items from the sampler, rewarded by :class:`gflowgr_core.reward.Reward`.
* ``dpo`` / ``sdpo``: preference loss of the positive against sampled negatives, the frozen starting
  checkpoint as reference, plus ``pref.sft_weight`` times the CE anchor.

Model selection uses the validation split only (trie-constrained beam search); the test split is read once,
with the best checkpoint, at the end of the run.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from gflowgr_core.data.prepared import PreparedData
from gflowgr_core.data.split import Split
from gflowgr_core.decoding.search import beam_search
from gflowgr_core.metrics import evaluate_rankings
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.objectives.gfn_loss import gfn_loss
from gflowgr_core.objectives.logpf import constrained_log_pf
from gflowgr_core.objectives.preference import dpo_loss, sdpo_loss, sft_cross_entropy
from gflowgr_core.reward import Reward, cm_component, lm_generation_prob, summary as reward_summary
from gflowgr_core.samplers import SamplerBatch, make_sampler
from gflowgr_core.train.checkpoint import load_policy, save_policy
from gflowgr_core.train.config import TrainConfig, save_config

log = logging.getLogger("gflowgr")

EVAL_KS = (5, 10, 20)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Runs one stage of :class:`TrainConfig` on a prepared dataset.

    Args:
        config: the run's configuration (validated here).
        data: an already loaded :class:`PreparedData`; loaded from ``config.data`` when omitted.
    """

    def __init__(self, config: TrainConfig, data: Optional[PreparedData] = None):
        self.cfg = config.validate()
        seed_everything(config.seed)
        self.device = resolve_device(config.device)
        self.data = data if data is not None else PreparedData.load(config.data)
        self.trie = self.data.trie.to(self.device)
        self.item_codes = self.data.catalog.codes.to(self.device)
        self.codes_per_level = tuple(self.data.catalog.codes_per_level)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.jsonl"
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)

        self.policy = self._build_policy().to(self.device)
        self.reference: Optional[SIDPolicy] = None
        if config.stage in ("dpo", "sdpo"):
            self.reference = copy.deepcopy(self.policy).eval()
            self.reference.requires_grad_(False)

        self.train_index = self._train_index()
        self.item_key = self._item_key()
        self.reward: Optional[Reward] = None
        self.cm_scorer = None
        self.sampler = None
        if config.stage == "gflowgr":
            self.reward = Reward(config.gfn.reward).to(self.device)
            if self._needs_cm():
                self.cm_scorer = self._collaborative_scorer()
            self.sampler = self._make_sampler(config.gfn.sampler, config.gfn.n_aug)
        elif config.stage in ("dpo", "sdpo"):
            self.sampler = self._make_sampler(config.pref.sampler, config.pref.n_neg)

        self.steps_per_epoch = math.ceil(len(self.train_index) / config.batch_size)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if config.dtype == "bfloat16" and self.device.type == "cuda" else None)

    # ----------------------------------------------------------------------------------------- setup
    def _build_policy(self) -> SIDPolicy:
        cfg = self.cfg
        if cfg.init_checkpoint:
            policy = load_policy(cfg.init_checkpoint, device="cpu")
            if tuple(policy.codes_per_level) != self.codes_per_level:
                raise ValueError(f"checkpoint {cfg.init_checkpoint} was trained on SID levels "
                                 f"{tuple(policy.codes_per_level)}, the data {cfg.data} has {self.codes_per_level}")
            return policy
        if cfg.model.pretrained:
            return SIDPolicy.from_pretrained(cfg.model.pretrained, self.codes_per_level,
                                             self.data.catalog.codes, flow_hidden=cfg.model.flow_hidden)
        m = cfg.model
        max_positions = 2 + self.data.split.max_history * len(self.codes_per_level) + len(self.codes_per_level) + 8
        lm = build_tiny_causal_lm(self.data.tokens.vocab_size, hidden=m.hidden, layers=m.layers, heads=m.heads,
                                  kv_heads=m.kv_heads, intermediate=m.intermediate, max_positions=max_positions,
                                  arch=m.arch, seed=cfg.seed)
        return SIDPolicy(lm, self.data.tokens, self.data.catalog.codes, self.codes_per_level,
                         flow_hidden=m.flow_hidden)

    def _train_index(self) -> torch.Tensor:
        n = len(self.data.split.train)
        limit = self.cfg.max_train_examples
        if limit is None or limit >= n:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.cfg.seed)
        return torch.randperm(n, generator=g)[:limit].sort().values

    def _item_key(self) -> Optional[torch.Tensor]:
        """Leaf node per item when SIDs are shared, so that SID-match metrics are reported too."""
        if self.data.catalog.collisions == "share" and int(self.data.stats.get("sid_collisions", 0)) > 0:
            return self.data.trie.item_leaf.cpu()
        return None

    def _needs_cm(self) -> bool:
        g = self.cfg.gfn
        uses_sampler = g.sampler == "cm_curriculum" or (g.sampler == "mixture" and "cm_curriculum" in g.mixture)
        return uses_sampler or (g.reward.use_cm and g.reward.cm_source == "cm")

    def _collaborative_scorer(self):
        """SASRec trained on the same split (cached beside the prepared data) and its score cache."""
        from gflowgr_core.collaborative import CMScorer, SASRec, split_fingerprint, train_sasrec

        cm_cfg = dataclasses.replace(self.cfg.cm, seed=self.cfg.seed, device=str(self.device))
        cache = Path(self.cfg.data) / "cm" if self.cfg.data else self.out / "cm"
        cache.mkdir(parents=True, exist_ok=True)
        fingerprint = split_fingerprint(self.data.split.train)
        model_path = cache / f"sasrec_seed{self.cfg.seed}_{fingerprint[:12]}.pt"
        if model_path.exists():
            model = SASRec.load(model_path, map_location=self.device)
            log.info("collaborative model loaded from %s", model_path)
        else:
            model = train_sasrec(self.data.split, cm_cfg)
            model.save(model_path)
            report = getattr(model, "train_report", {})
            log.info("collaborative model (SASRec) valid %s / test %s; saved to %s",
                     {k: round(v, 4) for k, v in report.get("valid", {}).items() if k in ("recall@10", "ndcg@10")},
                     {k: round(v, 4) for k, v in report.get("test", {}).items() if k in ("recall@10", "ndcg@10")},
                     model_path)
        return CMScorer.build(model, self.data.split.train, device=self.device)

    def _make_sampler(self, name: str, n: int):
        """The augmentation (or negative) sampler ``name`` with this run's settings."""
        g, n_items = self.cfg.gfn, self.data.num_items
        if name == "mixture":
            parts = [(self._make_sampler(part, n), float(w)) for part, w in g.mixture.items()]
            return make_sampler("mixture", components=parts)
        if name == "random":
            return make_sampler("random", n_items=n_items)
        if name == "logs":
            return make_sampler("logs", split=self.data.split.train, n_items=n_items)
        if name == "cm_curriculum":
            return make_sampler("cm_curriculum", scorer=self.cm_scorer, n_items=n_items,
                                pool_size=g.curriculum_pool, n_random=g.curriculum_random,
                                start_quantile=g.curriculum_start, end_quantile=g.curriculum_end)
        return make_sampler("onpolicy", decode_fn=self._decode_for_sampler, n_items=n_items)

    def _decode_for_sampler(self, history: torch.Tensor, k: int) -> torch.Tensor:
        """On-policy candidates: the current policy's trie-constrained beam search, top-``k`` items."""
        was_training = self.policy.training
        self.policy.eval()
        with torch.no_grad():
            result = beam_search(self.policy, self.trie, history.to(self.device), beams=max(k, 2), topk=k,
                                 backend=self.cfg.backend)
        self.policy.train(was_training)
        return result.items

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        flow_params = list(self.policy.flow_parameters())
        flow_ids = {id(p) for p in flow_params}
        lm_params = [p for p in self.policy.parameters() if p.requires_grad and id(p) not in flow_ids]
        groups = [{"params": lm_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if flow_params:
            groups.append({"params": flow_params, "lr": cfg.gfn.flow_lr, "weight_decay": 0.0})
        if self.reward is not None:
            reward_params = [p for p in self.reward.parameters() if p.requires_grad]
            if reward_params:
                groups.append({"params": reward_params, "lr": cfg.gfn.flow_lr, "weight_decay": 0.0})
        return torch.optim.AdamW(groups)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak over the run."""
        warm = max(1, self.cfg.warmup_steps)
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    # ------------------------------------------------------------------------------------------ loss
    def _log_pf(self, h: torch.Tensor, codes: torch.Tensor, support: str) -> torch.Tensor:
        """Per-step log P_F ``[N, L]`` of ``codes[N, L]`` from hidden states ``h[N, L, d]``."""
        extra = {}
        if support == "vocab":
            extra = dict(w_full=self.policy.full_head_weight(), sid_token_ids=self.policy.sid_token_ids)
        return constrained_log_pf(h, self.policy.sid_head_weight(), codes, self.trie, support,
                                  codes_per_level=self.codes_per_level, bias=self.policy.head_bias(), **extra)

    def _batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        train = self.data.split.train
        return (index.to(self.device), train.history[index].to(self.device), train.target[index].to(self.device))

    def compute_loss(self, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The stage's loss on training examples ``index`` and the values to log."""
        example_idx, history, target = self._batch(index)
        stage = self.cfg.stage
        if stage in ("sft", "sft_continue"):
            codes = self.item_codes[target].unsqueeze(1)
            h, _, _ = self.policy.trajectory_hidden(history, codes)
            log_pf = self._log_pf(h[:, 0], codes[:, 0], self.cfg.sft_support)
            loss = sft_cross_entropy(log_pf)
            return loss, {"loss": loss.item(), "ce": loss.item()}
        if stage == "gflowgr":
            return self._gflowgr_loss(example_idx, history, target)
        return self._preference_loss(example_idx, history, target)

    def _gflowgr_loss(self, example_idx, history, target) -> tuple[torch.Tensor, dict]:
        g = self.cfg.gfn
        batch = SamplerBatch(example_idx=example_idx, history=history, positive=target)
        aug = self.sampler.sample(batch, g.n_aug, self.generator).to(self.device)
        cands = torch.cat([target.unsqueeze(1), aug], dim=1)                       # [B, T]
        B, T = cands.shape
        codes = self.item_codes[cands]                                            # [B, T, L]
        h, log_z, log_f = self.policy.trajectory_hidden(history, codes)
        L = codes.shape[-1]
        flat_codes = codes.reshape(B * T, L)
        extra = {}
        if g.policy_support == "vocab":
            extra = dict(w_full=self.policy.full_head_weight(), sid_token_ids=self.policy.sid_token_ids)
        if g.reward.use_cm and g.reward.cm_source == "lm":
            with torch.no_grad():
                step_logp = self._log_pf(h.detach().reshape(B * T, L, -1), flat_codes, "trie")
            cm_norm = lm_generation_prob(step_logp).view(B, T)
        else:
            cm_norm = cm_component(g.reward, self.cm_scorer, example_idx, cands)
        log_r, components = self.reward(target, cands, cm_norm, self.item_codes)
        weights = None
        if g.weighting == "reward":
            r = components["R"].detach()
            weights = (T * r / r.sum(dim=1, keepdim=True)).reshape(-1)
        out = gfn_loss(h.reshape(B * T, L, -1), self.policy.sid_head_weight(), flat_codes, self.trie,
                       log_f.reshape(B * T, L - 1), log_z.repeat_interleave(T), log_r.reshape(-1),
                       objective=g.objective, lambda_subtb=g.subtb_lambda, weights=weights,
                       support=g.policy_support, codes_per_level=self.codes_per_level,
                       bias=self.policy.head_bias(), backend=self.cfg.backend, **extra)
        ce = sft_cross_entropy(out.log_pf.view(B, T, L)[:, 0])
        loss = ce + g.lambda_gfn * out.loss
        logs = {"loss": loss.item(), "ce": ce.item(), "gfn": out.loss.item(), "log_z": log_z.mean().item(),
                "backend": out.backend}
        logs.update(reward_summary({k: v for k, v in components.items() if k in ("r_a", "r_cm", "r_sim", "R")}))
        return loss, logs

    def _preference_loss(self, example_idx, history, target) -> tuple[torch.Tensor, dict]:
        p = self.cfg.pref
        batch = SamplerBatch(example_idx=example_idx, history=history, positive=target)
        neg = self.sampler.sample(batch, p.n_neg, self.generator).to(self.device)
        cands = torch.cat([target.unsqueeze(1), neg], dim=1)
        B, T = cands.shape
        codes = self.item_codes[cands]
        L = codes.shape[-1]
        h, _, _ = self.policy.trajectory_hidden(history, codes)
        log_pf = self._log_pf(h.reshape(B * T, L, -1), codes.reshape(B * T, L), self.cfg.sft_support).view(B, T, L)
        with torch.no_grad():
            h_ref, _, _ = self.reference.trajectory_hidden(history, codes)
            ref = constrained_log_pf(h_ref.reshape(B * T, L, -1), self.reference.sid_head_weight(),
                                     codes.reshape(B * T, L), self.trie, self.cfg.sft_support,
                                     codes_per_level=self.codes_per_level, bias=self.reference.head_bias(),
                                     **({} if self.cfg.sft_support != "vocab" else dict(
                                         w_full=self.reference.full_head_weight(),
                                         sid_token_ids=self.reference.sid_token_ids))).view(B, T, L)
        logp, ref_logp = log_pf.sum(-1), ref.sum(-1)
        if self.cfg.stage == "dpo":
            pref = dpo_loss(logp[:, 0], logp[:, 1], ref_logp[:, 0], ref_logp[:, 1], beta=p.beta)
        else:
            pref = sdpo_loss(logp[:, 0], logp[:, 1:], ref_logp[:, 0], ref_logp[:, 1:], beta=p.beta)
        ce = sft_cross_entropy(log_pf[:, 0])
        loss = pref + p.sft_weight * ce
        return loss, {"loss": loss.item(), "ce": ce.item(), "pref": pref.item()}

    def train_step(self, index: torch.Tensor) -> dict:
        """One optimisation step on training examples ``index``; returns the logged values."""
        self.policy.train()
        if self.autocast is not None:
            with self.autocast:
                loss, logs = self.compute_loss(index)
        else:
            loss, logs = self.compute_loss(index)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step} ({logs})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return logs

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, split_name: str = "valid", max_users: Optional[int] = None) -> dict:
        """Recall/NDCG/coverage/tail share on ``split_name`` from trie-constrained beam search."""
        split: Split = getattr(self.data.split, split_name)
        index = torch.arange(len(split))
        if max_users is not None and max_users < len(split):
            g = torch.Generator().manual_seed(1234)  # the same subset in every run and epoch
            index = torch.randperm(len(split), generator=g)[:max_users].sort().values
        return evaluate_policy(self.policy, self.data, split_name, index=index, beams=self.cfg.eval_beams,
                               batch_size=self.cfg.eval_batch_size, device=self.device, backend=self.cfg.backend,
                               item_key=self.item_key)

    # ------------------------------------------------------------------------------------------- loop
    def _log(self, record: dict) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        """Train with per-epoch validation and early stopping; evaluate the best checkpoint on test once."""
        cfg = self.cfg
        save_config(cfg, self.out / "config.yaml")
        best_dir = self.out / "best"
        best_value, best_epoch, bad_epochs = -math.inf, -1, 0
        history: list[dict] = []
        start = time.time()
        epoch = 0
        done = False
        while not done and epoch < (cfg.epochs if cfg.max_steps is None else 10 ** 9):
            self.policy.train()
            perm = self.train_index[torch.randperm(len(self.train_index), generator=self.generator)]
            bar = tqdm(range(self.steps_per_epoch), desc=f"{cfg.stage} epoch {epoch + 1}", leave=False,
                       disable=None)
            epoch_start, running = time.time(), []
            for b in bar:
                if self.sampler is not None and hasattr(self.sampler, "set_progress"):
                    self.sampler.set_progress(self.step / max(1, self.total_steps - 1))
                logs = self.train_step(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
                running.append(logs["loss"])
                if self.step % cfg.log_every == 0 or b == self.steps_per_epoch - 1:
                    self._log({"step": self.step, "epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0],
                               **logs})
                    bar.set_postfix(loss=f"{np.mean(running[-cfg.log_every:]):.4f}")
                if self.step >= self.total_steps:
                    done = True
                    break
            epoch += 1
            epoch_seconds = time.time() - epoch_start
            record = {"epoch": epoch, "step": self.step, "train_loss": float(np.mean(running)),
                      "epoch_seconds": epoch_seconds}
            if epoch % cfg.eval_every == 0 or done:
                metrics = self.evaluate("valid", cfg.valid_max_users)
                record["valid"] = metrics
                value = metrics[cfg.select_metric]
                if value > best_value:
                    best_value, best_epoch, bad_epochs = value, epoch, 0
                    save_policy(self.policy, best_dir, cfg)
                else:
                    bad_epochs += 1
                log.info("%s epoch %d: loss %.4f, valid %s %.4f (best %.4f at epoch %d), %.1fs", cfg.stage, epoch,
                         record["train_loss"], cfg.select_metric, value, best_value, best_epoch, epoch_seconds)
                if bad_epochs >= cfg.patience:
                    log.info("early stopping: no %s gain for %d evaluations", cfg.select_metric, bad_epochs)
                    done = True
            self._log({"eval": record})
            history.append(record)
        train_seconds = time.time() - start
        if best_epoch < 0:  # no validation ran: keep the last weights
            save_policy(self.policy, best_dir, cfg)
        self.policy = load_policy(best_dir, device=self.device)
        test = self.evaluate("test")
        result = {"stage": cfg.stage, "best_epoch": best_epoch, "best_valid": best_value, "steps": self.step,
                  "epochs": epoch, "train_seconds": train_seconds,
                  "seconds_per_epoch": train_seconds / max(1, epoch), "test": test, "history": history,
                  "checkpoint": str(best_dir), "device": str(self.device)}
        (self.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result


def evaluate_policy(policy: SIDPolicy, data: PreparedData, split_name: str = "test", *,
                    index: Optional[torch.Tensor] = None, beams: int = 20, batch_size: int = 256,
                    device: Optional[torch.device] = None, backend: str = "auto",
                    item_key: Optional[torch.Tensor] = None) -> dict:
    """Metrics of ``policy`` on a split (or the rows ``index`` of it) from trie-constrained beam search."""
    device = device or next(policy.parameters()).device
    split: Split = getattr(data.split, split_name)
    index = torch.arange(len(split)) if index is None else index
    trie = data.trie.to(device)
    policy.eval()
    ranked = []
    with torch.no_grad():
        for start in tqdm(range(0, len(index), batch_size), desc=f"eval {split_name}", leave=False, disable=None):
            rows = index[start:start + batch_size]
            result = beam_search(policy, trie, split.history[rows].to(device), beams=beams, topk=max(EVAL_KS),
                                 backend=backend)
            ranked.append(result.items.cpu())
    ranked = torch.cat(ranked)
    if ranked.shape[1] < max(EVAL_KS):  # fewer beams than the largest cut-off: pad with empty slots
        pad = torch.full((ranked.shape[0], max(EVAL_KS) - ranked.shape[1]), -1, dtype=ranked.dtype)
        ranked = torch.cat([ranked, pad], dim=1)
    return evaluate_rankings(ranked, split.target[index], data.popularity, ks=EVAL_KS, item_key=item_key)


def run_training(config: TrainConfig, data: Optional[PreparedData] = None) -> dict:
    """Train one stage (the ``gflowgr train`` command) and return its result summary."""
    return Trainer(config, data).fit()


def evaluate_checkpoint(checkpoint: str, split: str = "test", data: Optional[str] = None, beams: int = 20,
                        device: str = "auto") -> dict:
    """Evaluate a saved checkpoint (the ``gflowgr eval`` command) on its prepared dataset."""
    from gflowgr_core.train.config import load_config

    ckpt = Path(checkpoint)
    config = load_config(ckpt / "config.yaml") if (ckpt / "config.yaml").exists() else None
    data_dir = data or (config.data if config is not None else None)
    if not data_dir:
        raise FileNotFoundError(f"{ckpt} has no config.yaml naming its data folder: pass --data DIR")
    dev = resolve_device(device)
    prepared = PreparedData.load(data_dir)
    policy = load_policy(ckpt, device=dev)
    item_key = None
    if prepared.catalog.collisions == "share" and int(prepared.stats.get("sid_collisions", 0)) > 0:
        item_key = prepared.trie.item_leaf.cpu()
    return evaluate_policy(policy, prepared, split, beams=beams, device=dev, item_key=item_key)
