"""Hugging Face ``Trainer`` interop: ``GFlowGRConfig(TrainingArguments)`` and ``GFlowGRTrainer(Trainer)``.

The familiar TRL shape (``XConfig`` + ``XTrainer``) around the library's own training components: the
trainer builds a :class:`gflowgr_core.train.trainer.Trainer` (policy, trie, sampler, reward, collaborative
model) from the config and calls its ``compute_loss`` for every batch, so the loss, the samplers and the
reward have exactly one implementation. Hugging Face handles the optimisation loop: optimizer and
scheduler, gradient accumulation, mixed precision, clipping, logging callbacks, checkpoints and resuming.

Batches are indices into the prepared training split (:class:`SplitIndexDataset` and
:class:`SplitIndexCollator`); the library's trainer turns them into an
:class:`~gflowgr_core.trajectories.ExampleBatch` (histories, positives, trunk windows) and its stage into
trajectories.
``evaluate()`` runs the trie-constrained beam search on the validation split and reports Recall/NDCG,
coverage and long-tail share (``eval_recall@10``, ...), so ``metric_for_best_model="ndcg@10"`` works.

Saved checkpoints (``save_model`` and every ``checkpoint-N``) hold a :class:`SIDPolicy` folder (loadable
with ``gflowgr_core.train.checkpoint.load_policy`` and ``gflowgr eval``; LoRA weights merged) plus
``gflowgr_state.pt`` with the exact module state (adapters included), sampler and generator state, from
which ``train(resume_from_checkpoint=...)`` resumes.

Under ``accelerate launch`` with an FSDP2 config (``examples/accelerate_fsdp2.yaml``) accelerate shards the
module Hugging Face optimises (:class:`GFlowGRModel`): each decoder layer is its own unit and the root unit holds
the rest (embeddings, LM head, flow heads). The root's forward computes the whole stage loss, so the fused
loss reads the LM head's SID rows while FSDP holds them gathered, as in the library trainer's
``distributed: fsdp`` (``gflowgr_core.train.fsdp``). Beam-search evaluation, the on-policy sampler and saving
run on a consolidated copy of the policy (:class:`~gflowgr_core.train.fsdp.PolicyConsolidator`).
See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .data.prepared import PreparedData
from .debug import oom_hint
from .pretrained import LoraSettings, apply_lora, apply_prompt_template
from .train.config import ConfigError, TrainConfig, apply_overrides, from_dict, save_config
from .train.fsdp import PolicyConsolidator, drop_unsaved_optimizer_state
from .train.trainer import Trainer as CoreTrainer, derived_seed

__all__ = ["GFlowGRConfig", "GFlowGRTrainer", "GFlowGRModel", "SplitIndexDataset", "SplitIndexCollator",
           "STATE_FILE", "check_fsdp_plugin", "fsdp_requested"]

log = logging.getLogger("gflowgr")

#: Exact training state written beside the policy folder in every checkpoint.
STATE_FILE = "gflowgr_state.pt"

#: The accelerate launch line of the FSDP2 path, named in error messages.
FSDP_LAUNCH = ("accelerate launch --config_file examples/accelerate_fsdp2.yaml --num_processes N "
               "your_script.py ...")


def fsdp_requested(args: TrainingArguments) -> bool:
    """Whether this run asks for FSDP: ``accelerate launch`` with an FSDP config (it sets
    ``ACCELERATE_USE_FSDP=true``) or the ``fsdp`` / ``fsdp_config`` training arguments."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            or getattr(args, "fsdp_plugin_args", None) is not None)


