"""One training loop for every stage: ``sft``, ``gflowgr``, and the baselines ``sft_continue``, ``dpo``, ``sdpo``.

The loop, checkpoints, data parallelism and evaluation live here; each stage's trajectories, sampler and
loss live in :mod:`gflowgr_core.train.stages`. A step reads a batch of training rows
(:class:`~gflowgr_core.trajectories.ExampleBatch`: history, positive, trunk window) and hands it to the stage,
whose sampler draws its trajectories (:meth:`~gflowgr_core.train.stages.Stage.draw`) and which reads the
policy's hidden states at the decision positions from one packed forward (``packing: true``, the default: a
user's examples share one encoding of their history) or from per-prefix prompts (``packing: false``, the
reference).

With packing, an epoch visits the trunk windows (:func:`gflowgr_core.data.windows.trunk_windows`) in random
order, each window's examples together, and cuts batches of ``batch_size`` examples from that order.

Model selection uses the validation split only (trie-constrained beam search); the test split is read once,
with the best checkpoint, at the end of the run.

Runs are resumable: ``out/last/`` holds the model, optimiser, scheduler, sampler and reward state, every
random state, the epoch's permutation and position in it, and the early-stopping state; it is written at
every epoch end, every ``save_every_steps`` steps, and when SIGTERM/SIGINT asks the run to stop (at the next
step boundary). ``resume=true`` continues from it and reaches the same weights as an uninterrupted run.
Under ``torchrun`` the loop runs data-parallel (see :mod:`gflowgr_core.train.distributed`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gflowgr_core.backends import available_backends
from gflowgr_core.data.prepared import PreparedData
from gflowgr_core.debug import oom_hint
from gflowgr_core.decoding.search import beam_search, sample
from gflowgr_core.devices import cpu_memory_retained, retain_freed_cpu_memory
from gflowgr_core.evaluation import evaluate_policy, evaluation_users, item_key_of
from gflowgr_core.model.hidden_dropout import add_hidden_dropout
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.data.windows import trunk_windows, window_order
from gflowgr_core.reward import Reward
from gflowgr_core.samplers import UserItems, make_sampler
from gflowgr_core.train.checkpoint import (TRAINER_STATE_FILE, VALID_RANKS_FILE, CheckpointError, capture_rng,
                                           is_complete, load_extra, load_policy, recover_checkpoint, restore_rng,
                                           save_policy, save_sharded)
from gflowgr_core.train.config import (ConfigError, TrainConfig, checkpoint_model_config, rename_old_keys,
                                       save_config)
from gflowgr_core.train.distributed import DistContext
from gflowgr_core.train.fsdp import ShardedTraining, build_on_rank0
from gflowgr_core.train.signals import StopRequest
from gflowgr_core.train.stages import GFlowGRStage, PreferenceStage, SFTStage, Stage, StageContext
from gflowgr_core.trajectories import ExampleBatch

log = logging.getLogger("gflowgr")

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Streams of derived_seed: one per purpose, so that e.g. epoch 1's order and rank 1's sampler never share a seed.
SEED_STREAMS = {"epoch_order": 1, "sampler_rank": 2}


def derived_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for item ``index`` (an epoch, a rank) of the random ``stream`` (:data:`SEED_STREAMS`) of a
    run seeded with ``seed``: a splitmix64 mix, so neighbouring indices get unrelated generators."""
    if stream not in SEED_STREAMS:
        raise ValueError(f"stream must be one of {sorted(SEED_STREAMS)}, got {stream!r}")
    mask = 0xFFFFFFFFFFFFFFFF
    z = int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + SEED_STREAMS[stream] * 0xD6E8FEB86659FD93
    z &= mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1  # 63 bits: manual_seed takes it on every platform


# Config keys that may differ between a run and its resumption without changing the trajectory of the weights
# (evaluate_test only decides whether the finished run decodes test: a tuning run resumed with it reads test once).
RESUME_FREE_KEYS = frozenset({"resume", "save_every_steps", "handle_signals", "distributed", "device", "backend",
                              "out", "data", "log_every", "eval_batch_size", "evaluate_test"})

STATE_FORMAT = 1

# Parts of a step's loss shown in the periodic log line, when the stage reports them (log.jsonl has every value).
LOSS_PARTS = ("ce", "gfn", "pref", "log_z")
# Validation/test metrics in the end-of-run table (headline scoring; result.json has every key).
SUMMARY_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "coverage@10")


@dataclass
class LoopState:
    """Where the training loop is: everything besides model/optimiser/RNG that a resumed run needs.

    ``epoch`` counts completed epochs; ``perm`` is the current epoch's example order (``None`` before it is
    drawn) and ``batch`` the next batch index in it; ``running`` the epoch's step losses so far.
    """

    epoch: int = 0
    batch: int = 0
    perm: Optional[torch.Tensor] = None
    running: list = field(default_factory=list)
    epoch_seconds: float = 0.0
    train_seconds: float = 0.0
    best_value: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    steps_exhausted: bool = False   # max_steps reached: the epoch ends early
    finished: bool = False          # no more epochs: early stopping, max_steps, or all epochs run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _StageLoss(torch.nn.Module):
    """The policy and reward as one module whose forward is :meth:`Trainer.compute_loss`.

    DDP needs every trained parameter used inside the wrapped forward (the LM head rows are used by the
    loss, after the policy's own forward), so the whole loss is computed there.
    """

    def __init__(self, trainer: "Trainer"):
        super().__init__()
        self.policy = trainer.policy
        if trainer.reward is not None:
            self.reward = trainer.reward
        self._compute = trainer.compute_loss

    def forward(self, index: torch.Tensor, candidates: Optional[torch.Tensor]):
        return self._compute(index, candidates)


