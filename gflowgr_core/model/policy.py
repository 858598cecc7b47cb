"""A GFlowNet policy around a Hugging Face causal LM that speaks semantic-ID (SID) tokens.

The prompt of a user is ``[BOS] + SID tokens of each history item + [SEP]``; the LM then emits the next
item's SID one level at a time. Decision position ``0`` is the ``SEP`` position (it chooses ``c_1``) and
decision position ``l`` (``1 <= l < L``) is the position of token ``c_l`` (it chooses ``c_{l+1}``).

On top of the LM this module adds the two flow heads of the GFlowNet (METHOD.md §2):
``log Z(U)`` is a small MLP on the hidden state at the last prompt position, and ``log F(s_l)`` a small MLP
on the hidden state at the position of the prefix's last code. Only the LM-head rows of the SID tokens are
ever multiplied with hidden states here: full-vocabulary logits are never formed on the GFlowNet path.

Batches are left-padded; every forward passes explicit ``position_ids = cumsum(mask) - 1`` so the amount
of padding does not shift the positions a user's tokens see.
"""
from __future__ import annotations

import inspect
import json
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sid.tokens import SIDTokenMap
from .adapters import merged_copy

__all__ = ["FLOW_HIDDEN", "PromptState", "FlowHead", "SIDPolicy", "build_tiny_causal_lm"]

_FORMAT_VERSION = 1
_META_FILE = "policy.json"
_HEADS_FILE = "flow_heads.pt"
_CODES_FILE = "item_codes.pt"
_TOKENS_FILE = "sid_tokens.json"
_LM_DIR = "lm"

#: Default width of the log Z(U) and log F(prefix) MLPs, the one every constructor and config uses.
FLOW_HIDDEN = 128

# Largest relative difference between the packed and the per-prompt forward that rounding alone explains, by
# the dtype the LM computes in (see SIDPolicy.check_packing). A model that mishandles the packed masks differs
# by 0.18 to 0.67 on the check's batch; bf16 rounding gives 3e-3 (tiny models) to 1.7e-2 (pretrained ones).
PACKING_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def packing_tolerance(dtype: torch.dtype) -> float:
    """:data:`PACKING_TOLERANCE` of ``dtype`` (``5e-2`` for another floating dtype of 16 bits or fewer)."""
    if dtype in PACKING_TOLERANCE:
        return PACKING_TOLERANCE[dtype]
    return 5e-2 if torch.finfo(dtype).bits <= 16 else 1e-3


def _master_dtype(model_kwargs: dict) -> dict:
    """``from_pretrained`` keyword arguments with ``dtype=torch.float32`` unless a dtype is given: transformers
    5 loads a checkpoint in its stored dtype, and a bf16 policy would train without fp32 master weights."""
    if "dtype" in model_kwargs or "torch_dtype" in model_kwargs:
        return dict(model_kwargs)
    return {**model_kwargs, "dtype": torch.float32}


# Config attributes of HF models whose logits are not a plain linear map of the last hidden state; the
# SID-row shortcut would silently compute the wrong distribution for them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def build_tiny_causal_lm(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                         kv_heads: int | None = None, intermediate: int | None = None,
                         max_positions: int = 256, arch: str = "qwen2", seed: int = 0,
                         tie_embeddings: bool = False, dropout: float = 0.0,
                         attn_implementation: str = "sdpa", pad_token_id: int = 0,
                         bos_token_id: int = 1, eos_token_id: int = 2):
    """A small randomly initialised causal LM to train from scratch on SID tokens (TIGER-sized).

    With the defaults and Beauty's vocabulary (4 specials + 4 x 256 SID tokens) it has about 1.3M
    parameters. The global RNG state is left untouched: initialisation uses its own seeded stream.

    Args:
        vocab_size: number of token ids (``SIDTokenMap.vocab_size``).
        hidden: model width ``d``.
        layers: number of decoder layers.
        heads: attention heads; must divide ``hidden``.
        kv_heads: key/value heads (grouped-query attention); default ``heads``. Must divide ``heads``.
        intermediate: MLP width; default ``4 * hidden``.
        max_positions: longest sequence (prompt plus SID) the rotary tables are sized for.
        arch: ``"qwen2"`` or ``"llama"``.
        seed: initialisation seed.
        tie_embeddings: share the input embedding with the LM head.
        dropout: attention dropout probability.
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        pad_token_id, bos_token_id, eos_token_id: recorded in the config.
    Returns:
        A ``transformers`` ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` on the CPU, in float32.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kv_heads = heads if kv_heads is None else kv_heads
    intermediate = 4 * hidden if intermediate is None else intermediate
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if hidden % heads != 0:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    if heads % kv_heads != 0:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads}")
    if (hidden // heads) % 2 != 0:
        raise ValueError(f"head dimension hidden/heads = {hidden // heads} must be even for rotary embeddings")
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                  attention_dropout=dropout, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id)
    if arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "llama":
        config = LlamaConfig(**common)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'qwen2' or 'llama'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model


@dataclass
class PromptState:
    """What decoding needs after a prompt forward.

    Attributes:
        last_hidden: ``[R, d]`` hidden state at the most recent position of each row (after the prompt:
            the ``SEP`` position, i.e. decision position 0).
        cache: the HF key/value cache (``transformers`` ``Cache``); rows are batch rows. It is mutated in
            place by :meth:`SIDPolicy.extend`, :meth:`SIDPolicy.expand_state` and
            :meth:`SIDPolicy.reorder_state`, so a state should be used by one decoding loop only.
        attention_mask: ``LongTensor[R, S]``, ``1`` for real tokens (left padding is ``0``), ``S`` the
            cache length.
        next_position: ``LongTensor[R]``, the position id the next appended token takes.
    """

    last_hidden: torch.Tensor
    cache: object
    attention_mask: torch.Tensor
    next_position: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.last_hidden.shape[0])


class FlowHead(nn.Module):
    """MLP ``d -> hidden -> 1`` giving one log-flow per hidden state.

    The last layer starts at zero weight with bias ``init``, so every flow starts at ``init`` and the LM's
    behaviour is unchanged at the first step of fine-tuning.
    """

    def __init__(self, d: int, hidden: int = FLOW_HIDDEN, init: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, float(init))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h[..., d]`` → log-flow ``[...]`` in the head's dtype (fp32 master weights: fp32).

        Autocast is off inside the head: under a bf16 autocast the LM's hidden states arrive in bf16 and are
        cast up, so ``log Z`` / ``log F`` (which enter the balance residuals next to sums of log-probs and
        ``log R``) are computed and returned in fp32, not rounded to bf16's 8 bits of mantissa.
        """
        off = (torch.autocast(device_type=h.device.type, enabled=False)
               if torch.amp.is_autocast_available(h.device.type) else nullcontext())
        with off:
            return self.net(h.to(self.net[0].weight.dtype)).squeeze(-1)


