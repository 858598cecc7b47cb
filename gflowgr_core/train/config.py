"""Configuration dataclasses for every training stage, loadable from YAML and overridable from the CLI.

Every [choice] of the method specification is a field here. ``load_config(path, overrides)`` reads a YAML
file and applies ``section.key=value`` overrides; an unknown key raises :class:`ConfigError` naming the key,
where it came from, and the keys that do exist.
"""
from __future__ import annotations

import dataclasses
import json
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
    """A configuration file or override that does not match the config schema."""


@dataclass
class ModelConfig:
    """The causal LM: a small model built from a config (``pretrained=None``) or a local HF checkpoint."""

    arch: str = "qwen2"            # "qwen2" | "llama" when built from scratch
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 256
    pretrained: Optional[str] = None   # local HF checkpoint directory; SID tokens are added to it
    flow_hidden: int = FLOW_HIDDEN  # width of the log Z(U) and log F(prefix) MLP heads


@dataclass
class GFNConfig:
    """The GFlowNet part of stage ``gflowgr`` (METHOD.md §2–4)."""

    objective: str = "tb"          # "tb" | "db" | "subtb"
    lambda_gfn: float = 1.0
    subtb_lambda: float = 0.9
    n_aug: int = 3
    sampler: str = "cm_curriculum"  # "logs" | "random" | "cm_curriculum" | "onpolicy" | "mixture"
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

    beta: float = 0.1
    n_neg: int = 3                 # S-DPO negatives per example (DPO uses the first)
    sampler: str = "random"
    sft_weight: float = 1.0        # the same CE anchor GFlowGR has, so comparisons isolate the objective


@dataclass
class TrainConfig:
    """One training run: a stage, its data, model, optimisation, evaluation and output folder."""

    stage: str = "sft"
    data: str = ""                 # a folder written by `gflowgr prepare`
    out: str = "runs/run"
    init_checkpoint: Optional[str] = None
    seed: int = 42
    device: str = "auto"           # "auto" | "cpu" | "cuda" | "cuda:1" ...
    dtype: str = "float32"         # "float32" | "bfloat16" (autocast on CUDA)
    backend: str = "auto"          # kernel backend for the loss and decoding ops
    epochs: int = 20
    max_steps: Optional[int] = None
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
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
    # page-faulting it back every step (gflowgr_core.devices.retain_freed_cpu_memory); false: the C library's default.
    retain_cpu_memory: bool = True
    max_train_examples: Optional[int] = None   # train on a fixed seeded random subset of N training examples
    eval_every: int = 1            # epochs between validation runs
    eval_beams: int = 20
    eval_batch_size: int = 256
    valid_max_users: Optional[int] = None   # validate on a fixed seeded subset (None = whole split)
    evaluate_test: bool = True     # read the test split once at the end (false: tuning runs never see it)
    patience: int = 3
    select_metric: str = "ndcg@10"
    log_every: int = 20
    resume: bool = False           # continue from out/last/ (model, optimiser, RNG, sampler, epoch position)
    save_every_steps: int = 500    # also write out/last/ every N steps (0 = only at epoch ends and on stop)
    handle_signals: bool = True    # SIGTERM/SIGINT: checkpoint at the next step boundary, then return
    distributed: str = "auto"      # "auto": DDP when launched by torchrun (WORLD_SIZE > 1) | "off"
    model: ModelConfig = field(default_factory=ModelConfig)
    gfn: GFNConfig = field(default_factory=GFNConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    cm: SASRecConfig = field(default_factory=SASRecConfig)

    def validate(self) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r} is not one of {STAGES}")
        if self.stage in ("gflowgr", "sft_continue", "dpo", "sdpo") and not self.init_checkpoint:
            raise ConfigError(f"stage {self.stage!r} starts from an SFT checkpoint: set init_checkpoint")
        choices = {"gfn.objective": (self.gfn.objective, ("tb", "db", "subtb")),
                   "gfn.sampler": (self.gfn.sampler, ("logs", "random", "cm_curriculum", "onpolicy", "mixture")),
                   "gfn.policy_support": (self.gfn.policy_support, ("trie", "level", "vocab")),
                   "gfn.onpolicy_mode": (self.gfn.onpolicy_mode, ("beam", "sample")),
                   "gfn.weighting": (self.gfn.weighting, ("uniform", "reward")),
                   "likelihood_support": (self.likelihood_support, ("trie", "level", "vocab")),
                   "dtype": (self.dtype, ("float32", "bfloat16")),
                   "distributed": (self.distributed, ("auto", "off")),
                   "compile_mode": (self.compile_mode, COMPILE_MODES),
                   "batch_order": (self.batch_order, ("windows", "shuffled")),
                   }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {allowed}")
        if self.gfn.n_aug < 0:
            raise ConfigError(f"gfn.n_aug={self.gfn.n_aug} must be >= 0")
        if self.save_every_steps < 0:
            raise ConfigError(f"save_every_steps={self.save_every_steps} must be >= 0 (0 = off)")
        if self.gfn.onpolicy_temperature <= 0:
            raise ConfigError(f"gfn.onpolicy_temperature={self.gfn.onpolicy_temperature} must be > 0")
        if self.gfn.reward.r_pos_mode == "catalogue" and self.gfn.reward.use_cm and self.gfn.reward.cm_source == "lm":
            raise ConfigError("gfn.reward.r_pos_mode='catalogue' needs the CM score of every item, which "
                              "cm_source='lm' does not give: use cm_source='cm' or r_pos_mode='fixed'")
        if self.pack_row_tokens < 1:
            raise ConfigError(f"pack_row_tokens={self.pack_row_tokens} must be >= 1")
        if self.pack_rows is not None and self.pack_rows < 1:
            raise ConfigError(f"pack_rows={self.pack_rows} must be >= 1 (or null: as many rows as a batch needs)")
        if self.compile_mode != "eager" and not self.packing:
            raise ConfigError(f"compile_mode={self.compile_mode!r} compiles the packed training forward: it needs "
                              f"packing: true")
        if self.batch_order != "windows" and not self.packing:
            raise ConfigError(f"batch_order={self.batch_order!r} orders packed batches: the per-prefix path "
                              f"(packing: false) always shuffles examples")
        if not self.data:
            raise ConfigError("data is empty: set it to a folder written by `gflowgr prepare`")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def from_dict(cls, raw: dict, where: str = "config"):
    """Build dataclass ``cls`` from a nested dict; unknown keys raise :class:`ConfigError` (old
    :class:`TrainConfig` keys are read under their new names, see :data:`RENAMED_KEYS`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    if cls is TrainConfig:
        raw = rename_old_keys(raw, where)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{where}.{key}")
            continue
        kwargs[key] = _convert(value, hint, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass's own validation (e.g. RewardConfig)
        raise ConfigError(f"{where}: {exc}") from None


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


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply CLI overrides."""
    raw: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        where = str(path)
    raw = apply_overrides(raw, overrides or [])
    return from_dict(TrainConfig, raw, where).validate()


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