class Trainer:
    """Runs one stage of :class:`TrainConfig` on a prepared dataset.

    Args:
        config: the run's configuration (validated here).
        data: an already loaded :class:`PreparedData`; loaded from ``config.data`` when omitted.
    """

    def __init__(self, config: TrainConfig, data: Optional[PreparedData] = None):
        self.cfg = config.validate()
        seed_everything(config.seed)
        self.dist = DistContext.from_env(config.device, config.distributed)
        self.device = self.dist.device
        if self.device.type == "cpu" and config.retain_cpu_memory:
            already = cpu_memory_retained()  # a process-wide setting: said once, not by every run of the process
            if retain_freed_cpu_memory():
                if not already:
                    log.info("CPU memory freed by tensors stays in this process (retain_cpu_memory: true)")
                if config.distributed == "fsdp" and self.dist.is_main:
                    # FSDP frees gathered layers and buffers of many sizes every step; kept, they grow each
                    # rank's peak to about DDP's (benchmarks/results/fsdp_cpu*.json).
                    log.info("distributed: fsdp with retain_cpu_memory: true: the retained memory raises each "
                             "rank's peak to about DDP's; set retain_cpu_memory: false to keep sharding's saving")
            else:
                log.info("retain_cpu_memory: true has no effect here: the C library is not glibc")
        self.data = data if data is not None else PreparedData.load(config.data)
        self.trie = self.data.trie.to(self.device)
        self.item_codes = self.data.catalog.codes.to(self.device)
        self.codes_per_level = tuple(self.data.catalog.codes_per_level)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.jsonl"
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)

        # distributed: fsdp builds the policy on rank 0 only (the others get its structure on `meta`), unless a
        # frozen reference needs whole weights on every rank anyway; ShardedTraining then spreads the weights.
        self._built_on_rank0 = self.dist.strategy == "fsdp" and config.stage not in ("dpo", "sdpo")
        if self._built_on_rank0:
            self.policy, self.cfg = build_on_rank0(lambda: (self._build_policy(), self.cfg), self.dist)
        else:
            self.policy = self._build_policy().to(self.device)
        # After the build, on every rank: hooks are not part of the meta skeleton rank 0 broadcasts under FSDP.
        add_hidden_dropout(self.policy.model, self.cfg.model.hidden_dropout)
        self.reference: Optional[SIDPolicy] = None
        if config.stage in ("dpo", "sdpo"):
            self.reference = copy.deepcopy(self.policy).eval()
            self.reference.requires_grad_(False)

        self.train_index = self._train_index()
        self.user_items = None
        if config.stage in ("gflowgr", "dpo", "sdpo"):
            self.user_items = UserItems(self.data.split.train.to(self.device))
        self.item_key = self._item_key()
        self.reward: Optional[Reward] = None
        self.cm_scorer = None
        self.cm_report: Optional[dict] = None   # the collaborative model's own valid/test metrics, when built
        self.sampler = None
        if config.stage == "gflowgr":
            self.reward = Reward(config.gfn.reward, base_levels=self.data.catalog.base_levels).to(self.device)
            if self._needs_cm():
                self.cm_scorer = self._collaborative_scorer()
            self.sampler = self._make_sampler(config.gfn.sampler, config.gfn.n_aug)
        elif config.stage in ("dpo", "sdpo"):
            if self._needs_cm():
                self.cm_scorer = self._collaborative_scorer()
            self.sampler = self._make_sampler(config.pref.sampler, config.pref.n_neg)

        self.stage = self._build_stage()
        self.windows = trunk_windows(self.data.split.train.history) if config.packing else None
        self.ctx = StageContext(trie=self.trie, item_codes=self.item_codes, codes_per_level=self.codes_per_level,
                                backend=config.backend, packing=config.packing, row_tokens=config.pack_row_tokens,
                                rows=config.pack_rows, sparse=config.pack_sparse)
        if config.stage == "gflowgr":
            self._init_log_z()
        if config.packing and (self.dist.is_main or not self._built_on_rank0):  # rank 0 holds the only weights
            self.policy.check_packing(sparse=config.pack_sparse)
        if config.compile_mode != "eager":
            if self.dist.enabled:
                raise ValueError(f"compile_mode={config.compile_mode!r} is not supported in data-parallel runs "
                                 f"(WORLD_SIZE={self.dist.world_size}): set compile_mode: eager")
            self.policy.compile_packed_forward(config.compile_mode)

        self.steps_per_epoch = math.ceil(len(self.train_index) / config.batch_size)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        # distributed: fsdp shards the policy now: the optimiser must be built on the sharded parameters.
        self.fsdp: Optional[ShardedTraining] = None
        if self.dist.strategy == "fsdp":
            self.fsdp = ShardedTraining(_StageLoss(self), self.policy, self.dist, config.dtype,
                                        from_rank0=self._built_on_rank0)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        # Under FSDP bf16 is FSDP's mixed-precision policy rather than autocast.
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if config.dtype == "bfloat16" and self.device.type == "cuda" and self.fsdp is None else None)
        self.stop = StopRequest(install=config.handle_signals)
        self._ddp: Optional[torch.nn.Module] = None
        self._global_sampling = False

    # ----------------------------------------------------------------------------------------- setup
    def _build_policy(self) -> SIDPolicy:
        cfg = self.cfg
        if cfg.init_checkpoint:
            policy = load_policy(cfg.init_checkpoint, device="cpu")
            if tuple(policy.codes_per_level) != self.codes_per_level:
                raise ValueError(f"checkpoint {cfg.init_checkpoint} was trained on SID levels "
                                 f"{tuple(policy.codes_per_level)}, the data {cfg.data} has {self.codes_per_level}")
            # The checkpoint's model is the one trained: warn about model.* it overrides, record it in config.yaml.
            self.cfg = dataclasses.replace(cfg, model=checkpoint_model_config(policy, cfg.model, cfg.init_checkpoint))
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
        rng = torch.Generator().manual_seed(self.cfg.seed)
        return torch.randperm(n, generator=rng)[:limit].sort().values

    def _item_key(self) -> Optional[torch.Tensor]:
        """Leaf node per item when SIDs are shared, so that SID-match metrics are reported too."""
        return item_key_of(self.data)

    def _needs_cm(self) -> bool:
        """Whether this stage's sampler or reward reads the collaborative model."""
        gfn = self.cfg.gfn
        name = gfn.sampler if self.cfg.stage == "gflowgr" else self.cfg.pref.sampler
        uses_sampler = name == "cm_curriculum" or (name == "mixture" and "cm_curriculum" in gfn.mixture)
        uses_reward = self.cfg.stage == "gflowgr" and gfn.reward.use_cm and gfn.reward.cm_source == "cm"
        return uses_sampler or uses_reward

    def _build_stage(self) -> Stage:
        cfg = self.cfg
        if cfg.stage == "gflowgr":
            return GFlowGRStage(cfg.gfn, cfg.likelihood_support, self.reward, self.cm_scorer, self.sampler,
                                diagnostics_every=cfg.log_every)
        if cfg.stage in ("dpo", "sdpo"):
            return PreferenceStage(cfg.stage, cfg.pref, cfg.likelihood_support, self.reference, self.sampler)
        return SFTStage(cfg.stage, cfg.likelihood_support)

    def _collaborative_scorer(self):
        """SASRec trained on the same split (cached by config and split, outside the data folder) and its
        score cache. Rank 0 trains or loads the model; the other ranks wait, then load the same file."""
        from gflowgr_core.collaborative import CMScorer, load_or_train_sasrec

        cm_cfg = dataclasses.replace(self.cfg.cm, seed=self.cfg.seed, device=str(self.device))
        model = load_or_train_sasrec(self.data.split, cm_cfg, is_main=self.dist.is_main,
                                     barrier=self.dist.barrier)
        self.cm_report = getattr(model, "train_report", {})
        return CMScorer.build(model, self.data.split.train, device=self.device)

    def _make_sampler(self, name: str, n: int):
        """The augmentation (or negative) sampler ``name`` with this run's settings.

        Every sampler excludes all of the user's training items and every item with the positive's SID.
        """
        gfn, n_items = self.cfg.gfn, self.data.num_items
        common = dict(n_items=n_items, user_items=self.user_items, item_codes=self.item_codes)
        if name == "mixture":
            parts = [(self._make_sampler(part, n), float(w)) for part, w in gfn.mixture.items()]
            return make_sampler("mixture", components=parts)
        if name == "random":
            return make_sampler("random", **common)
        if name == "logs":
            return make_sampler("logs", split=self.data.split.train, **common)
        if name == "cm_curriculum":
            return make_sampler("cm_curriculum", scorer=self.cm_scorer, pool_size=gfn.curriculum_pool,
                                n_random=gfn.curriculum_random, start_quantile=gfn.curriculum_start,
                                end_quantile=gfn.curriculum_end, **common)
        return make_sampler("onpolicy", decode_fn=self._decode_for_sampler, sample_fn=self._sample_for_sampler,
                            mode=gfn.onpolicy_mode, temperature=gfn.onpolicy_temperature, **common)

    def _on_policy(self, history: torch.Tensor, k: int, decode) -> torch.Tensor:
        """``decode(policy, history_block) -> items[b, <=k]`` on the current policy in eval mode.

        While every rank samples the same global batch (data-parallel training), each decodes its own block
        of rows and the blocks are gathered, so the decoding work is split rather than repeated.
        """
        history = history.to(self.device)
        lo, hi = 0, history.shape[0]
        if self._global_sampling and self.dist.enabled:
            lo, hi = self.dist.shard_bounds(history.shape[0])
        with self._full_policy():  # FSDP: decode a consolidated copy (every rank enters, even without rows)
            was_training = self.policy.training
            self.policy.eval()
            if hi > lo:
                with torch.no_grad():
                    items = decode(history[lo:hi])
                if items.shape[1] < k:
                    items = torch.cat([items, items.new_full((items.shape[0], k - items.shape[1]), -1)], dim=1)
            else:
                items = torch.full((0, k), -1, dtype=torch.long, device=self.device)
            self.policy.train(was_training)
        if self._global_sampling and self.dist.enabled:
            items = self.dist.gather_rows(items)
        return items

    def _decode_for_sampler(self, history: torch.Tensor, k: int) -> torch.Tensor:
        """On-policy candidates: the current policy's trie-constrained beam search, top-``k`` items."""
        return self._on_policy(history, k, lambda h: beam_search(self.policy, self.trie, h, beams=max(k, 2),
                                                                 topk=k, backend=self.cfg.backend).items)

    def _sample_for_sampler(self, history: torch.Tensor, k: int, temperature: float,
                            generator: torch.Generator) -> torch.Tensor:
        """On-policy candidates: ``k`` trie-constrained ancestral samples at ``temperature`` per row."""
        # The sampler's generator lives on the CPU; decoding wants one on the policy's device.
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        device_gen = torch.Generator(device=self.device).manual_seed(seed)
        return self._on_policy(history, k, lambda h: sample(self.policy, self.trie, h, n=k, temperature=temperature,
                                                            generator=device_gen, backend=self.cfg.backend).items)

    def _init_log_z(self) -> None:
        """Start log Z at ``gfn.log_z_init``, or at the log of the expected reward mass of a sample of
        training examples (TB's fixed point is log Z(U) = log sum_x R(x); starting at 0 gives huge early
        residuals that fight the CE term)."""
        value = self.cfg.gfn.log_z_init
        if value is None:
            rng = torch.Generator().manual_seed(self.cfg.seed)
            rows = self.train_index[torch.randperm(len(self.train_index), generator=rng)[:512]]
            batch = self.batch(rows)
            mass = self.stage.catalogue_mass(self.ctx, batch.example, batch.positive)
            if mass is None:
                log.info("log Z starts at 0: the reward reads the LM's own probabilities (cm_source='lm'), so "
                         "there is no catalogue-wide reward mass to start from")
                return
            value = float(mass.log_mean_total())
        self.policy.set_log_z_init(value)
        log.info("log Z starts at %.3f (%s)", value, "configured" if self.cfg.gfn.log_z_init is not None
                 else "log of the expected reward mass of 512 training examples")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        log_z = list(self.policy.log_z_head.parameters())
        log_f = list(self.policy.log_f_head.parameters())
        flow_ids = {id(p) for p in log_z + log_f}
        lm_params = [p for p in self.policy.parameters() if p.requires_grad and id(p) not in flow_ids]
        log_z_lr = cfg.gfn.flow_lr if cfg.gfn.log_z_lr is None else cfg.gfn.log_z_lr
        return torch.optim.AdamW([{"params": lm_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                                  {"params": log_z, "lr": log_z_lr, "weight_decay": 0.0},
                                  {"params": log_f, "lr": cfg.gfn.flow_lr, "weight_decay": 0.0}])

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak over the run."""
        warm = max(1, self.cfg.warmup_steps)
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    # ------------------------------------------------------------------------------------------ loss
    def batch(self, index: torch.Tensor) -> ExampleBatch:
        """The training rows ``index[B]`` on the device, with their trunk windows when packing."""
        index = torch.as_tensor(index, dtype=torch.long)
        window = self.windows.index_select(0, index) if self.windows is not None else None
        return ExampleBatch.from_split(self.data.split.train, index, window=window).to(self.device)

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The generator of epoch ``epoch``'s order (0-based): seeded from ``seed`` and ``epoch`` alone (epoch 0
        from ``seed`` itself), apart from the generator the sampler draws from. Every method run with one seed
        (whatever its sampler draws, or none) therefore sees the same batches at every step of every epoch, and
        a resumed run the order of an uninterrupted one."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        seed = int(self.cfg.seed) if epoch == 0 else derived_seed(self.cfg.seed, epoch, "epoch_order")
        return torch.Generator(device="cpu").manual_seed(seed)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """An epoch's order of the training rows, drawn from ``generator`` (the loop passes
        :meth:`epoch_generator`): trunk windows in random order, each window's rows together
        (``batch_order: windows`` with packing), else a uniform shuffle."""
        if self.windows is not None and self.cfg.batch_order == "windows":
            return window_order(self.train_index, self.windows, generator)
        return self.train_index[torch.randperm(len(self.train_index), generator=generator)]

    def packed_rows_per_batch(self, order: Optional[torch.Tensor] = None) -> list[int]:
        """Rows of ``pack_row_tokens`` that each batch of an epoch needs with this stage's trajectories per
        example: the most of them is the smallest ``pack_rows`` (static shapes) that epoch fits in.

        Args:
            order: an epoch's order of training rows (default: :meth:`epoch_order` drawn from a generator
                seeded with ``seed``). The trajectories' codes do not change the layout, so
                each positive stands in for all of its example's trajectories.
        """
        if self.windows is None:
            raise ValueError("packed_rows_per_batch needs packing: true")
        if order is None:
            order = self.epoch_order(torch.Generator().manual_seed(self.cfg.seed))
        size, T = self.cfg.batch_size, self.stage.trajectories
        rows = []
        for start in range(0, len(order), size):
            b = self.batch(order[start:start + size])
            codes = self.item_codes[b.positive].unsqueeze(1).expand(-1, T, -1)
            layout = self.policy.packed_layout(b.history, codes, b.window, row_tokens=self.cfg.pack_row_tokens)
            rows.append(int(layout.input_ids.shape[0]))
        return rows

    def compute_loss(self, index: torch.Tensor, candidates: Optional[torch.Tensor] = None,
                     step: Optional[int] = None) -> tuple[torch.Tensor, dict]:
        """The stage's loss (mean over the examples) on training examples ``index[B]`` and the values to log.

        Args:
            index: ``LongTensor[B]`` rows of the training split.
            candidates: optional ``LongTensor[B, n]`` sampler output for these rows (``gfn.n_aug``
                augmentations, or ``pref.n_neg`` negatives), already drawn; drawn here when omitted.
            step: the optimisation step (flow warm-up reads it); default this trainer's own counter.
        """
        batch = self.batch(index)
        if candidates is None:
            trajectories = self.stage.draw(self.ctx, batch, self.generator)
        else:
            trajectories = self.stage.trajectories_for(self.ctx, batch, candidates.to(self.device))
        return self.stage.loss(self.ctx, self.policy, trajectories, self.step if step is None else step)

    def draw_candidates(self, index: torch.Tensor) -> Optional[torch.Tensor]:
        """The sampler's ``LongTensor[B, n]`` augmentations (or negatives) for training rows ``index[B]``
        (``None`` for a stage without a sampler)."""
        if self.stage.sampler is None:
            return None
        return self.stage.draw(self.ctx, self.batch(index), self.generator).candidates

    def train_step(self, index: torch.Tensor) -> dict:
        """One optimisation step on the global batch of training examples ``index[B]``; returns logged values.

        In a data-parallel run every rank receives the same ``index``: the sampler runs on the whole batch from
        the shared generator (so augmentations are those one process would draw), then each rank computes the
        loss of its block of rows, scaled so DDP's gradient average is the gradient of the global mean.
        """
        with oom_hint(len(index), f"{self.cfg.stage} training step {self.step}",
                      trajectories=self.stage.trajectories):
            return self._train_step(index)

    def _train_step(self, index: torch.Tensor) -> dict:
        self.policy.train()
        if self.dist.enabled:
            loss, logs = self._distributed_loss(index)
            if not math.isfinite(logs["loss"]):  # the reduced value: every rank raises together
                raise FloatingPointError(f"non-finite loss {logs['loss']} at step {self.step} ({logs})")
        else:
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

    @contextlib.contextmanager
    def _full_policy(self):
        """Under FSDP, ``self.policy`` is a consolidated plain copy inside the block (beam search and saving
        need whole weights); every rank must enter. Elsewhere (and nested) it does nothing."""
        if self.fsdp is None or self.policy is not self.fsdp.policy:
            yield
            return
        with self.fsdp.consolidated() as plain:
            sharded, self.policy = self.policy, plain
            try:
                yield
            finally:
                self.policy = sharded

    def _save_policy(self, path: Path, info: dict, extra: Optional[dict] = None) -> None:
        """Rank 0 writes the policy folder ``path`` (under FSDP, the consolidated weights: every rank gathers),
        with ``extra`` files (see :func:`save_policy`)."""
        with self._full_policy():
            if self.dist.is_main:
                save_policy(self.policy, path, self.cfg, extra=extra, info=info)

    def _ddp_module(self) -> torch.nn.Module:
        if self.fsdp is not None:  # the FSDP root computes the loss in its forward, as the DDP wrapper does
            return self.fsdp.root
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            # Which parameters receive gradients depends on the stage (e.g. log F is unused by TB, the flow
            # heads by SFT), so DDP must look for unused ones.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(_StageLoss(self), device_ids=device_ids,
                                                find_unused_parameters=True)
        return self._ddp

    def _distributed_loss(self, index: torch.Tensor) -> tuple[torch.Tensor, dict]:
        n = int(index.shape[0])
        candidates = None
        if self.sampler is not None:
            self._global_sampling = True
            try:
                candidates = self.draw_candidates(index)
            finally:
                self._global_sampling = False
        lo, hi = self.dist.shard_bounds(n)
        rows, scale = slice(lo, hi), self.dist.loss_scale(hi - lo, n)
        if hi == lo:  # fewer rows than ranks: join the gradient reduction with a zero-weighted example
            rows, scale = slice(0, 1), 0.0
        local_cands = candidates[rows] if candidates is not None else None
        module = self._ddp_module()
        if self.autocast is not None:
            with self.autocast:
                loss, logs = module(index[rows], local_cands)
        else:
            loss, logs = module(index[rows], local_cands)
        logs = self.dist.reduce_logs(logs, hi - lo)
        return loss * scale, logs

    def close(self) -> None:
        """Leave the process group at the end of the run (every rank, once; a no-op in one process).

        The DDP wrapper and the FSDP state reach the trainer back through the loss module, a reference cycle
        that keeps the process group and its last collectives alive until Python's final garbage collection.
        Destroyed there, gloo's worker threads die while the interpreter is finalising and the process aborts
        ("terminate called without an active exception", exit -6) after a successful run. So the wrappers
        are dropped and collected here, while the interpreter is whole, before the group is destroyed.
        """
        self._ddp = None
        self.fsdp = None
        self.dist.shutdown()  # collects the dropped wrappers, then leaves

    def request_stop(self, reason: str = "requested") -> None:
        """Ask :meth:`fit` to save ``out/last/`` and return at the next step boundary (as SIGTERM does)."""
        self.stop.request(reason)

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, split_name: str = "valid", max_users: Optional[int] = None,
                 ranks_out: Optional[dict] = None) -> dict:
        """Recall/NDCG/coverage/tail share on ``split_name`` from trie-constrained beam search.

        Data-parallel runs split the users over ranks and gather the rankings, so every rank gets the metrics.
        ``ranks_out`` receives the per-user ranks of the held-out item (see :func:`evaluate_policy`).
        """
        index = evaluation_users(len(getattr(self.data.split, split_name)), max_users)
        with self._full_policy():
            return evaluate_policy(self.policy, self.data, split_name, index=index, beams=self.cfg.eval_beams,
                                   batch_size=self.cfg.eval_batch_size, device=self.device,
                                   backend=self.cfg.backend, item_key=self.item_key, dist=self.dist,
                                   ranks_out=ranks_out)

    # ------------------------------------------------------------------------------------------- loop
    def banner_lines(self) -> list[str]:
        """What the run is about to do, logged once at its start (rank 0): examples, steps per epoch and in all,
        the model's parameters, device, backends, and where the logs and checkpoints go."""
        cfg = self.cfg
        n_train, available = len(self.train_index), len(self.data.split.train)
        subset = f" (a seeded subset of {available:,})" if n_train < available else ""
        if cfg.max_steps is not None:
            length = f"max_steps = {self.total_steps:,} steps"
        else:
            length = f"{cfg.epochs} epoch(s) = {self.total_steps:,} steps"
        # Under FSDP the parameters are sharded tensors whose numel is still the whole tensor's.
        params = sum(p.numel() for p in self.policy.parameters())
        trained = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        init = (f"from {cfg.init_checkpoint}" if cfg.init_checkpoint else
                f"from {cfg.model.pretrained}" if cfg.model.pretrained else "from scratch")
        start = f"resuming at step {self.step:,}" if cfg.resume else "new run"
        processes = (f", {self.dist.world_size} processes ({self.dist.strategy})" if self.dist.enabled else "")
        return [
            f"gflowgr train: stage {cfg.stage}, {start}, writing to {self.out}",
            f"  data {cfg.data}: {n_train:,} training examples{subset}, {self.steps_per_epoch:,} steps per epoch "
            f"of {cfg.batch_size} examples, {length}",
            f"  model: {params:,} parameters ({trained:,} trained), {init}",
            f"  device {self.device}{processes}, dtype {cfg.dtype}, backend {cfg.backend} "
            f"(available: {', '.join(available_backends())})",
            f"  a log line every {cfg.log_every} steps (all values in {self.log_path.name}); validation every "
            f"{cfg.eval_every} epoch(s) on {cfg.valid_max_users or 'all'} users, selecting on {cfg.select_metric}",
        ]

    def _progress_line(self, st: LoopState, window: list[dict], lr: float, examples: int, seconds: float) -> str:
        """The periodic log line: mean loss (and its parts) over the steps since the last line, learning rate,
        throughput, and the time left for the remaining training steps at that pace (validation not counted)."""
        parts = [f"{key} {np.mean([w[key] for w in window]):.4f}" for key in LOSS_PARTS
                 if all(key in w for w in window) and any(w[key] != w["loss"] for w in window)]
        loss = f"loss {np.mean([w['loss'] for w in window]):.4f}" + (f" ({', '.join(parts)})" if parts else "")
        per_step = seconds / max(1, len(window))
        eta = _duration(per_step * max(0, self.total_steps - self.step))
        return (f"{self.cfg.stage} step {self.step:,}/{self.total_steps:,} (epoch {st.epoch + 1}, batch {st.batch}/"
                f"{self.steps_per_epoch}): {loss}, lr {lr:.2e}, {examples / max(seconds, 1e-9):,.1f} examples/s, "
                f"ETA {eta}")

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _should_stop(self) -> bool:
        return self.dist.any_flag(self.stop.requested)

    def fit(self) -> dict:
        """Train with per-epoch validation and early stopping; evaluate the best checkpoint on test once.

        Returns the result summary (also written to ``out/result.json``) with ``status="finished"``; or, when
        SIGTERM/SIGINT (or :meth:`request_stop`) stopped the run, ``status="interrupted"`` and the path of
        the resumable checkpoint, after writing it.
        """
        cfg = self.cfg
        if self.dist.is_main:
            save_config(cfg, self.out / "config.yaml")
        last_dir = self.out / "last"
        if cfg.resume:
            st = self._resume(last_dir)
        else:
            st = LoopState()
            if self.dist.is_main and self.log_path.exists():
                # A new run gets its own log; the previous one is kept beside it.
                previous = self.log_path.with_name("log.prev.jsonl")
                self.log_path.replace(previous)
                log.info("starting a new run in %s (resume=false): the previous log moved to %s%s", self.out,
                         previous.name, ", last/ will be replaced" if last_dir.exists() else "")
        if self.dist.is_main:
            for line in self.banner_lines():
                log.info(line)
        # A visible progress bar and log lines share the terminal: the lines print above the bar.
        with self.stop, logging_redirect_tqdm():
            interrupted = self._train_loop(st, last_dir)
        if interrupted is not None:
            return interrupted
        return self._finish(st)

    def _train_loop(self, st: LoopState, last_dir: Path) -> Optional[dict]:
        """Epochs until done; returns the interruption summary if a stop was requested, else ``None``."""
        cfg = self.cfg
        max_epochs = cfg.epochs if cfg.max_steps is None else 10 ** 9
        clock = time.time() - st.train_seconds
        while not st.finished and st.epoch < max_epochs:
            self.policy.train()
            if st.perm is None:
                st.perm = self.epoch_order(self.epoch_generator(st.epoch))
                st.batch, st.running, st.epoch_seconds = 0, [], 0.0
            epoch_clock = time.time() - st.epoch_seconds
            # The epoch's last batch, or where max_steps ends the run inside it.
            epoch_steps = min(self.steps_per_epoch, st.batch + self.total_steps - self.step)
            # disable=None: no bar when stderr is not a terminal (nohup, a pipe); the log lines report instead.
            bar = tqdm(total=epoch_steps, initial=st.batch, desc=f"{cfg.stage} epoch {st.epoch + 1}",
                       leave=False, disable=None if self.dist.is_main else True)
            window: list[dict] = []   # the logged values of the steps since the last log line
            window_examples, window_clock = 0, time.time()
            while st.batch < self.steps_per_epoch and not st.steps_exhausted:
                b = st.batch
                if self.sampler is not None and hasattr(self.sampler, "set_progress"):
                    self.sampler.set_progress(self.step / max(1, self.total_steps - 1))
                rows = st.perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                logs = self.train_step(rows)
                st.running.append(logs["loss"])
                st.batch = b + 1
                bar.update(1)
                window.append(logs)
                window_examples += len(rows)
                # Every log_every steps, and at the end of an epoch or of the run (max_steps).
                if (self.step % cfg.log_every == 0 or st.batch == self.steps_per_epoch
                        or self.step >= self.total_steps):
                    lr = self.scheduler.get_last_lr()[0]
                    self._log({"step": self.step, "epoch": st.epoch + 1, "lr": lr, **logs})
                    bar.set_postfix(loss=f"{np.mean(st.running[-cfg.log_every:]):.4f}")
                    if self.dist.is_main:
                        log.info(self._progress_line(st, window, lr, window_examples, time.time() - window_clock))
                    window, window_examples, window_clock = [], 0, time.time()
                st.steps_exhausted = self.step >= self.total_steps
                st.epoch_seconds = time.time() - epoch_clock
                st.train_seconds = time.time() - clock
                if self._should_stop():
                    bar.close()
                    return self._interrupt(st, last_dir)
                if cfg.save_every_steps and self.step % cfg.save_every_steps == 0:
                    self.save_last(st, last_dir)
            bar.close()
            self._end_epoch(st)
            st.train_seconds = time.time() - clock
            self.save_last(st, last_dir)
            if not st.finished and self._should_stop():
                return self._interrupt(st, last_dir, saved=True)
        return None

    def _end_epoch(self, st: LoopState) -> None:
        """Validation, best checkpoint and early stopping at the end of an epoch (or of the step budget)."""
        cfg = self.cfg
        st.epoch += 1
        record = {"epoch": st.epoch, "step": self.step, "train_loss": float(np.mean(st.running)),
                  "epoch_seconds": st.epoch_seconds}
        if st.steps_exhausted:
            st.finished = True
        if st.epoch % cfg.eval_every == 0 or st.finished:
            ranks: dict = {}
            metrics = self.evaluate("valid", cfg.valid_max_users, ranks_out=ranks)
            record["valid"] = metrics
            value = metrics[cfg.select_metric]
            if value > st.best_value:
                st.best_value, st.best_epoch, st.bad_epochs = value, st.epoch, 0
                # The best epoch's per-user validation ranks go inside best/, so they always match its weights:
                # tuning compares settings with paired tests on them without reading test.
                self._save_policy(self.out / "best", info={"step": self.step, "epoch": st.epoch},
                                  extra={VALID_RANKS_FILE: {"split": "valid", "max_users": cfg.valid_max_users,
                                                            "ranks": _int8_ranks(ranks)}})
            else:
                st.bad_epochs += 1
            log.info("%s epoch %d: loss %.4f, valid %s %.4f (best %.4f at epoch %d), %.1fs", cfg.stage, st.epoch,
                     record["train_loss"], cfg.select_metric, value, st.best_value, st.best_epoch,
                     st.epoch_seconds)
            if st.bad_epochs >= cfg.patience:
                log.info("early stopping: no %s gain for %d evaluations", cfg.select_metric, st.bad_epochs)
                st.finished = True
        if cfg.max_steps is None and st.epoch >= cfg.epochs:
            st.finished = True
        self._log({"eval": record})
        st.history.append(record)
        st.perm, st.batch, st.running, st.epoch_seconds = None, 0, [], 0.0

    def _interrupt(self, st: LoopState, last_dir: Path, saved: bool = False) -> dict:
        if not saved:
            self.save_last(st, last_dir)
        reason = self.stop.reason or "a stop request on another rank"
        message = (f"training stopped ({reason}) at step {self.step} (epoch {st.epoch + 1}, batch {st.batch} of "
                   f"{self.steps_per_epoch}); resumable state saved to {last_dir}: rerun the same command with "
                   f"resume=true to continue")
        log.warning(message)
        return {"status": "interrupted", "reason": reason, "stage": self.cfg.stage, "steps": self.step,
                "epochs": st.epoch, "batch_in_epoch": st.batch, "checkpoint": str(last_dir), "message": message}

    def _finish(self, st: LoopState) -> dict:
        cfg = self.cfg
        best_dir = self.out / "best"
        if st.best_epoch < 0:  # no validation ran: keep the last weights
            self._save_policy(best_dir, info={"step": self.step, "epoch": st.epoch})
        self.dist.barrier()
        self.policy = load_policy(best_dir, device=self.device, recover=self.dist.is_main)
        # Tuning runs select on validation and must not read test at all.
        ranks: dict = {}
        test = self.evaluate("test", ranks_out=ranks) if cfg.evaluate_test else None
        if test is not None and self.dist.is_main:
            # Per-user ranks of the held-out item under each scoring: paired tests between runs read them.
            torch.save({"split": "test", "ranks": _int8_ranks(ranks)}, self.out / "test_ranks.pt")
        result = {"status": "finished", "stage": cfg.stage, "best_epoch": st.best_epoch,
                  "best_valid": st.best_value, "steps": self.step, "epochs": st.epoch,
                  "train_seconds": st.train_seconds, "seconds_per_epoch": st.train_seconds / max(1, st.epoch),
                  "test": test, "history": st.history, "checkpoint": str(best_dir), "device": str(self.device),
                  "collaborative_model": self.cm_report,
                  "world_size": self.dist.world_size, "files": self._written_files()}
        if self.dist.is_main:
            (self.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    def _written_files(self) -> dict[str, str]:
        """``{path: what it holds}`` for the files and folders of a finished run in ``out``."""
        what = {"result.json": "the run's summary, with every metric and the per-epoch history",
                "log.jsonl": "one JSON line per logged step and per epoch",
                "config.yaml": "the run's merged config",
                "best": "the best validation checkpoint (gflowgr eval --checkpoint) and its epoch's valid_ranks.pt",
                "last": "the resumable state (resume=true)",
                "test_ranks.pt": "each test user's rank of the held-out item (paired tests)"}
        # Folders end in "/" so that the table tells them from files.
        return {str(self.out / name) + ("/" if (self.out / name).is_dir() else ""): text
                for name, text in what.items() if name == "result.json" or (self.out / name).exists()}

    # ----------------------------------------------------------------------------------------- resume
    def save_last(self, st: LoopState, last_dir: Optional[Path] = None) -> Path:
        """Write the resumable checkpoint (rank 0; every rank contributes its random states). Under FSDP every
        rank also writes its shards of the model (policy and reward) and optimiser (:func:`save_sharded`)."""
        last_dir = Path(last_dir or self.out / "last")
        rng = self.dist.gather_objects(capture_rng(self.generator))
        sharded = self.fsdp is not None
        if self.dist.is_main or sharded:
            state = {
                "format_version": STATE_FORMAT,
                "step": self.step,
                "loop": st.to_dict(),
                "optimizer": None if sharded else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict() if self.sampler is not None else None,
                "reward": self.reward.state_dict() if self.reward is not None and not sharded else None,
                "rng": rng,
                "world_size": self.dist.world_size,
                "log_bytes": self.log_path.stat().st_size if self.log_path.exists() else 0,
                "config": self.cfg.to_dict(),
            }
            info = {"step": self.step, "epoch": st.epoch, "batch_in_epoch": st.batch, "resumable": True}
            if sharded:
                save_sharded(last_dir, self.fsdp.sharded_state(self.optimizer), self.dist, self.cfg,
                             extra={TRAINER_STATE_FILE: state}, info=info)
            else:
                save_policy(self.policy, last_dir, self.cfg, extra={TRAINER_STATE_FILE: state}, info=info)
        self.dist.barrier()
        return last_dir

    def _check_resume_config(self, saved: dict, where: Path) -> None:
        def flat(d: dict, prefix: str = "") -> dict:
            out = {}
            for k, v in d.items():
                key = prefix + k
                out.update(flat(v, key + ".") if isinstance(v, dict) and k != "mixture" else {key: v})
            return out

        # YAML/JSON round trips turn tuples into lists; compare through JSON. A run saved before a key was
        # renamed compares under the new name.
        old = json.loads(json.dumps(flat(rename_old_keys(saved, str(where)))))
        new = json.loads(json.dumps(flat(self.cfg.to_dict())))
        # A key added to the config after the run was saved reads as its default there, which is what it ran with.
        defaults = json.loads(json.dumps(flat(type(self.cfg)().to_dict())))
        changed = sorted(k for k in set(old) | set(new)
                         if k.split(".")[0] not in RESUME_FREE_KEYS and old.get(k, defaults.get(k)) != new.get(k))
        if changed:
            diff = ", ".join(f"{k}: {old.get(k, defaults.get(k))!r} -> {new.get(k)!r}" for k in changed)
            raise ConfigError(f"resume=true but the config differs from the one {where} was trained with ({diff}); "
                              f"only {sorted(RESUME_FREE_KEYS)} may change when resuming")

    def _resume(self, last_dir: Path) -> LoopState:
        """Load ``out/last/`` into this trainer; returns the loop state to continue from."""
        if self.dist.is_main:
            recover_checkpoint(last_dir)
        self.dist.barrier()
        if not last_dir.exists():
            raise CheckpointError(f"resume=true but {last_dir} does not exist: nothing to resume (run without "
                                  f"resume=true to start a new run in {self.out})")
        if not is_complete(last_dir):
            raise CheckpointError(f"resume=true but {last_dir} is incomplete or was not written by a resumable "
                                  f"run (no checkpoint.json)")
        state = load_extra(last_dir, TRAINER_STATE_FILE)
        if state.get("format_version") != STATE_FORMAT:
            raise CheckpointError(f"{last_dir / TRAINER_STATE_FILE}: unsupported format_version "
                                  f"{state.get('format_version')} (expected {STATE_FORMAT})")
        self._check_resume_config(state["config"], last_dir)
        if self.fsdp is not None:  # every rank reads its shards of the model and optimiser
            self.fsdp.load_sharded_state(self.optimizer, last_dir)
        else:
            saved = load_policy(last_dir, device="cpu", recover=False)
            try:
                self.policy.load_state_dict(saved.state_dict())
            except RuntimeError as exc:
                raise CheckpointError(f"{last_dir}: the saved policy does not fit this run's model: {exc}") from None
            del saved
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler is not None and state["sampler"] is not None:
            self.sampler.load_state_dict(state["sampler"])
        if self.reward is not None and state["reward"] is not None:
            self.reward.load_state_dict(state["reward"])
        self.step = int(state["step"])
        rngs = state["rng"]
        if len(rngs) != self.dist.world_size:
            log.warning("%s was written by %d processes, this run has %d: every rank restores rank 0's random "
                        "state (the trajectory can differ from an uninterrupted run where ranks draw "
                        "differently, e.g. with dropout)", last_dir, len(rngs), self.dist.world_size)
        restore_rng(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0], self.generator)
        st = LoopState(**state["loop"])
        if self.dist.is_main:
            self._truncate_log(int(state["log_bytes"]))
        log.info("resumed from %s at step %d (epoch %d, batch %d of %d)", last_dir, self.step, st.epoch + 1,
                 st.batch, self.steps_per_epoch)
        return st

    def _truncate_log(self, size: int) -> None:
        """Drop log lines written after the checkpoint (those steps run again), keeping one continuous log."""
        current = self.log_path.stat().st_size if self.log_path.exists() else 0
        if current == size:  # nothing written after the checkpoint (also: a stop before the first log line)
            return
        if current < size:
            log.warning("%s has %d bytes but the checkpoint was taken at %d: the log was edited or replaced; "
                        "appending to it as it is", self.log_path, current, size)
            return
        with self.log_path.open("r+b") as f:
            f.truncate(size)


