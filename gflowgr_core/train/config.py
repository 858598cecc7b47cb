"""Configuration dataclasses for every training stage, loadable from YAML and overridable from the CLI.

Every [choice] of the method specification is a field here; the comment beside a field (or the
``Attributes:`` entry of its class docstring) is its documentation, which ``python -m
gflowgr_core.train.config_doc`` renders into ``docs/config.md``. ``load_config(path, overrides)`` reads a
YAML file and applies ``section.key=value`` overrides; an unknown key raises :class:`ConfigError` naming the
key, where it came from (the file, or the override as typed), the keys that do exist and the closest one;
values that cannot work are refused by :meth:`TrainConfig.validate`, naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from gflowgr_core.collaborative import SASRecConfig
from gflowgr_core.model.policy import FLOW_HIDDEN
from gflowgr_core.reward import RewardConfig

STAGES = ("sft", "gflowgr", "sft_continue", "dpo", "sdpo")
COMPILE_MODES = ("eager", "default", "reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    """A configuration file or override that does not match the config schema.

    ``key`` is the dotted config key at fault when one is (``"batch_size"``, ``"gfn.reward.beta"``), so that
    :func:`load_config` can say whether the file or an override set it.
    """

    def __init__(self, message: str, key: Optional[str] = None, suggestion: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.suggestion = suggestion  # "did you mean `epochs`?" for an unknown key close to a known one


@dataclass
class ModelConfig:
    """The causal LM: a small model built from a config (``pretrained=None``) or a local HF checkpoint."""

    arch: str = "qwen2"            # "qwen2" | "llama" when built from scratch
    hidden: int = 128              # hidden width of the from-scratch LM
    layers: int = 4                # transformer layers of the from-scratch LM
    heads: int = 4                 # attention heads (hidden must be divisible by it)
    kv_heads: int = 4              # key/value heads (grouped-query attention when fewer than heads)
    intermediate: int = 256        # MLP width of the from-scratch LM
    pretrained: Optional[str] = None   # local HF checkpoint directory; SID tokens are added to it
    flow_hidden: int = FLOW_HIDDEN  # width of the log Z(U) and log F(prefix) MLP heads
    # dropout on the token embeddings and every attention / MLP output while training, for any model (from
    # scratch, pretrained or init_checkpoint); a training setting, not saved with the weights
    hidden_dropout: float = 0.0


@dataclass
class GFNConfig:
    """The GFlowNet part of stage ``gflowgr`` (METHOD.md §2–4)."""

    objective: str = "tb"          # balance objective: "tb" (trajectory) | "db" (detailed) | "subtb" (sub-trajectory)
    lambda_gfn: float = 1.0        # weight of the balance loss: loss = CE(positive) + lambda_gfn * balance (>= 0)
    subtb_lambda: float = 0.9      # SubTB's geometric weight of sub-trajectory lengths
    n_aug: int = 3                 # augmented (non-positive) trajectories per training example
    sampler: str = "cm_curriculum"  # augmentation sampler: "logs" | "random" | "cm_curriculum" | "onpolicy" | "mixture"
    # sampler="mixture": the share of each sampler in the augmentations, e.g. {cm_curriculum: 0.5, random: 0.5}
    mixture: dict = field(default_factory=lambda: {"cm_curriculum": 0.5, "random": 0.5})
    policy_support: str = "trie"   # "trie" | "level" | "vocab"
    weighting: str = "uniform"     # "uniform" | "reward" (trajectory weights proportional to R within a set)
    flow_lr: float = 1e-2          # learning rate of the log F head (GFlowNets like it larger)
    log_z_lr: Optional[float] = None   # learning rate of the log Z head (None: flow_lr)
    log_z_init: Optional[float] = None  # start of log Z (None: log of the data's expected reward mass)
    flow_warmup_steps: int = 0     # first steps in which the balance loss trains only the flow heads
    curriculum_start: float = 0.1  # CM-score quantile picked at the start of training (easy items)
    curriculum_end: float = 0.9    # ... and at the end (hard items, close to the user's taste)
    curriculum_pool: int = 100     # CM top-M items in the curriculum pool
    curriculum_random: int = 50    # random items added to the pool
    onpolicy_mode: str = "beam"    # "beam": top beams of the current policy | "sample": ancestral samples
    onpolicy_temperature: float = 1.0  # sampling temperature of onpolicy_mode="sample"
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class PreferenceConfig:
    """DPO / S-DPO baselines: negatives from a sampler, reference = the frozen starting checkpoint."""

    beta: float = 0.1              # DPO temperature beta of the log-ratio margin (> 0)
    n_neg: int = 3                 # S-DPO negatives per example (DPO uses the first); >= 1
    sampler: str = "random"        # sampler of the negatives (the names of gfn.sampler)
    sft_weight: float = 1.0        # the same CE anchor GFlowGR has, so comparisons isolate the objective


@dataclass
class TrainConfig:
    """One training run: a stage, its data, model, optimisation, evaluation and output folder."""

    stage: str = "sft"             # the training stage: "sft" | "gflowgr" | "sft_continue" | "dpo" | "sdpo"
    data: str = ""                 # a folder written by `gflowgr prepare`
    out: str = "runs/run"          # output folder: config.yaml, log, best/ and last/ checkpoints, result.json
    # checkpoint folder to start from (required by every stage but sft); its model replaces the model.* settings
    init_checkpoint: Optional[str] = None
    seed: int = 42                 # seeds model initialisation, batch order and samplers
    device: str = "auto"           # "auto" | "cpu" | "cuda" | "cuda:1" ...
    dtype: str = "float32"         # "float32" | "bfloat16" (autocast on CUDA)
    backend: str = "auto"          # kernel backend for the loss and decoding ops
    epochs: int = 20               # passes over the training examples (>= 1)
    max_steps: Optional[int] = None    # stop after this many optimiser steps (null: epochs decide)
    batch_size: int = 256          # training examples per optimiser step (>= 1)
    lr: float = 1e-3               # peak learning rate of the LM (AdamW; linear warm-up, cosine decay to 10%)
    weight_decay: float = 0.01     # AdamW weight decay
    warmup_steps: int = 100        # steps of linear learning-rate warm-up
    grad_clip: float = 1.0         # max global gradient norm (0: no clipping)
    # Support of the likelihood log P(SID | user) that SFT's cross-entropy, GFlowGR's CE anchor and DPO/S-DPO's
    # log-probs are normalised over: "trie" | "level" | "vocab" (the balance loss has gfn.policy_support).
    likelihood_support: str = "trie"
    packing: bool = True           # one packed forward per batch (shared histories); false: per-prefix prompts
    pack_row_tokens: int = 256     # token capacity of a packed row; longer user windows are cut into segments
    pack_rows: Optional[int] = None    # fixed rows per packed batch (static shapes for CUDA graphs / compile)
    # An epoch's example order with packing: "windows" cuts batches from the trunk windows in random order, each
    # window's examples together, so they share one trunk; "shuffled" draws examples uniformly, as the per-prefix
    # path does (batches then rarely share a trunk: same losses, about twice the tokens on Beauty).
    batch_order: str = "windows"
    # Packed forward computes only what the read states depend on: attention on the 32-token tiles of the mask
    # with a visible pair, the last layer's MLP on read rows only (SIDPolicy.packed_trajectory_hidden); false:
    # the model's own forward over the whole mask (the reference).
    pack_sparse: bool = True
    # torch.compile of the packed training forward: "eager" (none) | "default" | "reduce-overhead" (CUDA graphs;
    # wants pack_rows) | "max-autotune". Eager by default: benchmarks/bench_compile.py measures it.
    compile_mode: str = "eager"
    # On a CPU device (glibc), keep memory freed by tensors in the process rather than returning it to the OS and
    # page-faulting it back every step (gflowgr_core.devices.retain_freed_cpu_memory); false: the C library's default,
    # which keeps distributed: fsdp's per-rank memory saving on a CPU (retained, FSDP's freed buffers pile up).
    retain_cpu_memory: bool = True
    max_train_examples: Optional[int] = None   # train on a fixed seeded random subset of N training examples
    eval_every: int = 1            # epochs between validation runs
    eval_beams: int = 20           # beam width of the trie-constrained beam search at evaluation
    eval_batch_size: int = 256     # users per evaluation batch
    valid_max_users: Optional[int] = None   # validate on a fixed seeded subset (None = whole split)
    evaluate_test: bool = True     # read the test split once at the end (false: tuning runs never see it)
    patience: int = 3              # early stopping: evaluations without a better select_metric
    select_metric: str = "ndcg@10"  # validation metric that picks the best checkpoint (e.g. recall@10, ndcg@20)
    log_every: int = 20            # steps between training log lines
    resume: bool = False           # continue from out/last/ (model, optimiser, RNG, sampler, epoch position)
    save_every_steps: int = 500    # also write out/last/ every N steps (0 = only at epoch ends and on stop)
    handle_signals: bool = True    # SIGTERM/SIGINT: checkpoint at the next step boundary, then return
    # "auto": DDP when launched by torchrun (WORLD_SIZE > 1) | "fsdp": shard the model over the torchrun ranks
    # (FSDP2, docs/distributed.md) | "off"
    distributed: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)   # the causal LM
    gfn: GFNConfig = field(default_factory=GFNConfig)   # stage gflowgr: objective, sampler, reward
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)   # stages dpo / sdpo
    cm: SASRecConfig = field(default_factory=SASRecConfig)   # collaborative model (SASRec) for samplers and r_cm

    def validate(self) -> "TrainConfig":
        """Refuse values that cannot work, raising :class:`ConfigError` naming the key (``error.key``); warn
        about a learning-rate warm-up longer than the run. Returns ``self``."""
        if self.stage in ("gflowgr", "sft_continue", "dpo", "sdpo") and not self.init_checkpoint:
            raise ConfigError(f"stage {self.stage!r} starts from an SFT checkpoint: set init_checkpoint",
                              key="init_checkpoint")
        for key, allowed in CHOICES.items():
            value = _get(self, key)
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {allowed}", key=key)
        for key, low, strict, note in BOUNDS:
            value = _get(self, key)
            if value is None:
                continue
            if not math.isfinite(value) or value < low or (strict and value == low):
                raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} {low}{note}", key=key)
        if self.gfn.reward.r_pos_mode == "catalogue" and self.gfn.reward.use_cm and self.gfn.reward.cm_source == "lm":
            raise ConfigError("gfn.reward.r_pos_mode='catalogue' needs the CM score of every item, which "
                              "cm_source='lm' does not give: use cm_source='cm' or r_pos_mode='fixed'",
                              key="gfn.reward.r_pos_mode")
        if self.compile_mode != "eager" and not self.packing:
            raise ConfigError(f"compile_mode={self.compile_mode!r} compiles the packed training forward: it needs "
                              f"packing: true", key="compile_mode")
        if self.batch_order != "windows" and not self.packing:
            raise ConfigError(f"batch_order={self.batch_order!r} orders packed batches: the per-prefix path "
                              f"(packing: false) always shuffles examples", key="batch_order")
        metrics = select_metric_names()
        if self.select_metric not in metrics:
            close = difflib.get_close_matches(str(self.select_metric).lower(), metrics, n=1, cutoff=0.5)
            raise ConfigError(f"select_metric={self.select_metric!r} is not a validation metric"
                              + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (e.g. {', '.join(m for m in metrics if '/' not in m and '@10' in m)})",
                              key="select_metric")
        if self.model.hidden_dropout >= 1.0:
            raise ConfigError(f"model.hidden_dropout={self.model.hidden_dropout!r} must be < 1 (1 drops every "
                              f"activation)", key="model.hidden_dropout")
        if not self.data:
            raise ConfigError("data is empty: set it to a folder written by `gflowgr prepare`", key="data")
        _warn_long_warmup(self)
        return self

    def to_dict(self) -> dict:
        """The config as nested plain dicts (what ``config.yaml`` and ``--print-config`` hold)."""
        return dataclasses.asdict(self)


#: Keys with a fixed set of values (``docs/config.md`` lists them too).
CHOICES: dict[str, tuple] = {
    "stage": STAGES,
    "gfn.objective": ("tb", "db", "subtb"),
    "gfn.sampler": ("logs", "random", "cm_curriculum", "onpolicy", "mixture"),
    "gfn.policy_support": ("trie", "level", "vocab"),
    "gfn.onpolicy_mode": ("beam", "sample"),
    "gfn.weighting": ("uniform", "reward"),
    "likelihood_support": ("trie", "level", "vocab"),
    "dtype": ("float32", "bfloat16"),
    "distributed": ("auto", "off", "fsdp"),
    "compile_mode": COMPILE_MODES,
    "batch_order": ("windows", "shuffled"),
}

#: ``(key, lower bound, strict, note)``: numeric keys refused below (or, when strict, at) their bound
#: (``docs/config.md`` states them).
BOUNDS: tuple = (
    ("epochs", 1, False, ""),
    ("max_steps", 1, False, " (null: the epochs decide)"),
    ("batch_size", 1, False, ""),
    ("lr", 0.0, False, ""),
    ("weight_decay", 0.0, False, ""),
    ("warmup_steps", 0, False, ""),
    ("grad_clip", 0.0, False, " (0: no clipping)"),
    ("pack_row_tokens", 1, False, ""),
    ("pack_rows", 1, False, " (or null: as many rows as a batch needs)"),
    ("max_train_examples", 1, False, " (or null: every training example)"),
    ("eval_every", 1, False, " (epochs between validation runs)"),
    ("eval_beams", 1, False, ""),
    ("eval_batch_size", 1, False, ""),
    ("valid_max_users", 1, False, " (or null: the whole split)"),
    ("patience", 0, False, ""),
    ("log_every", 1, False, ""),
    ("save_every_steps", 0, False, " (0 = off)"),
    ("model.flow_hidden", 1, False, ""),
    ("model.hidden_dropout", 0.0, False, ""),
    ("gfn.lambda_gfn", 0.0, False, " (the weight of the balance loss)"),
    ("gfn.n_aug", 0, False, ""),
    ("gfn.flow_lr", 0.0, False, ""),
    ("gfn.log_z_lr", 0.0, False, ""),
    ("gfn.flow_warmup_steps", 0, False, ""),
    ("gfn.onpolicy_temperature", 0.0, True, ""),
    ("pref.beta", 0.0, True, " (the DPO temperature)"),
    ("pref.n_neg", 1, False, " (0 negatives would turn S-DPO into plain cross-entropy)"),
    ("pref.sft_weight", 0.0, False, ""),
)


def _get(config, key: str):
    """The value of dotted ``key`` in a config dataclass."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