def _contiguous_range(ids: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` when ``ids`` is exactly ``start, start+1, ..., stop-1``, else ``None``."""
    if ids.numel() == 0:
        return None
    start = int(ids[0])
    if torch.equal(ids.cpu(), torch.arange(start, start + ids.numel())):
        return start, start + ids.numel()
    return None


class SIDPolicy(nn.Module):
    """Forward policy ``P_F`` and flow heads around a causal LM over SID tokens.

    Args:
        model: any ``transformers`` causal LM (``AutoModelForCausalLM``) whose vocabulary holds every id of
            ``token_map`` and whose logits are a linear map (LM head) of the final hidden state.
        token_map: the :class:`~gflowgr_core.sid.tokens.SIDTokenMap` of the model's vocabulary.
        item_codes: ``LongTensor[n_items, L]``, the SID of every internal item (``Catalog.codes``); history
            item ``i`` is written with the tokens of ``item_codes[i]``.
        codes_per_level: ``(K_0, ..., K_{L-1})``; default ``token_map.codes_per_level`` (must agree).
        flow_hidden: width of the ``log Z`` and ``log F`` MLPs.
        log_z_init, log_f_init: initial values of the two flows.

    Attributes:
        model: the wrapped LM; ``backbone`` its decoder (``model.base_model``), ``lm_head`` its output layer.
        log_z_head, log_f_head: the :class:`FlowHead` modules.
        item_codes: buffer ``[n_items, L]``; ``item_tokens``: their token ids.
    """

    def __init__(self, model: nn.Module, token_map: SIDTokenMap, item_codes: torch.Tensor,
                 codes_per_level: Sequence[int] | None = None, *, flow_hidden: int = FLOW_HIDDEN,
                 log_z_init: float = 0.0, log_f_init: float = 0.0):
        super().__init__()
        cpl = tuple(token_map.codes_per_level) if codes_per_level is None else tuple(int(k) for k in codes_per_level)
        if cpl != tuple(token_map.codes_per_level):
            raise ValueError(f"codes_per_level {cpl} disagrees with the token map's {token_map.codes_per_level}")
        item_codes = torch.as_tensor(item_codes)
        if item_codes.dtype.is_floating_point or item_codes.dim() != 2 or item_codes.shape[1] != len(cpl):
            raise ValueError(f"item_codes must be an integer tensor [n_items, {len(cpl)}], got "
                             f"{item_codes.dtype} {tuple(item_codes.shape)}")
        item_codes = item_codes.long().cpu()
        k = torch.tensor(cpl)
        bad = (item_codes < 0) | (item_codes >= k)
        if bool(bad.any()):
            item, level = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"item {item} has code {int(item_codes[item, level])} at level {level}, outside "
                             f"[0, {cpl[level]})")
        config = model.config
        for attr in _LOGIT_TRANSFORMS:
            value = getattr(config, attr, None)
            if value is not None and value != 1 and value != 1.0:
                raise NotImplementedError(f"model config has {attr}={value}: its logits are not a plain linear "
                                          f"head of the last hidden state, which SIDPolicy relies on")
        lm_head = model.get_output_embeddings()
        if lm_head is None or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
            raise ValueError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < token_map.vocab_size or lm_head.weight.shape[0] < token_map.vocab_size:
            raise ValueError(f"model has {rows} input rows / {lm_head.weight.shape[0]} head rows but the token "
                             f"map needs {token_map.vocab_size}; call token_map.resize(model) first")

        self.model = model
        self.token_map = token_map
        self.codes_per_level = cpl
        self.flow_hidden = int(flow_hidden)
        d = int(config.hidden_size)
        self.hidden_size = d
        self.log_z_head = FlowHead(d, flow_hidden, log_z_init)
        self.log_f_head = FlowHead(d, flow_hidden, log_f_init)

        self.register_buffer("item_codes", item_codes, persistent=False)
        self.register_buffer("item_tokens", token_map.encode(item_codes), persistent=False)
        self.register_buffer("sid_token_ids", token_map.sid_token_ids.clone(), persistent=False)
        # [L, K_max] code -> token table (-1 beyond K_l) for one-gather token lookup at any level.
        k_max = max(cpl)
        table = torch.full((len(cpl), k_max), -1, dtype=torch.long)
        for level, ids in enumerate(token_map.level_token_ids):
            table[level, : ids.numel()] = ids
        self.register_buffer("level_tokens", table, persistent=False)
        self._code_offsets = token_map.code_offsets
        # SID rows are usually one contiguous block of the head: a slice is a view (no copy per call).
        self._sid_range = _contiguous_range(token_map.sid_token_ids)
        self._level_ranges = [_contiguous_range(ids) for ids in token_map.level_token_ids]
        forward_params = inspect.signature(self.backbone.forward).parameters
        # transformers renamed the forward's cache argument from past_key_values to cache.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self.tokenizer = None
        # Optional text around the history SIDs (pretrained LMs read "A user bought: ... Next:" better).
        self.register_buffer("prompt_prefix", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_suffix", torch.zeros(0, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ basic properties
    @property
    def backbone(self) -> nn.Module:
        """The decoder stack whose ``last_hidden_state`` feeds the LM head."""
        return self.model.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def num_levels(self) -> int:
        return len(self.codes_per_level)

    @property
    def num_items(self) -> int:
        return int(self.item_codes.shape[0])

    @property
    def device(self) -> torch.device:
        return self.item_tokens.device

    def set_log_z_init(self, value: float) -> None:
        """Make the ``log Z`` head output ``value`` for every prompt (zero last layer, bias ``value``)."""
        last = self.log_z_head.net[2]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(float(value))

    def lm_parameters(self):
        """Parameters of the wrapped LM (for an optimizer group)."""
        return self.model.parameters()

    def flow_parameters(self):
        """Parameters of the ``log Z`` and ``log F`` heads (GFlowNet practice gives them a larger LR)."""
        return list(self.log_z_head.parameters()) + list(self.log_f_head.parameters())

    # ------------------------------------------------------------------ LM head rows
    def full_head_weight(self) -> torch.Tensor:
        """The whole LM-head weight ``[V, d]`` (only for the ``policy_support="vocab"`` ablation)."""
        return self.lm_head.weight

    def sid_head_weight(self) -> torch.Tensor:
        """``W_sid[sum K_l, d]``: the LM-head rows of the SID tokens, level-major; keeps the gradient.

        A view of the head weight when the SID tokens are one contiguous id block, a gather otherwise.
        """
        w = self.lm_head.weight
        if self._sid_range is not None:
            return w[self._sid_range[0]:self._sid_range[1]]
        return w.index_select(0, self.sid_token_ids)

    def head_bias(self) -> torch.Tensor | None:
        """Bias ``[sum K_l]`` of the SID rows of the LM head, or ``None`` when the head has no bias."""
        bias = getattr(self.lm_head, "bias", None)
        if bias is None:
            return None
        if self._sid_range is not None:
            return bias[self._sid_range[0]:self._sid_range[1]]
        return bias.index_select(0, self.sid_token_ids)

    def level_head_weight(self, level: int) -> torch.Tensor:
        """``W_level[K_level, d]``: the LM-head rows of level ``level``'s codes, in code order."""
        self._check_level(level)
        w = self.lm_head.weight
        rng = self._level_ranges[level]
        if rng is not None:
            return w[rng[0]:rng[1]]
        lo, hi = self._code_offsets[level], self._code_offsets[level + 1]
        return w.index_select(0, self.sid_token_ids[lo:hi])

    def level_head_bias(self, level: int) -> torch.Tensor | None:
        """Bias ``[K_level]`` of level ``level``'s rows, or ``None``."""
        self._check_level(level)
        bias = getattr(self.lm_head, "bias", None)
        if bias is None:
            return None
        lo, hi = self._code_offsets[level], self._code_offsets[level + 1]
        return bias.index_select(0, self.sid_token_ids[lo:hi])

    def sid_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """Logits of level ``level``'s codes only: ``h[..., d] @ W_level^T (+ bias)`` → ``[..., K_level]``."""
        return F.linear(h, self.level_head_weight(level).to(h.dtype), self._maybe(self.level_head_bias(level), h))

    @staticmethod
    def _maybe(bias, h):
        return None if bias is None else bias.to(h.dtype)

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level {level} outside [0, {self.num_levels})")

    def set_prompt_template(self, prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = ()) -> None:
        """Put fixed token ids around the history: ``[BOS] + prefix + history SIDs + suffix + [SEP]``.

        Both default to empty (the plain SID prompt). Ids must lie in ``[0, vocab_size)`` and must not be
        SID tokens (a SID token in the template would read as a history item). Saved by :meth:`save`.
        :func:`gflowgr_core.pretrained.apply_prompt_template` builds them from text with the tokenizer.
        """
        parts = []
        for name, ids in (("prefix", prefix_ids), ("suffix", suffix_ids)):
            ids = torch.as_tensor(list(ids), dtype=torch.long).reshape(-1).cpu()
            bad = (ids < 0) | (ids >= self.token_map.vocab_size)
            if bool(bad.any()):
                pos = int(bad.nonzero()[0])
                raise ValueError(f"prompt {name} token {pos} has id {int(ids[pos])}, outside the vocabulary "
                                 f"[0, {self.token_map.vocab_size})")
            sid = self.token_map.level_of_token[ids.clamp(0, self.token_map.vocab_size - 1)] >= 0
            if bool(sid.any()):
                pos = int(sid.nonzero()[0])
                raise ValueError(f"prompt {name} token {pos} (id {int(ids[pos])}) is a SID token; the template "
                                 f"must be plain text")
            parts.append(ids.to(self.device))
        self.prompt_prefix, self.prompt_suffix = parts

    # ------------------------------------------------------------------ LM forwards
    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signatures without the config argument
            return DynamicCache()

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache) -> torch.Tensor:
        """Backbone forward appending ``input_ids[R, S]`` to ``cache``; returns hidden ``[R, S, d]``."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **{self._cache_kwarg: cache})
        return out.last_hidden_state

    def _check_history(self, history: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(history as long on the device, most real items in a row)``; raises naming a bad row/column."""
        history = torch.as_tensor(history, device=self.device)
        if history.dim() != 2 or history.dtype.is_floating_point or history.dtype == torch.bool:
            raise ValueError(f"history must be an integer tensor [B, H], got {history.dtype} "
                             f"{tuple(history.shape)}")
        if history.shape[0] == 0:
            raise ValueError("history has no rows")
        history = history.long()
        bad = (history < -1) | (history >= self.num_items)
        # One host sync per prompt: validation and the prompt width together.
        bad_any, max_valid = torch.stack([bad.any().long(), (history >= 0).sum(1).max()]).tolist()
        if bad_any:
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"history row {row}, column {col}: item id {int(history[row, col])} is outside "
                             f"[-1, {self.num_items}) (-1 is padding)")
        return history, int(max_valid)

    def build_prompt(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids of ``[BOS] + prefix + history SIDs + suffix + [SEP]`` per row, left-padded.

        ``prefix`` and ``suffix`` are the fixed template ids of :meth:`set_prompt_template` (empty by default).

        Args:
            history: ``LongTensor[B, H]`` of internal item ids, ``-1`` = no item (padding may sit anywhere;
                the real items keep their order).
        Returns:
            ``(input_ids[B, P], attention_mask[B, P], position_ids[B, P])`` with
            ``P = 2 + n_prefix + n_suffix + L * max_b n_b``, ``n_b`` the number of real items of row ``b``;
            padding is on the left.
        Raises:
            ValueError naming the row and column of an id outside ``[-1, n_items)``.
        """
        history, max_valid = self._check_history(history)
        B, H = history.shape
        L = self.num_levels
        valid = history >= 0
        n_valid = valid.sum(1)
        tok = self.item_tokens[history.clamp_min(0)].reshape(B, H * L)
        n_fixed = self.prompt_prefix.numel() + self.prompt_suffix.numel()
        ones = torch.ones(B, 1, dtype=torch.bool, device=self.device)
        seq = torch.cat([torch.full((B, 1), self.token_map.bos_id, device=self.device),
                         self.prompt_prefix.expand(B, -1), tok, self.prompt_suffix.expand(B, -1),
                         torch.full((B, 1), self.token_map.sep_id, device=self.device)], dim=1)
        keep = torch.cat([ones.expand(B, 1 + self.prompt_prefix.numel()), valid.repeat_interleave(L, dim=1),
                          ones.expand(B, 1 + self.prompt_suffix.numel())], dim=1)
        width = 2 + n_fixed + L * int(max_valid)
        n_kept = 2 + n_fixed + L * n_valid
        kept_from_here = keep.flip(1).cumsum(1).flip(1)
        # Kept tokens go right-aligned in order; dropped ones into a junk column that is cut off.
        dest = torch.where(keep, width - kept_from_here, torch.full_like(kept_from_here, width))
        ids = torch.full((B, width + 1), self.token_map.pad_id, dtype=torch.long, device=self.device)
        ids.scatter_(1, dest, seq)
        ids = ids[:, :width]
        mask = (torch.arange(width, device=self.device) >= (width - n_kept)[:, None]).long()
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        return ids, mask, positions

    def encode_prompt(self, history: torch.Tensor) -> PromptState:
        """Run the prompt of every row once, keeping the KV cache.

        Args:
            history: ``LongTensor[B, H]`` item ids, left-padded with ``-1``.
        Returns:
            :class:`PromptState` with ``last_hidden[B, d]`` at the ``SEP`` position (decision position 0),
            the cache, ``attention_mask[B, P]`` and ``next_position[B]``.
        """
        ids, mask, positions = self.build_prompt(history)
        cache = self._new_cache()
        hidden = self._forward(ids, mask, positions, cache)
        return PromptState(last_hidden=hidden[:, -1], cache=cache, attention_mask=mask,
                           next_position=positions[:, -1] + 1)

    def extend(self, state: PromptState, tokens: torch.Tensor) -> tuple[torch.Tensor, PromptState]:
        """Append ``tokens[R, S]`` to every row of ``state``.

        Returns:
            ``(hidden[R, S, d], new_state)``; ``state.cache`` is updated in place and shared by both.
        """
        R, S = tokens.shape
        if R != state.batch_size:
            raise ValueError(f"tokens have {R} rows, the state has {state.batch_size}")
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(R, S)], dim=1)
        positions = state.next_position[:, None] + torch.arange(S, device=tokens.device)
        hidden = self._forward(tokens, mask, positions, state.cache)
        return hidden, PromptState(last_hidden=hidden[:, -1], cache=state.cache, attention_mask=mask,
                                   next_position=state.next_position + S)

    def extend_codes(self, state: PromptState, codes: torch.Tensor, level: int) -> PromptState:
        """Append the level-``level`` SID token of ``codes[R]`` (``-1`` allowed for dead rows: they get code
        0's token, and their outputs are meaningless). Returns the new state (``last_hidden[R, d]``)."""
        self._check_level(level)
        tokens = self.level_tokens[level, codes.clamp(0, self.codes_per_level[level] - 1)]
        return self.extend(state, tokens[:, None])[1]

    @staticmethod
    def expand_state(state: PromptState, n: int) -> PromptState:
        """Repeat every row ``n`` times (row ``b`` becomes rows ``b*n .. b*n+n-1``); cache updated in place."""
        state.cache.batch_repeat_interleave(n)
        return PromptState(last_hidden=state.last_hidden.repeat_interleave(n, dim=0), cache=state.cache,
                           attention_mask=state.attention_mask.repeat_interleave(n, dim=0),
                           next_position=state.next_position.repeat_interleave(n, dim=0))

    @staticmethod
    def reorder_state(state: PromptState, index: torch.Tensor) -> PromptState:
        """Keep rows ``index[R']`` of the state (beam reordering); cache updated in place."""
        state.cache.reorder_cache(index)
        return replace(state, last_hidden=state.last_hidden.index_select(0, index),
                       attention_mask=state.attention_mask.index_select(0, index),
                       next_position=state.next_position.index_select(0, index))

    def extend_beam_tree(self, state: PromptState, codes: torch.Tensor, level: int,
                         visible: torch.Tensor) -> torch.Tensor:
        """Append ``M`` level-``level`` SID tokens to every prompt row at once, as one tree of beams.

        Beam decoding without copies of the prompt: each row's cache keeps a single copy of its prompt, and the
        beams' code tokens are appended side by side; a 4D mask lets token ``j`` see the prompt and its own
        ancestors only, and every token of a level takes the position that level has in the per-beam prompt
        ``[prompt] + c_1..c_level``, so each hidden state equals the one of that beam's own sequence.

        Args:
            state: the :meth:`encode_prompt` state, its cache extended only by earlier calls of this method.
            codes: ``LongTensor[R, M]`` codes (``-1`` for dead beams: code 0's token, outputs meaningless).
            level: the level of the codes (``0 <= level < L-1``).
            visible: ``BoolTensor[R, M, S + M]``, ``S`` the cache length before the call: which cached columns
                and which of the new tokens each new token attends to (itself included).
        Returns:
            ``hidden[R, M, d]``; ``state.cache`` grows by ``M`` columns in place.
        Raises:
            PackingUnsupported when the model's attention implementation takes no 4D mask.
        """
        from .packing import attention_mask_for

        self._check_level(level)
        tokens = self.level_tokens[level, codes.clamp(0, self.codes_per_level[level] - 1)]
        positions = (state.next_position + level)[:, None].expand_as(tokens)
        mask = attention_mask_for(self.model, visible, next(self.backbone.parameters()).dtype)
        return self._forward(tokens, mask, positions, state.cache)

    # ------------------------------------------------------------------ GFlowNet path
    def trajectory_hidden(self, history: torch.Tensor, codes: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states at every decision position of ``T`` trajectories per user, and the flows.

        The prompt runs once per user; its KV cache is repeated to the ``B*T`` trajectories, then a single
        forward covers the ``L-1`` code tokens ``c_1..c_{L-1}`` of every trajectory.

        Args:
            history: ``LongTensor[B, H]`` item ids, left-padded with ``-1``.
            codes: ``LongTensor[B, T, L]`` SID codes of the trajectories (``T`` per user).
        Returns:
            ``h[B, T, L, d]`` (``h[:, :, 0]`` is the ``SEP`` state shared by a user's trajectories),
            ``log_z[B]`` = log Z(U), ``log_f[B, T, L-1]`` = log F(s_1)..log F(s_{L-1}).
        """
        history, codes = self._check_trajectories(history, codes)
        B, T, L = codes.shape
        state = self.encode_prompt(history)
        root = state.last_hidden
        log_z = self.log_z_head(root)
        d = root.shape[-1]
        first = root[:, None, None, :].expand(B, T, 1, d)
        if L == 1:
            return first.contiguous(), log_z, root.new_zeros(B, T, 0, dtype=log_z.dtype)
        state = self.expand_state(state, T)
        levels = torch.arange(L - 1, device=self.device)
        tokens = self.level_tokens[levels, codes[:, :, : L - 1]].reshape(B * T, L - 1)
        hidden, _ = self.extend(state, tokens)
        hidden = hidden.reshape(B, T, L - 1, d)
        h = torch.cat([first, hidden], dim=2)
        log_f = self.log_f_head(hidden)
        return h, log_z, log_f

    def _check_trajectories(self, history: torch.Tensor, codes: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.as_tensor(codes, device=self.device)
        L = self.num_levels
        if codes.dim() != 3 or codes.shape[2] != L or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer tensor [B, T, {L}], got {codes.dtype} {tuple(codes.shape)}")
        history = torch.as_tensor(history, device=self.device)
        if history.dim() != 2 or codes.shape[0] != history.shape[0]:
            raise ValueError(f"codes {tuple(codes.shape)} and history {tuple(history.shape)} disagree on B")
        codes = codes.long()
        if codes.shape[1] == 0:
            raise ValueError("codes has no trajectories (T = 0)")
        bad = (codes < 0) | (codes >= torch.tensor(self.codes_per_level, device=self.device))
        if bool(bad.any()):
            b, t, level = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"trajectory codes[{b}, {t}] has code {int(codes[b, t, level])} at level {level}, "
                             f"outside [0, {self.codes_per_level[level]})")
        history, _ = self._check_history(history)
        return history, codes

    def packed_trajectory_hidden(self, history: torch.Tensor, codes: torch.Tensor,
                                 window: torch.Tensor | None = None, *, row_tokens: int = 256,
                                 rows: int | None = None, sparse: bool = True
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`trajectory_hidden` computed from one packed forward (:mod:`gflowgr_core.model.packing`).

        Examples with equal ``window`` ids share one encoding of their common history (each history must be a
        prefix of the window's longest); every hidden state equals the per-prefix one up to float rounding.

        Args:
            history, codes: as for :meth:`trajectory_hidden`.
            window: ``LongTensor[B]`` trunk-window ids (:func:`gflowgr_core.data.windows.trunk_windows`), or
                ``None`` (no sharing: the batch is still packed without padding).
            row_tokens, rows: row capacity and an optional fixed row count (static shapes).
            sparse: compute only what the read states depend on: attention on the tiles of the mask that hold a
                visible pair (:mod:`~gflowgr_core.model.block_attention`) and, in a Qwen2 or Llama decoder, the
                last layer's MLP on the read rows only (:mod:`~gflowgr_core.model.read_rows`). ``False``: the
                model's own forward over the whole 4D mask (the reference). The compiled forward
                (:meth:`compile_packed_forward`) always runs the reference: a block plan's shapes change with
                every batch.
        Returns:
            ``(h[B, T, L, d], log_z[B], log_f[B, T, L-1])`` as :meth:`trajectory_hidden`.
        Raises:
            PackingUnsupported on the dense path when the model's attention implementation takes no 4D mask.
        """
        from .block_attention import block_plan, use_block_sparse
        from .packing import attention_mask_for
        from .read_rows import last_mlp, mlp_on_read_rows

        history, codes = self._check_trajectories(history, codes)
        B, T, L = codes.shape
        layout = self.packed_layout(history, codes, window, row_tokens=row_tokens, rows=rows)
        dtype = next(self.backbone.parameters()).dtype
        backbone = self.__dict__.get("_compiled_backbone")
        inputs = dict(input_ids=layout.input_ids, position_ids=layout.position_ids, use_cache=False)
        if backbone is not None or not sparse:
            mask = attention_mask_for(self.model, layout.allowed, dtype)
            out = (self.backbone if backbone is None else backbone)(attention_mask=mask, **inputs)
        else:
            # The CPU's fused kernel reads an additive mask without converting it again in every call. The 4D
            # boolean mask only tells the decoder that the mask is prepared; the plan replaces it.
            plan = block_plan(layout.allowed, additive_dtype=dtype if layout.allowed.device.type == "cpu" else None)
            mlp = last_mlp(self.model)
            read = torch.cat([layout.sep_index, layout.branch_index.reshape(-1)])
            with use_block_sparse(self.model), (nullcontext() if mlp is None else mlp_on_read_rows(mlp, read)):
                out = self.backbone(attention_mask=layout.allowed[:, None], block_plan=plan, **inputs)
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        root = flat.index_select(0, layout.sep_index)
        log_z = self.log_z_head(root)
        first = root[:, None, None, :].expand(B, T, 1, root.shape[-1])
        if L == 1:
            return first.contiguous(), log_z, root.new_zeros(B, T, 0, dtype=log_z.dtype)
        branch = flat.index_select(0, layout.branch_index.reshape(-1)).view(B, T, L - 1, -1)
        return torch.cat([first, branch], dim=2), log_z, self.log_f_head(branch)

    def packed_layout(self, history: torch.Tensor, codes: torch.Tensor, window: torch.Tensor | None = None, *,
                      row_tokens: int = 256, rows: int | None = None):
        """The :class:`~gflowgr_core.model.packing.PackedLayout` that :meth:`packed_trajectory_hidden` feeds the
        decoder: this policy's tokens and template around ``history[B, H]`` and ``codes[B, T, L]``."""
        from .packing import pack_trajectories

        return pack_trajectories(history, codes, item_tokens=self.item_tokens, level_tokens=self.level_tokens,
                                 bos_id=self.token_map.bos_id, sep_id=self.token_map.sep_id,
                                 pad_id=self.token_map.pad_id, prefix=self.prompt_prefix, suffix=self.prompt_suffix,
                                 window=window, row_tokens=row_tokens, rows=rows)

    def compile_packed_forward(self, mode: str = "default") -> None:
        """Run the decoder of :meth:`packed_trajectory_hidden` under ``torch.compile(mode=mode)``.

        Only the packed training forward is compiled: decoding and the per-prefix path keep the eager decoder,
        whose shapes change with every call. The compiled wrapper shares the decoder's parameters and stays out
        of the state dict, of copies and of pickles. A new row count recompiles once, after which that dimension
        is dynamic; ``mode="reduce-overhead"`` (CUDA graphs) pays only at a fixed row count (``rows``).

        Args:
            mode: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``), or
                ``"eager"`` / ``None`` to go back to the eager decoder.
        """
        if mode in (None, "eager"):
            self.__dict__.pop("_compiled_backbone", None)
            return
        self.__dict__["_compiled_backbone"] = torch.compile(self.backbone, mode=mode)

    @property
    def packed_forward_compiled(self) -> bool:
        """Whether :meth:`compile_packed_forward` is in effect."""
        return "_compiled_backbone" in self.__dict__

    def __getstate__(self) -> dict:
        # The compiled wrapper is bound to this instance's decoder: a copy runs eagerly until compiled itself.
        state = dict(self.__dict__)
        state.pop("_compiled_backbone", None)
        return state

    def compute_dtype(self) -> torch.dtype:
        """The dtype the LM computes in here: its weights' floating dtype, or a lower autocast dtype in effect
        on its device."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        device_type = self.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            cast = torch.get_autocast_dtype(device_type)
            if torch.finfo(cast).bits < torch.finfo(dtype).bits:
                dtype = cast
        return dtype

    @torch.no_grad()
    def check_packing(self, tolerance: float | None = None, sparse: bool = True) -> None:
        """Check on a tiny batch that this model's packed forward (``sparse`` as in
        :meth:`packed_trajectory_hidden`) equals its per-prefix forward.

        A model that ignores 4D attention masks, explicit position ids or the block-sparse attention it is
        given would silently train on other prompts than it is evaluated on. Such a model differs by tens of
        percent (relative to the largest hidden value); rounding differs by far less, by the dtype it computes
        in (:meth:`compute_dtype`): about ``1e-7`` in fp32, ``3e-3`` to ``2e-2`` in bf16 (packed and per-prompt
        forwards sum attention in other orders). ``tolerance`` defaults to the rounding bound of that dtype
        (:data:`PACKING_TOLERANCE`: fp32 ``1e-3``, fp16 ``1e-2``, bf16 ``5e-2``). Train from fp32 weights
        (:meth:`from_pretrained` loads them so) and let ``dtype: bfloat16`` autocast; the check then runs in fp32.

        Raises:
            PackingUnsupported naming the model class and the difference: beyond the dtype's rounding bound,
            mask handling (with the ``packing: false`` remedy); within it but above a smaller ``tolerance``
            given here, rounding (with the fp32-weights remedy).
        """
        from .packing import PackingUnsupported

        dtype = self.compute_dtype()
        rounding = packing_tolerance(dtype)
        tol = rounding if tolerance is None else float(tolerance)
        if not tol >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        n = min(self.num_items, 3)
        history = torch.tensor([[-1, -1, 0], [-1, 0, n - 1], [0, n - 1, n // 2]], device=self.device)
        codes = self.item_codes[torch.tensor([[n - 1, 0], [0, n // 2], [n // 2, 0]])].to(self.device)
        window = torch.zeros(3, dtype=torch.long, device=self.device)
        was_training = self.training
        self.eval()
        try:
            ref, _, _ = self.trajectory_hidden(history, codes)
            packed, _, _ = self.packed_trajectory_hidden(history, codes, window, sparse=sparse)
        finally:
            self.train(was_training)
        err = float((packed.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
        if err <= tol:
            return
        name = type(self.model).__name__
        what = (f"{name} gives other hidden states in a packed forward than per prompt: relative difference "
                f"{err:.3g} computing in {dtype}, above the tolerance {tol:.3g}")
        if err <= rounding:
            raise PackingUnsupported(
                f"{what}, but within what {dtype} rounding gives (up to {rounding:.3g}): this is rounding, not "
                f"mask handling. Load the weights in float32 (the default of SIDPolicy.from_pretrained / "
                f"load_pretrained_policy; dtype: bfloat16 autocasts the forward) or pass a tolerance of at least "
                f"{rounding:.3g}")
        raise PackingUnsupported(
            f"{what} and beyond {dtype} rounding (up to {rounding:.3g}): the model does not honour 4D attention "
            f"masks, explicit position ids or the block-sparse attention; train it with packing: false")

    def encode_trajectories(self, trajectories, *, packing: bool = False, row_tokens: int = 256,
                            rows: int | None = None, sparse: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states and flows of :class:`~gflowgr_core.trajectories.Trajectories` after each example's
        prompt: :meth:`packed_trajectory_hidden` (sharing the examples' windows) when ``packing``, else
        :meth:`trajectory_hidden`.

        Returns:
            ``(h[B, T, L, d], log_z[B], log_f[B, T, L-1])``.
        """
        if packing:
            return self.packed_trajectory_hidden(trajectories.history, trajectories.codes, trajectories.window,
                                                 row_tokens=row_tokens, rows=rows, sparse=sparse)
        return self.trajectory_hidden(trajectories.history, trajectories.codes)

    def forward(self, history: torch.Tensor, codes: torch.Tensor, window: torch.Tensor | None = None,
                packing: bool = False):
        """:meth:`packed_trajectory_hidden` when ``packing``, else :meth:`trajectory_hidden` (so wrappers such
        as DDP see a forward)."""
        if packing:
            return self.packed_trajectory_hidden(history, codes, window)
        return self.trajectory_hidden(history, codes)

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_pretrained(cls, path: str | Path, codes_per_level: Sequence[int], item_codes: torch.Tensor, *,
                        tokenizer=None, flow_hidden: int = FLOW_HIDDEN, **model_kwargs) -> "SIDPolicy":
        """Wrap a pretrained HF causal LM: add the ``<a_12>``-style SID tokens and resize its embeddings.

        Args:
            path: a local directory (or hub id) loadable by ``AutoModelForCausalLM`` / ``AutoTokenizer``.
            codes_per_level: ``(K_0, ..., K_{L-1})``.
            item_codes: ``LongTensor[n_items, L]`` (``Catalog.codes``).
            tokenizer: an already loaded tokenizer (else loaded from ``path``); modified in place and kept
                as ``policy.tokenizer``.
            flow_hidden: width of the flow MLPs.
            **model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``. ``dtype`` defaults to
                ``torch.float32``: a checkpoint stored in bf16 (the usual hub format) becomes fp32 master
                weights, which training autocasts (``dtype: bfloat16``); ``dtype="auto"`` keeps the stored dtype.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
        token_map = SIDTokenMap.for_pretrained(tokenizer, codes_per_level)
        model = AutoModelForCausalLM.from_pretrained(path, **_master_dtype(model_kwargs))
        token_map.resize(model)
        policy = cls(model, token_map, item_codes, codes_per_level, flow_hidden=flow_hidden)
        policy.tokenizer = tokenizer
        return policy

    def export_model(self) -> nn.Module:
        """The LM that :meth:`save` writes: ``self.model``, or, when adapters were injected into it by
        :func:`gflowgr_core.pretrained.apply_lora`, a copy with the adapters merged (a plain HF model).
        The live model keeps its adapters."""
        peft_model = self.__dict__.get("peft_model")
        if peft_model is None:
            return self.model
        return merged_copy(peft_model)

    def save(self, directory: str | Path) -> None:
        """Write the LM (``save_pretrained``), its tokenizer if any, the token map, flow heads and item codes."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.export_model().save_pretrained(directory / _LM_DIR)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / _LM_DIR)
        self.token_map.save(directory / _TOKENS_FILE)
        torch.save({"log_z_head": self.log_z_head.state_dict(), "log_f_head": self.log_f_head.state_dict()},
                   directory / _HEADS_FILE)
        torch.save(self.item_codes.cpu(), directory / _CODES_FILE)
        meta = {"format_version": _FORMAT_VERSION, "codes_per_level": list(self.codes_per_level),
                "flow_hidden": self.flow_hidden, "has_tokenizer": self.tokenizer is not None,
                "prompt_prefix": self.prompt_prefix.tolist(), "prompt_suffix": self.prompt_suffix.tolist()}
        (directory / _META_FILE).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path, **model_kwargs) -> "SIDPolicy":
        """Rebuild a policy written by :meth:`save` (``model_kwargs`` go to ``from_pretrained``; ``dtype``
        defaults to ``torch.float32`` as in :meth:`from_pretrained`)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        meta_path = directory / _META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a directory written by SIDPolicy.save")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')}")
        token_map = SIDTokenMap.load(directory / _TOKENS_FILE)
        model = AutoModelForCausalLM.from_pretrained(directory / _LM_DIR, **_master_dtype(model_kwargs))
        item_codes = torch.load(directory / _CODES_FILE, weights_only=True)
        policy = cls(model, token_map, item_codes, meta["codes_per_level"], flow_hidden=meta["flow_hidden"])
        heads = torch.load(directory / _HEADS_FILE, weights_only=True)
        policy.log_z_head.load_state_dict(heads["log_z_head"])
        policy.log_f_head.load_state_dict(heads["log_f_head"])
        policy.set_prompt_template(meta.get("prompt_prefix", ()), meta.get("prompt_suffix", ()))
        if meta.get("has_tokenizer"):
            policy.tokenizer = AutoTokenizer.from_pretrained(directory / _LM_DIR)
            token_map.check_tokenizer(policy.tokenizer)
        return policy.to(model.device)