def _int8_ranks(ranks: dict) -> dict:
    """:func:`evaluate_policy`'s ``ranks_out`` as saved: keys ``headline`` / ``renorm/``, int8 (ranks are -1..19)."""
    return {prefix or "headline": r.to(torch.int8) for prefix, r in ranks.items()}


def _duration(seconds: float) -> str:
    """``3h04m``, ``4m05s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def summary_table(result: dict) -> str:
    """The end of a run as ``gflowgr train`` prints it: status, best epoch, the headline validation (at the best
    epoch) and test metrics, training time, and the files the run wrote (``result["files"]``)."""
    if result.get("status") != "finished":
        return result.get("message", f"status: {result.get('status')}")
    valid = next((r["valid"] for r in result.get("history", []) if r.get("epoch") == result["best_epoch"]
                  and "valid" in r), None)
    lines = [f"{result['stage']}: finished, {result['epochs']} epoch(s), {result['steps']:,} steps, training "
             f"{_duration(result['train_seconds'])} ({result['seconds_per_epoch']:.1f} s per epoch) on "
             f"{result['device']}; best validation epoch {result['best_epoch']}",
             f"{'':<18}" + "".join(f"{m:>13}" for m in SUMMARY_METRICS)]
    for name, metrics in ((f"valid (epoch {result['best_epoch']})", valid), ("test", result.get("test"))):
        if metrics is None:
            lines.append(f"{name:<18}  not evaluated")
        else:
            lines.append(f"{name:<18}" + "".join(f"{metrics.get(m, float('nan')):>13.4f}" for m in SUMMARY_METRICS))
    files = result.get("files") or {}
    if files:
        width = max(len(path) for path in files)
        lines.append("wrote:")
        lines += [f"  {path:<{width}}  {text}" for path, text in files.items()]
    return "\n".join(lines)


def run_training(config: TrainConfig, data: Optional[PreparedData] = None) -> dict:
    """Train one stage (the ``gflowgr train`` command) and return its result summary.

    Under ``torchrun`` this joins the process group, trains data-parallel, and leaves the group at the end.
    The summary's ``status`` is ``"finished"``, or ``"interrupted"`` when a signal stopped the run after
    saving ``out/last/`` (continue it with ``resume=true``).
    """
    trainer = Trainer(config, data)
    try:
        return trainer.fit()
    finally:
        trainer.close()