@functools.lru_cache(maxsize=1)
def select_metric_names() -> tuple[str, ...]:
    """Every key of the validation metrics dict that ``select_metric`` can name (``ndcg@10``, ``recall@20``,
    ``renorm/ndcg@10``, ...), read from the evaluation code itself so that the list cannot go stale."""
    import torch

    from gflowgr_core.metrics import AGREEMENT_KEY, EVAL_KS, SCORINGS, evaluate_rankings

    width = max(EVAL_KS)
    ranked = torch.arange(width)[None, :]
    keys = evaluate_rankings(ranked, torch.zeros(1, dtype=torch.long), torch.ones(width), ks=EVAL_KS,
                             item_key=torch.arange(width), sid_ranked=ranked)
    return tuple([prefix + k for prefix, _ in SCORINGS for k in keys if k != "num_examples"] + [AGREEMENT_KEY])


def check_device(config: "TrainConfig") -> None:
    """Refuse a ``device`` this machine does not have (``device=cuda`` without CUDA) with a one-line
    :class:`ConfigError`. Not part of :meth:`TrainConfig.validate`: a saved config is still readable (and its
    checkpoint evaluable) on another machine; ``load_config(..., device_check=True)`` applies it to a run."""
    import torch

    name = config.device
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device={name!r} is not a device name; use auto, cpu, cuda or cuda:N",
                          key="device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use device=cpu or device=auto", key="device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)",
                              key="device")