def check_fsdp_plugin(plugin, model: nn.Module, head: Optional[nn.Module] = None) -> list[str]:
    """Check that accelerate's FSDP ``plugin`` can shard ``model`` for the GFlowGR loss; return the decoder
    layer classes it will wrap.

    The loss reads the LM head's SID rows inside the root unit's forward, so FSDP2 must wrap the decoder layers
    (by class name) and nothing that holds the head. Raises :class:`ConfigError` saying what to change in the
    accelerate config otherwise.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    version = int(getattr(plugin, "fsdp_version", 1) or 1)
    if version != 2:
        raise ConfigError(f"GFlowGRTrainer shards with FSDP2, the accelerate config asks for fsdp_version: "
                          f"{version}: set `fsdp_version: 2` under fsdp_config (examples/accelerate_fsdp2.yaml)")
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        raise ConfigError("fsdp_cpu_ram_efficient_loading: true moves the model of every rank but the first to the "
                          "meta device, but each rank builds its own policy (SID tables, flow heads) and keeps "
                          "references to it: set `fsdp_cpu_ram_efficient_loading: false` in the accelerate config")
    wrap = plugin.auto_wrap_policy
    wrap = getattr(wrap, "func", wrap)
    if wrap is not transformer_auto_wrap_policy:
        name = getattr(wrap, "__name__", repr(wrap))
        raise ConfigError(f"the accelerate config wraps with {name}; GFlowGRTrainer needs "
                          f"`fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` (a size-based or absent policy may "
                          f"put the LM head into a unit that is not gathered when the loss reads its SID rows)")
    classes = {type(m).__name__: m for m in model.modules()}
    default = [n for n in (getattr(model, "_no_split_modules", None) or ()) if n in classes]
    names = list(plugin.transformer_cls_names_to_wrap or default)
    hint = (f"set `fsdp_transformer_layer_cls_to_wrap: {','.join(default)}` in the accelerate config" if default
            else "set `fsdp_transformer_layer_cls_to_wrap` in the accelerate config to the class of the model's "
                 "decoder layers")
    if not names:
        raise ConfigError(f"FSDP found no decoder layer class to wrap: the accelerate config names none and the "
                          f"model lists none in `_no_split_modules`: {hint}")
    missing = [n for n in names if n not in classes]
    if missing:
        raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {missing}, which this model does not contain: "
                          f"{hint}")
    if head is not None:
        holders = sorted({n for n in names if any(m is head for m in classes[n].modules())})
        if holders:
            raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {holders}, which holds the LM head: the "
                              f"loss reads the head's SID rows in the root unit, so wrap only the decoder layers: "
                              f"{hint}")
    return names


@dataclass
class GFlowGRConfig(TrainingArguments):
    """Training arguments of :class:`GFlowGRTrainer`: Hugging Face's plus the GFlowGR method's.

    Optimisation settings are Hugging Face's own (``learning_rate``, ``per_device_train_batch_size``,
    ``max_steps``, ``warmup_steps``, ``max_grad_norm``, ``weight_decay``, ``bf16``, ...). The fields below
    choose the stage and the method; any other key of :class:`gflowgr_core.train.config.TrainConfig` is set
    with ``gflowgr_overrides=["gfn.reward.r_pos=10", ...]`` (unknown keys raise ``ConfigError``).
    """

    data_dir: Optional[str] = field(default=None, metadata={"help": "folder written by `gflowgr prepare`"})
    stage: str = field(default="gflowgr", metadata={"help": "sft | gflowgr | sft_continue | dpo | sdpo"})
    init_checkpoint: Optional[str] = field(default=None, metadata={"help": "SIDPolicy folder to start from "
                                                                           "(required by every stage but sft)"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "local HF checkpoint folder (sft stage)"})
    prompt_template: Optional[str] = field(default=None, metadata={
        "help": "text around the history for pretrained LMs, e.g. 'A user bought: {history} Next:'"})
    objective: str = field(default="tb", metadata={"help": "tb | db | subtb"})
    lambda_gfn: float = field(default=1.0, metadata={"help": "weight of the GFlowNet loss next to the CE"})
    subtb_lambda: float = field(default=0.9, metadata={"help": "SubTB(lambda) sub-trajectory weight"})
    n_aug: int = field(default=3, metadata={"help": "augmented trajectories per example"})
    gfn_sampler: str = field(default="cm_curriculum", metadata={
        "help": "logs | random | cm_curriculum | onpolicy | mixture"})
    policy_support: str = field(default="trie", metadata={"help": "trie | level | vocab"})
    flow_lr: float = field(default=1e-2, metadata={"help": "learning rate of the log Z / log F heads"})
    max_train_examples: Optional[int] = field(default=None, metadata={"help": "fixed seeded subset of the "
                                                                                "training rows"})
    eval_max_users: Optional[int] = field(default=None, metadata={"help": "validate on a fixed subset of users"})
    eval_beams: int = field(default=20, metadata={"help": "beam width of the validation beam search"})
    kernel_backend: str = field(default="auto", metadata={"help": "auto | torch | triton | cpp | cuda"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains every weight"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           metadata={"help": "linear layers that get LoRA adapters"})
    gflowgr_overrides: list[str] = field(default_factory=list, metadata={
        "help": "extra TrainConfig settings as key=value (e.g. gfn.reward.r_pos=10)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "batches are split indices: keep them"})

    def __post_init__(self):
        super().__post_init__()
        if not self.data_dir:
            raise ConfigError("GFlowGRConfig.data_dir is not set: give the folder written by `gflowgr prepare`")
        if self.lora_r < 0:
            raise ConfigError(f"GFlowGRConfig.lora_r={self.lora_r} must be >= 0 (0 disables LoRA)")
        if self.per_device_train_batch_size < 1:
            raise ConfigError(f"per_device_train_batch_size={self.per_device_train_batch_size} must be >= 1")

    def lora_settings(self) -> Optional[LoraSettings]:
        """The LoRA settings, or ``None`` when ``lora_r == 0``."""
        if self.lora_r == 0:
            return None
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            target_modules=tuple(self.lora_target_modules))

    def to_train_config(self) -> TrainConfig:
        """The library :class:`TrainConfig` these arguments describe (validated)."""
        raw = {
            "stage": self.stage, "data": str(self.data_dir), "out": str(self.output_dir),
            "init_checkpoint": self.init_checkpoint, "seed": int(self.seed),
            "device": "cpu" if self.use_cpu else "auto", "backend": self.kernel_backend,
            "batch_size": int(self.per_device_train_batch_size), "lr": float(self.learning_rate),
            "weight_decay": float(self.weight_decay), "warmup_steps": int(self.warmup_steps),
            "grad_clip": float(self.max_grad_norm or 0.0),
            "max_steps": int(self.max_steps) if self.max_steps and self.max_steps > 0 else None,
            "epochs": max(1, math.ceil(self.num_train_epochs)), "max_train_examples": self.max_train_examples,
            "valid_max_users": self.eval_max_users, "eval_beams": int(self.eval_beams),
            "eval_batch_size": int(self.per_device_eval_batch_size),
            "model": {"pretrained": self.pretrained},
            "gfn": {"objective": self.objective, "lambda_gfn": float(self.lambda_gfn),
                    "subtb_lambda": float(self.subtb_lambda), "n_aug": int(self.n_aug),
                    "sampler": self.gfn_sampler, "policy_support": self.policy_support,
                    "flow_lr": float(self.flow_lr)},
        }
        raw = apply_overrides(raw, list(self.gflowgr_overrides))
        return from_dict(TrainConfig, raw, "GFlowGRConfig").validate()


class SplitIndexDataset(torch.utils.data.Dataset):
    """Rows of a prepared split as a dataset: item ``i`` is ``{"index": index[i]}``.

    Args:
        index: ``LongTensor[N]`` row numbers of the split (e.g. ``Trainer.train_index``).
        num_rows: size of the split, to check that every index lies in ``[0, num_rows)``.
    """

    def __init__(self, index: torch.Tensor, num_rows: int):
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"split index must be an integer tensor [N], got {index.dtype} {tuple(index.shape)}")
        bad = (index < 0) | (index >= num_rows)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0])
            raise IndexError(f"split index entry {pos} is {int(index[pos])}, outside [0, {num_rows})")
        self.index = index.long().cpu()
        self.num_rows = int(num_rows)

    def __len__(self) -> int:
        return int(self.index.numel())

    def __getitem__(self, i: int) -> dict:
        return {"index": int(self.index[i])}


@dataclass
class SplitIndexCollator:
    """Stacks ``{"index": int}`` features into ``{"index": LongTensor[B]}``, checking each feature.

    Args:
        num_rows: size of the split the indices point into.
    """

    num_rows: int

    def __call__(self, features: Sequence[dict]) -> dict:
        if len(features) == 0:
            raise ValueError("empty batch: the collator received no features")
        values = []
        for pos, feature in enumerate(features):
            if not isinstance(feature, dict) or "index" not in feature:
                raise ValueError(f"batch feature {pos} is {feature!r}; expected a dict with key 'index'")
            value = feature["index"]
            if isinstance(value, torch.Tensor):
                value = value.item() if value.numel() == 1 else value
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"batch feature {pos}: index {value!r} is not an integer split row")
            if not 0 <= value < self.num_rows:
                raise IndexError(f"batch feature {pos}: split row {value} is outside [0, {self.num_rows})")
            values.append(value)
        return {"index": torch.tensor(values, dtype=torch.long)}


class GFlowGRModel(nn.Module):
    """The module Hugging Face's trainer optimises: the policy (the reward has no parameters).

    ``forward(index[B])`` returns ``{"loss": scalar, "logs": dict}`` from the library trainer's
    ``compute_loss``; a DDP wrapper around this module therefore sees every parameter the loss touches.
    """

    def __init__(self, core: CoreTrainer):
        super().__init__()
        self.policy = core.policy
        self.__dict__["core"] = core  # not a module: only its policy holds parameters
        # accelerate's FSDP wraps the classes a model lists here when its config names none: the LM's decoder
        # layers (the LM head stays in the root unit, whose forward computes the loss).
        self._no_split_modules = list(getattr(core.policy.model, "_no_split_modules", None) or ())

    def forward(self, index: torch.Tensor, step: Optional[int] = None) -> dict:
        # The split tensors live on the CPU; the library trainer moves the gathered rows to the device.
        # ``step`` is Hugging Face's global step: the library's own counter does not advance here.
        loss, logs = self.core.compute_loss(index.detach().cpu(), step=step)
        return {"loss": loss, "logs": logs}


class GFlowGRTrainer(Trainer):
    """Hugging Face ``Trainer`` running a GFlowGR stage (``sft``, ``gflowgr``, ``dpo``, ...).

    Args:
        args: :class:`GFlowGRConfig`.
        data: an already loaded :class:`PreparedData` (else loaded from ``args.data_dir``).
        callbacks, optimizers: as for ``transformers.Trainer``.

    Attributes:
        core: the library :class:`~gflowgr_core.train.trainer.Trainer` holding policy, trie, sampler and reward.
        policy: ``core.policy`` (with LoRA adapters when ``args.lora_r > 0``).
        last_logs: the values of the most recent training step (``loss``, ``ce``, ``gfn``, reward summary...).
        loss_backend: kernel backend the GFlowNet loss ran on in the last step (``None`` before any step).
        fsdp_consolidator: under accelerate's FSDP2 plugin, the
            :class:`~gflowgr_core.train.fsdp.PolicyConsolidator` that evaluation, the on-policy sampler and
            saving read whole weights from; ``None`` otherwise.

    FSDP2 (``accelerate launch --config_file examples/accelerate_fsdp2.yaml ...``): each rank trains on its own
    rows, as under DDP; accelerate shards :class:`GFlowGRModel` (decoder layers as units, the rest in the root).
    A configuration that cannot work (no distributed launch, ``fsdp_version`` 1, a layer class the model lacks,
    a wrap policy other than ``TRANSFORMER_BASED_WRAP``) raises :class:`ConfigError` naming the setting.
    """

    def __init__(self, args: GFlowGRConfig, data: Optional[PreparedData] = None, callbacks=None,
                 optimizers=(None, None), **kwargs):
        if not isinstance(args, GFlowGRConfig):
            raise TypeError(f"args must be a GFlowGRConfig, got {type(args).__name__}")
        train_config = args.to_train_config()
        if train_config.distributed == "fsdp":
            # The library trainer would shard the policy itself, under the Trainer's own DDP wrapping.
            raise ConfigError("gflowgr_overrides distributed=fsdp shards the model in the library trainer, which "
                              "GFlowGRTrainer cannot drive: train with `torchrun ... -m gflowgr_core.cli train ... "
                              "distributed=fsdp` (docs/distributed.md), or drop the override for DDP here")
        if fsdp_requested(args) and args.world_size < 2:
            raise ConfigError(f"FSDP shards the model over the processes of a distributed launch, but this process "
                              f"runs alone (world size {args.world_size}): launch with `{FSDP_LAUNCH}` (N >= 2), or "
                              f"drop the FSDP config (ACCELERATE_USE_FSDP / fsdp / fsdp_config) to train in one "
                              f"process")
        core = CoreTrainer(train_config, data)
        # Under Hugging Face's DDP every rank trains on its own rows with its own library trainer, whose
        # generator would be seeded alike on every rank: the random augmentations would repeat across ranks.
        # Rank 0 keeps ``seed`` (a single process is unchanged); rank r draws from its own seed.
        self.sampler_rank = int(args.process_index)
        if self.sampler_rank:
            core.generator.manual_seed(derived_seed(int(args.seed), self.sampler_rank, "sampler_rank"))
        if args.prompt_template is not None:
            if core.policy.tokenizer is None:
                raise ValueError("prompt_template needs a policy with a tokenizer (a pretrained LM); the policy "
                                 "was built from scratch over SID tokens only")
            apply_prompt_template(core.policy, core.policy.tokenizer, args.prompt_template)
        lora = args.lora_settings()
        if lora is not None:
            apply_lora(core.policy, lora)
        self.core = core
        self.fsdp_consolidator: Optional[PolicyConsolidator] = None
        if fsdp_requested(args):
            # Taken now, while the policy is whole: accelerate shards it when training starts. The library trainer
            # reads whole weights for beam-search evaluation and on-policy sampling through ``core.fsdp``.
            self.fsdp_consolidator = PolicyConsolidator(core.policy)
            core.fsdp = self.fsdp_consolidator
        self.last_logs: dict = {}
        self.loss_backend: Optional[str] = None
        self._pending: dict[str, list[float]] = {}
        split = core.data.split
        train = SplitIndexDataset(core.train_index, len(split.train))
        valid = SplitIndexDataset(torch.arange(len(split.valid)), len(split.valid))
        super().__init__(model=GFlowGRModel(core), args=args, train_dataset=train, eval_dataset=valid,
                         data_collator=SplitIndexCollator(len(split.train)), callbacks=callbacks,
                         optimizers=optimizers, **kwargs)
        if self.fsdp_consolidator is not None:
            if not self.is_fsdp_enabled:
                raise ConfigError(f"FSDP was requested but accelerate runs {self.accelerator.distributed_type} "
                                  f"without its FSDP plugin: launch with `{FSDP_LAUNCH}`")
            layers = check_fsdp_plugin(self.accelerator.state.fsdp_plugin, self.model,
                                       head=core.policy.model.get_output_embeddings())
            log.info("GFlowGRTrainer: FSDP2 over %d ranks, wrapping %s", args.world_size, ", ".join(layers))

    @property
    def policy(self):
        return self.core.policy

    def create_accelerator_and_postprocess(self):
        """Hugging Face's accelerator, with accelerate's FSDP plugin attached on CPU process groups too.

        accelerate 1.16 attaches the plugin only when the processes use accelerators (``MULTI_GPU`` and kin); on
        CPUs (gloo) it silently trains without sharding. FSDP2 itself runs on gloo, so the plugin the launch
        asked for is attached here: the same accelerate config then shards on CPUs (how the tests run it).
        """
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType

        state = self.accelerator.state
        if fsdp_requested(self.args) and not self.is_fsdp_enabled and state.distributed_type == DistributedType.MULTI_CPU:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin_args = self.args.fsdp_plugin_args
            plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args is not None else \
                FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
            if self.accelerator.mixed_precision != "no":
                plugin.set_mixed_precision(self.accelerator.mixed_precision)
            state.fsdp_plugin = plugin
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    @contextlib.contextmanager
    def _whole_policy(self):
        """The policy with whole weights: under FSDP a consolidated copy (every rank must enter), else itself."""
        if self.fsdp_consolidator is None:
            yield self.core.policy
            return
        with self.fsdp_consolidator.consolidated() as plain:
            yield plain

    # ---------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The library's stage loss on the batch's split rows (the sampler follows training progress)."""
        sampler = self.core.sampler
        if sampler is not None and hasattr(sampler, "set_progress") and self.state.max_steps:
            sampler.set_progress(min(1.0, self.state.global_step / max(1, self.state.max_steps - 1)))
        outputs = model(index=inputs["index"], step=self.state.global_step)
        logs = outputs["logs"]
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"non-finite loss {logs['loss']} at step {self.state.global_step} on split rows "
                                     f"{inputs['index'][:8].tolist()}... ({logs})")
        self.last_logs = logs
        if "backend" in logs:
            self.loss_backend = logs["backend"]
        if model.training:
            for key, value in logs.items():
                if isinstance(value, (int, float)) and key != "loss":
                    self._pending.setdefault(key, []).append(float(value))
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, *args, **kwargs):
        """Hugging Face's step (forward, backward); an out-of-memory error names the batch size to try."""
        with oom_hint(len(inputs["index"]), "GFlowGRTrainer training step", "per_device_train_batch_size",
                      self.core.stage.trajectories):
            return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """Adds the means of the stage's values (ce, gfn, log_z, reward/...) since the last log."""
        if self._pending and "loss" in logs:
            for key, values in self._pending.items():
                logs[key] = sum(values) / len(values)
            self._pending = {}
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        """Hugging Face's optimizer with separate groups for the log Z head (``gfn.log_z_lr``, default
        ``flow_lr``) and the log F head (``flow_lr``)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        gfn = self.core.cfg.gfn
        z_ids = {id(p) for p in self.core.policy.log_z_head.parameters()}
        f_ids = {id(p) for p in self.core.policy.log_f_head.parameters()}
        flow_ids = z_ids | f_ids
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if id(p) not in flow_ids and n in decay],
             "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if id(p) not in flow_ids and n not in decay], "weight_decay": 0.0},
            {"params": [p for n, p in named if id(p) in z_ids], "weight_decay": 0.0,
             "lr": gfn.flow_lr if gfn.log_z_lr is None else gfn.log_z_lr},
            {"params": [p for n, p in named if id(p) in f_ids], "weight_decay": 0.0, "lr": gfn.flow_lr},
        ]
        groups = [g for g in groups if g["params"]]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if any(k in kwargs for k in ("params", "model", "optimizer_dict")) or not isinstance(cls, type):
            log.warning("optimizer %s builds its own parameter groups: the flow heads use learning_rate, "
                        "not flow_lr", self.args.optim)
            return super().create_optimizer(model)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    # ---------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Trie-constrained beam search on the validation split: ``{prefix}_recall@10``, ``_ndcg@10``, ...

        ``eval_dataset`` may be a :class:`SplitIndexDataset` over validation rows; by default the whole
        validation split (or ``eval_max_users`` of it, a fixed seeded subset).
        """
        core = self.core
        if eval_dataset is None:
            metrics = core.evaluate("valid", self.args.eval_max_users)
        else:
            if not isinstance(eval_dataset, SplitIndexDataset):
                raise TypeError(f"eval_dataset must be a SplitIndexDataset of validation rows, got "
                                f"{type(eval_dataset).__name__}")
            from .evaluation import evaluate_policy

            with self._whole_policy() as policy:
                metrics = evaluate_policy(policy, core.data, "valid", index=eval_dataset.index,
                                          beams=core.cfg.eval_beams, batch_size=core.cfg.eval_batch_size,
                                          device=core.device, backend=core.cfg.backend, item_key=core.item_key)
        self.model.train()
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---------------------------------------------------------------------------- saving / resuming
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Hugging Face's ``save_model``; under FSDP every rank gathers the whole policy once and the main process
        writes the same folder as without FSDP (a plain HF model folder in ``lm/``, see :meth:`_save`)."""
        if self.fsdp_consolidator is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        with self.fsdp_consolidator.consolidated() as plain:
            if self.args.should_save:
                # The keys GFlowGRModel.state_dict() has without FSDP, so either run resumes from either.
                self._write(output_dir, plain, {f"policy.{k}": v for k, v in plain.state_dict().items()})
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """Write the policy folder, the run config and the exact training state into ``output_dir``."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        if self.fsdp_consolidator is not None:
            raise RuntimeError("under FSDP the policy is sharded: save with save_model(), which every rank calls")
        self._write(output_dir, self.core.policy, self.model.state_dict())

    def _write(self, output_dir: Path, policy, model_state: dict) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        core = self.core
        policy.save(output_dir)
        save_config(core.cfg, output_dir / "config.yaml")
        state = {"model": model_state, "generator": core.generator.get_state()}
        if core.sampler is not None:
            state["sampler"] = core.sampler.state_dict()
        torch.save(state, output_dir / STATE_FILE)
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {resume_from_checkpoint} is not a checkpoint written by "
                                    f"GFlowGRTrainer")
        state = torch.load(path, map_location="cpu", weights_only=True)
        target = self.model if model is None else model
        from torch.distributed.fsdp import FSDPModule

        if isinstance(target, FSDPModule):
            # Sharded by accelerate: every rank keeps its shard of each whole tensor in the file.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            try:
                set_model_state_dict(target, state["model"], options=StateDictOptions(full_state_dict=True))
            except (RuntimeError, KeyError) as exc:
                raise ValueError(f"{path} does not match this model (LoRA or model settings differ?): {exc}") from exc
        else:
            missing, unexpected = target.load_state_dict(state["model"], strict=False)
            if missing or unexpected:
                raise ValueError(f"{path} does not match this model (LoRA or model settings differ?): missing "
                                 f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        self.core.generator.set_state(state["generator"])
        if self.sampler_rank:
            # The checkpoint holds rank 0's generator (only the main process saves): every other rank
            # continues from a stream derived from it and its rank, so ranks still draw differently.
            base = int(torch.randint(0, 2 ** 62, (1,), generator=self.core.generator))
            self.core.generator.manual_seed(derived_seed(base, self.sampler_rank, "sampler_rank"))
        if self.core.sampler is not None and "sampler" in state:
            self.core.sampler.load_state_dict(state["sampler"])

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """Hugging Face's, except for FSDP checkpoints: parameters that never had a gradient (the flow heads under
        SFT, log F under TB) have no optimiser state there, which accelerate's loader refuses. They get none after
        loading either (as in the library trainer's sharded resume), so their first update equals the saving
        run's. ``SHARDED_STATE_DICT`` (``optimizer_0/``): each rank reads its shards; ``FULL_STATE_DICT``
        (``optimizer.bin``): the main process reads the file and FSDP hands every rank its shards."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is None or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        sharded, full = Path(checkpoint) / "optimizer_0", Path(checkpoint) / "optimizer.bin"
        if not sharded.is_dir() and not full.is_file():
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        from transformers.trainer import SCHEDULER_NAME

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper -> torch's
        if sharded.is_dir():
            template = get_optimizer_state_dict(self.model, optimizer)
            saved = set(dcp.FileSystemReader(str(sharded)).read_metadata().state_dict_metadata)
            drop_unsaved_optimizer_state(template, saved)
            state = {"optimizer": template}
            dcp.load(state, checkpoint_id=str(sharded))
            # Not strict only so that the parameters without saved state are allowed to have none.
            set_optimizer_state_dict(self.model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
        else:
            state = torch.load(full, map_location="cpu", weights_only=True) if self.args.process_index == 0 else {}
            set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True, strict=False))
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