_WARNED_WARMUPS: set = set()


def _warn_long_warmup(cfg: "TrainConfig") -> None:
    """Warn when the learning-rate warm-up is longer than the run (known from max_steps, or from the prepared
    data's training examples when its stats.json is readable)."""
    steps, how = cfg.max_steps, "max_steps"
    if steps is None:
        stats = Path(cfg.data) / "stats.json"
        try:
            examples = int(json.loads(stats.read_text())["num_train_examples"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if cfg.max_train_examples is not None:
            examples = min(examples, cfg.max_train_examples)
        steps = cfg.epochs * math.ceil(examples / cfg.batch_size)
        how = f"{cfg.epochs} epoch(s) of {math.ceil(examples / cfg.batch_size)} steps"
    if cfg.warmup_steps > steps and (cfg.warmup_steps, steps, cfg.lr, cfg.data) not in _WARNED_WARMUPS:
        _WARNED_WARMUPS.add((cfg.warmup_steps, steps, cfg.lr, cfg.data))  # load_config, then Trainer: say it once
        warnings.warn(f"warmup_steps={cfg.warmup_steps} is longer than the run ({steps} steps: {how}): the learning "
                      f"rate never reaches lr={cfg.lr}", UserWarning, stacklevel=3)


#: ``ModelConfig`` field -> attribute of a transformers config (HF maps its aliases, e.g. GPT-2's ``n_embd``).
_HF_MODEL_ATTRIBUTES = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                        "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size"}


def checkpoint_model_config(policy, configured: ModelConfig, checkpoint: str) -> ModelConfig:
    """The :class:`ModelConfig` of the model an ``init_checkpoint`` holds, which replaces ``model.*``.

    A run that starts from a checkpoint trains the checkpoint's model whatever ``model.*`` says; this warns
    once, naming every ``model.*`` key that was set (differs from its default) and differs from the
    checkpoint, and returns the checkpoint's settings so that the run's ``config.yaml`` records the model
    actually trained. ``model.pretrained`` becomes null: the weights come from the checkpoint.

    Args:
        policy: the loaded policy (a ``SIDPolicy``: ``.model.config`` and ``.flow_hidden``).
        configured: ``config.model`` as loaded.
        checkpoint: the ``init_checkpoint`` path (named in the warning).
    """
    lm = policy.model.config
    values = {"arch": getattr(lm, "model_type", configured.arch), "pretrained": None,
              "flow_hidden": int(policy.flow_hidden), "hidden_dropout": configured.hidden_dropout}
    for name, attribute in _HF_MODEL_ATTRIBUTES.items():
        value = getattr(lm, attribute, None)
        if name == "kv_heads" and value is None:  # no grouped-query attention: as many as heads
            value = getattr(lm, "num_attention_heads", None)
        values[name] = int(value) if isinstance(value, int) else getattr(configured, name)
    actual = ModelConfig(**values)
    default = ModelConfig()
    ignored = [f"model.{f.name}={getattr(configured, f.name)!r} (checkpoint: {getattr(actual, f.name)!r})"
               for f in dataclasses.fields(ModelConfig)
               if getattr(configured, f.name) != getattr(actual, f.name)
               and getattr(configured, f.name) != getattr(default, f.name)]
    if ignored:
        warnings.warn(f"init_checkpoint={checkpoint} holds its own model, so these settings are not used: "
                      f"{', '.join(ignored)}; the run's config.yaml records the checkpoint's model",
                      UserWarning, stacklevel=2)
    return actual


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. PyYAML's 1.1 rules read on/off/yes/no as booleans too, which
    turned ``distributed: off`` into ``False`` (boolean fields still accept those words, see :func:`_convert`)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def read_yaml(text: str) -> Any:
    """Parse a config text (a file or one override's value) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, with an error naming the field."""
    origin = get_origin(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in get_args(hint) if a is not type(None)][0]
        return _convert(value, inner, where)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if hint is tuple or origin is tuple:
            return tuple(value)
        if hint is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


#: Old top-level keys of :class:`TrainConfig` that are still read, mapped to their new names.
RENAMED_KEYS = {"sft_support": "likelihood_support"}


def rename_old_keys(raw: dict, where: str = "config") -> dict:
    """``raw`` (a :class:`TrainConfig` mapping) with the old keys of :data:`RENAMED_KEYS` under their new
    names, warning once per key; both spellings at once raise :class:`ConfigError`."""
    if not any(old in raw for old in RENAMED_KEYS):
        return raw
    raw = dict(raw)
    for old, new in RENAMED_KEYS.items():
        if old not in raw:
            continue
        if new in raw:
            raise ConfigError(f"{where}: both {old!r} and {new!r} are set; {old!r} is the old name of {new!r}, "
                              f"keep only {new!r}")
        warnings.warn(f"{where}: config key {old!r} is now {new!r} (it also sets the support of DPO/S-DPO's "
                      f"log-probs); read as {new}={raw[old]!r}", FutureWarning, stacklevel=3)
        raw[new] = raw.pop(old)
    return raw


def _suggest(key: str, names, section: str) -> str:
    """``"did you mean `gfn.n_aug`?"`` for the closest known key, or an empty string."""
    close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
    return f"did you mean `{section}{close[0]}`?" if close else ""


def from_dict(cls, raw: dict, where: str = "config", section: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys raise :class:`ConfigError` naming the keys that
    exist and the closest one (old :class:`TrainConfig` keys are read under their new names, see
    :data:`RENAMED_KEYS`). ``section`` is the dotted prefix of ``cls`` inside the whole config (``"gfn."``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}", key=section.rstrip(".") or None)
    if cls is TrainConfig:
        raw = rename_old_keys(raw, where)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            hint = _suggest(key, names, section)
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names))}"
                              + (f"; {hint}" if hint else ""), key=f"{section}{key}", suggestion=hint)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{where}.{key}", f"{section}{key}.")
            continue
        kwargs[key] = _convert(value, hint, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own validation (e.g. RewardConfig)
        raise ConfigError(f"{where}: {exc}", key=section.rstrip(".") or None) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) onto a nested dict, returning a new dict."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. gfn.n_aug=5)")
        key, text = item.split("=", 1)
        value = read_yaml(text) if text != "" else ""
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


def _override_key(item: str) -> str:
    key = item.split("=", 1)[0].strip()
    return RENAMED_KEYS.get(key, key)


def _origin(key: Optional[str], overrides: list[str], raw_file: dict, path: Optional[Path]) -> str:
    """Who set ``key``: ``"override `k=v`: "`` (the last override touching it), ``"FILE: "`` or ``""``."""
    if key is None:
        return ""
    for item in reversed(overrides):
        set_key = _override_key(item)
        if set_key == key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return f"override `{item}`: "
    node: Any = rename_old_keys(raw_file, "config") if isinstance(raw_file, dict) else raw_file
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return f"{path}: " if path is not None else ""


def _check_override(item: str) -> None:
    """The key of one ``key=value`` override exists and its value reads as the field's type (ConfigError)."""
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    parts[0] = RENAMED_KEYS.get(parts[0], parts[0])
    cls, where, section = TrainConfig, "config", ""
    for depth, part in enumerate(parts):
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            hint = _suggest(part, names, section)
            raise ConfigError(f"{where}: unknown key {part!r}; known keys: {', '.join(sorted(names))}"
                              + (f"; {hint}" if hint else ""), key=section + part, suggestion=hint)
        last = depth == len(parts) - 1
        if dataclasses.is_dataclass(hints[part]):
            cls, where, section = hints[part], f"{where}.{part}", f"{section}{part}."
            if last:
                value = read_yaml(text) if text != "" else ""
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from_dict(cls, value or {}, where, section)
            continue
        if hints[part] is dict:  # a free-form mapping (gfn.mixture): its own keys are not checked here
            return
        if not last:
            raise ConfigError(f"{where}.{part} is a value, not a section with key {parts[depth + 1]!r}",
                              key=section + part)
        _convert(read_yaml(text) if text != "" else "", hints[part], f"{where}.{part}")


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None, *,
                device_check: bool = False) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None), apply CLI overrides and validate.

    Errors name their origin: a key or value of the file names the file; one of an override names the
    override as typed (``override `epoch=1`: config: unknown key 'epoch'; ...; did you mean `epochs`?``); a
    value refused by :meth:`TrainConfig.validate` names whichever set it. ``device_check`` also refuses a
    ``device`` this machine lacks (what ``gflowgr train`` does; a saved config stays readable anywhere).
    """
    raw_file: dict = {}
    where = "config"
    overrides = list(overrides or [])
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw_file = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        where = str(path)
        with warnings.catch_warnings():  # renamed keys warn once, below
            warnings.simplefilter("ignore", FutureWarning)
            from_dict(TrainConfig, raw_file, where)  # the file's own keys and values, named by the file
    raw = raw_file
    for item in overrides:  # the key and value of each override alone, so that an error names it
        raw = apply_overrides(raw, [item])
        try:
            _check_override(item)
        except ConfigError as exc:
            lead = f"unknown key {exc.key.rsplit('.', 1)[-1]!r}; {exc.suggestion} (" if exc.suggestion else ""
            detail = str(exc).removesuffix(f"; {exc.suggestion}") if lead else str(exc)
            raise ConfigError(f"override `{item}`: {lead}{detail}{')' if lead else ''}", key=exc.key) from None
    try:
        config = from_dict(TrainConfig, raw, where)
        config.validate()
        if device_check:
            check_device(config)
    except ConfigError as exc:
        origin = _origin(exc.key, overrides, raw_file, path if isinstance(path, Path) else None)
        raise ConfigError(f"{origin}{exc}", key=exc.key) from None
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (keys in field order), readable again by :func:`load_config`."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
