"""TRL integration: SID-row log-probabilities, trie-constrained rollouts and GFlowNet fine-tuning for
``trl.GRPOTrainer`` and the generative-recommendation codebases forked from it (MiniOneRec and its forks).

Install with ``pip install 'gflowgr[trl]'`` (tested range: :data:`TESTED_TRL_VERSIONS`). Everything here is a thin
adapter over the library's own pieces: the catalogue :class:`~gflowgr_core.sid.trie.Trie`,
:class:`~gflowgr_core.hf_processor.SIDTrieLogitsProcessor` for constrained ``generate``,
:func:`~gflowgr_core.objectives.logpf.constrained_log_pf` for log-probabilities from the last hidden states and
the SID rows of the head, and the balance objectives of :mod:`gflowgr_core.objectives.balance`.

Setting: a decoder-only causal LM whose tokenizer holds the SID tokens (``<a_130>``, ``<b_122>``, ``<c_86>``; level
letters a, b, c, ...), text prompts that end with a non-SID token, and completions that are one SID, optionally
followed by end tokens (``<a_130><b_122><c_86><eos>``).

Pieces:

* :class:`SIDVocabulary`: the catalogue in token space (trie over the catalogue's codes, the token id of every
  (level, code), the end token); built from a tokenizer and codes, or from a MiniOneRec / LETTER index file.
* :func:`sid_per_token_logps`: per-token log-probabilities of SID completions, ``[B, K]``, from the last hidden
  states, with no ``[B, K, V]`` logits: ``support="trie"`` (renormalised over the trie children of the prefix: the
  exact log-probability of a trie-constrained sampler at that temperature), ``"level"`` (over the level's SID
  tokens) or ``"vocab"`` (the full-vocabulary value, equal to TRL's own). :class:`SIDLogProbsMixin` puts it in
  place of ``GRPOTrainer._get_per_token_logps_and_entropies``.
* :func:`install_constrained_generation`: every ``model.generate`` call (TRL's rollouts included) emits catalogue
  SIDs only.
* :class:`SIDGRPOTrainer`: ``GRPOTrainer`` with both.
* :class:`GFlowNetConfig` / :class:`GFlowNetTrainer`: ``GRPOTrainer``'s constructor and rollouts (constrained,
  scored by the same ``reward_funcs``), with a TB / DB / SubTB loss, a learned ``log Z(prompt)`` and ``log F``
  heads, and an optional SFT anchor on a reference completion.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("gflowgr_core.integrations.trl needs TRL: pip install 'gflowgr[trl]' "
                      "(or pip install 'trl>=1.16,<1.17')") from exc

from packaging.version import Version

from .. import functional as F
from ..hf_processor import SIDTrieLogitsProcessor
from ..model.policy import FLOW_HIDDEN, FlowHead
from ..objectives.balance import make_objective
from ..objectives.logpf import (code_offsets, constrained_log_pf, constrained_log_softmax_rows, trie_walk)
from ..objectives.preference import sft_cross_entropy
from ..sid.tokens import parse_sid_token, sid_token
from ..sid.trie import Trie

__all__ = [
    "TESTED_TRL_VERSIONS", "SUPPORTS", "SIDVocabulary", "sid_codes_from_strings", "completion_hidden",
    "sid_per_token_logps", "SIDLogProbsMixin", "install_constrained_generation", "remove_constrained_generation",
    "SIDGRPOTrainer", "GFlowNetConfig", "GFlowNetTrainer", "SIDFlowHeads",
]

#: The trl versions this module is tested with (setup.py's ``[trl]`` extra).
TESTED_TRL_VERSIONS = ">=1.16,<1.17"
#: Supports of the per-token log-probabilities.
SUPPORTS = ("trie", "level", "vocab")

if not (Version("1.16") <= Version(trl.__version__) < Version("1.17")):
    warnings.warn(f"gflowgr_core.integrations.trl is tested with trl{TESTED_TRL_VERSIONS}; found trl "
                  f"{trl.__version__}: GRPOTrainer's internals this module overrides may differ", stacklevel=2)

_SID_TOKEN_RE = re.compile(r"<[^<>]*>")
# Rows of the full head a "vocab" chunk may hold at once: chunk_rows * V floats stay near this many elements.
_VOCAB_CHUNK_ELEMENTS = 1 << 24


def _rows(mask: torch.Tensor, limit: int = 8) -> str:
    rows = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, rows[:limit])) + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


def sid_codes_from_strings(strings: Sequence[str]) -> torch.Tensor:
    """Raw SID codes ``LongTensor[N, L]`` of SID token strings such as ``"<a_130><b_122><c_86>"``.

    Text around the tokens (quotes, newlines, spaces between tokens) is ignored; every string must hold the same
    number of SID tokens, level letters in order (a, b, c, ...).

    Raises:
        ValueError: naming the index and the string for a string without SID tokens, a malformed token, levels
            out of order, or a different number of levels than the first string.
    """
    rows, n_levels = [], None
    for i, text in enumerate(strings):
        toks = _SID_TOKEN_RE.findall(str(text))
        if not toks:
            raise ValueError(f"strings[{i}] = {text!r} holds no SID token such as '<a_12>'")
        codes = []
        for lvl, tok in enumerate(toks):
            try:
                level, code = parse_sid_token(tok)
            except ValueError as exc:
                raise ValueError(f"strings[{i}] = {text!r}: {exc}") from None
            if level != lvl:
                raise ValueError(f"strings[{i}] = {text!r}: token {tok!r} at position {lvl} is of level {level}, "
                                 f"expected level {lvl} (letters in order a, b, c, ...)")
            codes.append(code)
        if n_levels is None:
            n_levels = len(codes)
        elif len(codes) != n_levels:
            raise ValueError(f"strings[{i}] = {text!r} has {len(codes)} SID levels, strings[0] has {n_levels}")
        rows.append(codes)
    if not rows:
        raise ValueError("strings is empty")
    return torch.tensor(rows, dtype=torch.long)


class SIDVocabulary:
    """The catalogue in token space: a trie over its SIDs, the token id of each (level, code), the end token.

    Codes are compacted per level: level ``l``'s codes are the raw codes the catalogue uses there, in increasing
    order (``raw_codes[l][j]`` is the raw code of compact code ``j``), so a tokenizer only needs the SID tokens the
    catalogue uses, and the SID rows of the head are exactly those tokens' rows. ``"level"`` support therefore means
    "every SID token of the level that some item uses".

    Args:
        trie: :class:`~gflowgr_core.sid.trie.Trie` over the compact codes (several items may share a leaf).
        level_token_ids: ``L`` tensors; ``level_token_ids[l][j]`` is the token id of compact code ``j`` of level
            ``l``.
        raw_codes: ``L`` tensors of the raw code of each compact code.
        end_token_id: the token a constrained rollout emits after the SID (the model's EOS, so ``generate`` stops).

    Build one with :meth:`from_tokenizer` (codes in memory) or :meth:`from_index` (a MiniOneRec / LETTER
    ``*.index.json``).
    """

    def __init__(self, trie: Trie, level_token_ids: Sequence[torch.Tensor], raw_codes: Sequence[torch.Tensor],
                 end_token_id: int):
        if not isinstance(trie, Trie):
            raise TypeError(f"trie must be a gflowgr_core.sid.trie.Trie, got {type(trie).__name__}")
        if len(level_token_ids) != trie.num_levels or len(raw_codes) != trie.num_levels:
            raise ValueError(f"level_token_ids ({len(level_token_ids)}) and raw_codes ({len(raw_codes)}) need one "
                             f"entry per trie level ({trie.num_levels})")
        self.trie = trie
        self.level_token_ids = [torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu() for t in level_token_ids]
        self.raw_codes = [torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu() for t in raw_codes]
        for lvl, (ids, raw, k) in enumerate(zip(self.level_token_ids, self.raw_codes, trie.codes_per_level)):
            if ids.numel() != k or raw.numel() != k:
                raise ValueError(f"level {lvl}: {ids.numel()} token ids and {raw.numel()} raw codes for the trie's "
                                 f"K_{lvl} = {k} codes")
        self.end_token_id = int(end_token_id)
        self.sid_token_ids = torch.cat(self.level_token_ids)
        self._processor = SIDTrieLogitsProcessor(trie, self.level_token_ids, end_token_id=self.end_token_id)
        vocab = self._processor.min_vocab_size
        self._level_of = torch.full((vocab,), -1, dtype=torch.long)
        self._code_of = torch.full((vocab,), -1, dtype=torch.long)
        for lvl, ids in enumerate(self.level_token_ids):
            self._level_of[ids] = lvl
            self._code_of[ids] = torch.arange(ids.numel())
        self._tries: dict[torch.device, Trie] = {torch.device(trie.level_offsets.device): trie}
        self._raw_to_compact = []
        for raw in self.raw_codes:
            table = torch.full((int(raw.max()) + 1,), -1, dtype=torch.long)
            table[raw] = torch.arange(raw.numel())
            self._raw_to_compact.append(table)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tokenizer(cls, tokenizer, codes: torch.Tensor, *, end_token_id: Optional[int] = None,
                       add_missing_tokens: bool = False) -> "SIDVocabulary":
        """Build from a HF tokenizer and the catalogue's raw SID codes ``LongTensor[n_items, L]`` (row ``i`` = item
        ``i``; items may share a SID).

        Args:
            tokenizer: a HF tokenizer holding the tokens ``<a_c>``, ``<b_c>``, ... of every code the catalogue uses.
            codes: raw codes (as written in the tokens), ``>= 0``.
            end_token_id: defaults to ``tokenizer.eos_token_id``.
            add_missing_tokens: add absent SID tokens to the tokenizer (then resize the model:
                ``model.resize_token_embeddings(len(tokenizer))``); by default an absent token is an error.

        Raises:
            ValueError: naming the absent tokens, a negative code, or a missing end token.
        """
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"codes must be a non-empty [n_items, L] tensor, got shape {tuple(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        codes = codes.long().cpu()
        if bool((codes < 0).any()):
            raise ValueError(f"codes must be >= 0; rows {_rows((codes < 0).any(1))} hold negative codes")
        raw_codes = [torch.unique(codes[:, lvl]) for lvl in range(codes.shape[1])]
        names = [[sid_token(lvl, int(c)) for c in raw.tolist()] for lvl, raw in enumerate(raw_codes)]

        def lookup():
            unk = getattr(tokenizer, "unk_token_id", None)
            out, missing = [], []
            for lvl_names in names:
                ids = tokenizer.convert_tokens_to_ids(lvl_names)
                for name, tid in zip(lvl_names, ids):
                    if tid is None or (unk is not None and tid == unk):
                        missing.append(name)
                out.append(torch.tensor([-1 if t is None else t for t in ids], dtype=torch.long))
            return out, missing

        level_ids, missing = lookup()
        if missing and add_missing_tokens:
            tokenizer.add_tokens(missing)
            level_ids, missing = lookup()
        if missing:
            raise ValueError(f"the tokenizer has no token {missing[0]!r} ({len(missing)} SID tokens absent, e.g. "
                             f"{missing[:5]}): pass add_missing_tokens=True and resize the model's embeddings")
        if end_token_id is None:
            end_token_id = getattr(tokenizer, "eos_token_id", None)
            if end_token_id is None:
                raise ValueError("end_token_id is None and the tokenizer has no eos_token_id: pass end_token_id")
        compact = torch.stack([torch.searchsorted(raw, codes[:, lvl].contiguous()) for lvl, raw in enumerate(raw_codes)], dim=1)
        trie = Trie.build(compact, [raw.numel() for raw in raw_codes])
        return cls(trie, level_ids, raw_codes, int(end_token_id))

    @classmethod
    def from_index(cls, tokenizer, index_path: Union[str, Path], *, end_token_id: Optional[int] = None,
                   add_missing_tokens: bool = False) -> tuple["SIDVocabulary", list[str]]:
        """Read a MiniOneRec / LETTER index ``{"item_id": ["<a_60>", "<b_159>", "<c_203>"], ...}``.

        Returns:
            ``(vocabulary, item_ids)``: trie leaf items are positions in ``item_ids`` (the index's keys in file
            order).
        Raises:
            ValueError: naming the file and the item for a malformed entry (see :func:`sid_codes_from_strings`).
        """
        import json

        path = Path(index_path)
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a SID index: {exc}") from exc
        if not isinstance(index, dict) or not index:
            raise ValueError(f"{path}: expected a non-empty JSON object item_id -> list of SID tokens")
        item_ids = [str(k) for k in index]
        rows = []
        for item in item_ids:
            value = index[item]
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"{path}: item {item!r} maps to {value!r}, expected a list of SID token strings")
            try:
                row = sid_codes_from_strings(["".join(value)])[0]
            except ValueError as exc:
                raise ValueError(f"{path}: item {item!r}: {exc}") from None
            if rows and row.numel() != rows[0].numel():
                raise ValueError(f"{path}: item {item!r} has a {row.numel()}-level SID, item {item_ids[0]!r} has "
                                 f"{rows[0].numel()} levels")
            rows.append(row)
        codes = torch.stack(rows)
        return cls.from_tokenizer(tokenizer, codes, end_token_id=end_token_id,
                                  add_missing_tokens=add_missing_tokens), item_ids

    # ------------------------------------------------------------------ properties and conversions
    def trie_on(self, device) -> Trie:
        """The trie on ``device`` (moved once and cached)."""
        device = torch.device(device)
        if device not in self._tries:
            self._tries[device] = self.trie.to(device)
        return self._tries[device]

    @property
    def num_levels(self) -> int:
        """Number of SID levels ``L``."""
        return self.trie.num_levels

    @property
    def codes_per_level(self) -> tuple[int, ...]:
        """Compact codebook sizes (codes used by the catalogue per level)."""
        return tuple(self.trie.codes_per_level)

    def processor(self, prompt_length: Optional[int] = None, renormalize: bool = False) -> SIDTrieLogitsProcessor:
        """The library's :class:`~gflowgr_core.hf_processor.SIDTrieLogitsProcessor` for this catalogue (tables
        shared)."""
        return self._processor.with_prompt_length(prompt_length) if not renormalize else SIDTrieLogitsProcessor(
            self.trie, self.level_token_ids, end_token_id=self.end_token_id, prompt_length=prompt_length,
            renormalize=True)

    def completion_codes(self, completion_ids: torch.Tensor, completion_mask: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes[B, L], valid[B])``: compact codes of each completion's first ``L`` tokens; ``valid`` where those
        are SID tokens of levels ``0..L-1`` in order, not masked out, and a catalogue SID (``codes`` is ``0`` in
        invalid rows)."""
        if completion_ids.dim() != 2:
            raise ValueError(f"completion_ids must be [B, K], got shape {tuple(completion_ids.shape)}")
        B, K = completion_ids.shape
        L = self.num_levels
        device = completion_ids.device
        if K < L:
            return (torch.zeros(B, L, dtype=torch.long, device=device),
                    torch.zeros(B, dtype=torch.bool, device=device))
        head = completion_ids[:, :L]
        size = self._level_of.numel()
        inside = (head >= 0) & (head < size)
        safe = torch.where(inside, head, torch.zeros_like(head))
        level = torch.where(inside, self._level_of.to(device)[safe], torch.full_like(head, -1))
        codes = torch.where(inside, self._code_of.to(device)[safe], torch.full_like(head, -1))
        valid = (level == torch.arange(L, device=device)).all(1)
        if completion_mask is not None:
            valid &= completion_mask[:, :L].bool().all(1)
        codes = torch.where(valid[:, None], codes, torch.zeros_like(codes))
        valid &= self.trie_on(device).contains(codes)
        return torch.where(valid[:, None], codes, torch.zeros_like(codes)), valid

    def codes_from_text(self, strings: Sequence[str]) -> torch.Tensor:
        """Compact codes ``LongTensor[N, L]`` of SID strings (``"<a_130><b_122><c_86>"``).

        Raises:
            ValueError: naming the string whose SID uses a code absent from the catalogue's level.
        """
        raw = sid_codes_from_strings(strings)
        if raw.shape[1] != self.num_levels:
            raise ValueError(f"the strings hold {raw.shape[1]}-level SIDs, the catalogue has {self.num_levels} levels")
        out = torch.empty_like(raw)
        for lvl, table in enumerate(self._raw_to_compact):
            col = raw[:, lvl]
            ok = col < table.numel()
            mapped = torch.where(ok, table[col.clamp(max=table.numel() - 1)], torch.full_like(col, -1))
            if bool((mapped < 0).any()):
                i = int((mapped < 0).nonzero()[0])
                raise ValueError(f"strings[{i}] = {strings[i]!r}: code {int(col[i])} of level {lvl} is not used by "
                                 f"any catalogue item")
            out[:, lvl] = mapped
        return out

    def text(self, codes: torch.Tensor) -> list[str]:
        """SID strings of compact codes ``[N, L]``."""
        codes = torch.as_tensor(codes).long().cpu()
        raw = torch.stack([self.raw_codes[lvl][codes[:, lvl]] for lvl in range(self.num_levels)], dim=1)
        return ["".join(sid_token(lvl, int(c)) for lvl, c in enumerate(row)) for row in raw.tolist()]

    def token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` of compact codes ``[N, L]``."""
        codes = torch.as_tensor(codes).long()
        return torch.stack([self.level_token_ids[lvl].to(codes.device)[codes[:, lvl]]
                            for lvl in range(self.num_levels)], dim=1)


# ---------------------------------------------------------------------------------------------------- log-probs
def _unwrap(model):
    """The module under DDP / accelerate wrappers (PEFT models are kept: they forward attribute access)."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DistributedDataParallel":
        model = model.module
    return model


def completion_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
                      ) -> torch.Tensor:
    """Last-layer hidden states ``[B, K, d]`` that predict the last ``K = logits_to_keep`` tokens of ``input_ids``
    (positions ``S-K-1 .. S-2``; the state at ``p - 1`` predicts token ``p``).

    One forward through ``model`` itself (so DDP / PEFT wrappers see it) with ``output_hidden_states=True`` and an
    empty ``logits_to_keep`` index tensor, so the model's head forms no logits (models whose ``logits_to_keep``
    takes only an int get ``1``: the last position's logits).
    """
    S = input_ids.shape[1]
    if not 1 <= logits_to_keep < S:
        raise ValueError(f"logits_to_keep must be in [1, {S - 1}] for input_ids of width {S}, got {logits_to_keep}")
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    try:
        out = model(**kwargs, logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    except (TypeError, IndexError, RuntimeError):
        out = model(**kwargs, logits_to_keep=1)
    return out.hidden_states[-1][:, S - logits_to_keep - 1:S - 1]


def _vocab_rows(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tokens: Optional[torch.Tensor],
                want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary ``log p(tokens)`` ``[R]`` and entropy ``[R]`` of ``R`` hidden states (``[R, V]`` logits)."""
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = (logits.gather(1, tokens[:, None]).squeeze(1) - lse) if tokens is not None else lse.new_zeros(lse.shape)
    if want_entropy:
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    else:
        ent = lse.new_zeros(lse.shape)
    return logp, ent


def _maybe_checkpoint(fn, *args):
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def sid_per_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                        vocab: SIDVocabulary, *, support: str = "trie", temperature: float = 1.0,
                        compute_entropy: bool = False, entropy_grad: bool = True, chunk_rows: Optional[int] = None,
                        hidden: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probabilities (and entropies) of SID completions, without ``[B, K, V]`` logits.

    ``input_ids = prompt + completion`` (left-padded prompts, right-padded completions, as ``GRPOTrainer`` builds
    them); the last ``K = logits_to_keep`` tokens are the completion: ``L`` SID tokens, then end / padding tokens.
    The hidden states come from :func:`completion_hidden`; the SID positions go through the library's
    :func:`~gflowgr_core.objectives.logpf.constrained_log_pf` on the SID rows of the head:

    * ``"trie"``: renormalised over the trie children of the prefix, at ``temperature`` (the exact log-probability
      of a trie-constrained sampler at that temperature); the tokens after the SID are forced (log-prob 0);
    * ``"level"``: over the SID tokens of the level; the tokens after the SID are forced (0);
    * ``"vocab"``: the full-vocabulary log-softmax at ``temperature``, i.e. TRL's own value, for the SID and every
      later token; formed ``chunk_rows`` rows of ``[rows, V]`` at a time under activation checkpointing, so peak
      memory holds one chunk of logits, never ``[B, K, V]``.

    Args:
        model: the causal LM (DDP / PEFT wrappers accepted).
        input_ids, attention_mask: ``[B, S]``.
        logits_to_keep: ``K``, the completion width.
        vocab: the :class:`SIDVocabulary`.
        support: ``"trie"`` | ``"level"`` | ``"vocab"``.
        temperature: the logits are divided by it (TRL's ``args.temperature``).
        compute_entropy: also return per-token entropies of the same distribution (0 at forced tokens).
        entropy_grad: keep the entropies' graph (set ``False`` when they only feed a metric).
        chunk_rows: rows per ``[rows, V]`` chunk for ``"vocab"`` (default: about ``2**24 / V``).
        hidden: precomputed ``[B, K, d]`` from :func:`completion_hidden` (skips the forward).

    Returns:
        ``(logps[B, K], entropies[B, K] | None)`` in float32, ``0`` where the completion mask is 0.

    Raises:
        ValueError: for an unknown support or temperature <= 0, or naming the rows whose first ``L`` completion
            tokens are not a catalogue SID (rollouts must come from the constrained sampler).
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    K = int(logits_to_keep)
    L = vocab.num_levels
    comp = input_ids[:, -K:]
    mask = attention_mask[:, -K:].bool()
    codes, valid = vocab.completion_codes(comp, mask)
    if not bool(valid.all()):
        bad = ~valid
        r = int(bad.nonzero()[0])
        raise ValueError(f"completion rows {_rows(bad)} do not start with a catalogue SID (row {r}: token ids "
                         f"{comp[r, :L + 1].tolist()}); sample rollouts with install_constrained_generation / "
                         f"SIDGRPOTrainer")
    if hidden is None:
        hidden = completion_hidden(model, input_ids, attention_mask, K)
    base = _unwrap(model)
    w_sid, b_sid = F.sid_head_rows(base, vocab.sid_token_ids)  # also refuses soft-capped / scaled logits
    inv_t = 1.0 / float(temperature)
    h = hidden * inv_t if inv_t != 1.0 else hidden
    h_sid = h[:, :L]
    device = h.device
    trie = vocab.trie_on(device)
    B = h.shape[0]
    entropies = None

    if support in ("trie", "level"):
        bias = None if b_sid is None else b_sid * inv_t
        logp_sid = constrained_log_pf(h_sid, w_sid, codes, trie, support, bias=bias)
        logps = torch.cat([logp_sid.float(), logp_sid.new_zeros(B, K - L, dtype=torch.float32)], dim=1)
        if compute_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                nodes = trie_walk(trie, codes) if support == "trie" else None
                offs = code_offsets(vocab.codes_per_level)
                cols = []
                for lvl in range(L):
                    lp = constrained_log_softmax_rows(
                        h_sid[:, lvl], w_sid[offs[lvl]:offs[lvl + 1]], None if nodes is None else nodes[:, lvl],
                        lvl, trie, bias=None if bias is None else bias[offs[lvl]:offs[lvl + 1]], support=support)
                    lp = lp.float()
                    cols.append(-(lp.exp() * lp.masked_fill(~torch.isfinite(lp), 0.0)).sum(-1))
                entropies = torch.cat([torch.stack(cols, 1), h.new_zeros(B, K - L, dtype=torch.float32)], dim=1)
    else:
        head = base.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if bias is not None:
            bias = bias * inv_t
        V = weight.shape[0]
        rows = int(chunk_rows) if chunk_rows else max(1, _VOCAB_CHUNK_ELEMENTS // V)
        if rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        cpl = vocab.codes_per_level
        sid_ids = vocab.sid_token_ids.to(device)

        def sid_chunk(hc, wc, bc, cc):
            return constrained_log_pf(hc, None, cc, None, "vocab", codes_per_level=cpl, w_full=wc,
                                      sid_token_ids=sid_ids, bias=bc).float()

        parts = [_maybe_checkpoint(sid_chunk, h_sid[i:i + rows], weight, bias, codes[i:i + rows])
                 for i in range(0, B, rows)]
        logp_sid = torch.cat(parts, 0)
        cols_lp, cols_ent = [logp_sid], []
        if K > L:
            h_rest = h[:, L:].reshape(-1, h.shape[-1])
            tok_rest = comp[:, L:].reshape(-1)
            lp_parts = []
            for i in range(0, h_rest.shape[0], rows):
                lp, _ = _maybe_checkpoint(lambda hc, wc, bc, tc: _vocab_rows(hc, wc, bc, tc, False),
                                          h_rest[i:i + rows], weight, bias, tok_rest[i:i + rows])
                lp_parts.append(lp)
            cols_lp.append(torch.cat(lp_parts).view(B, K - L))
        logps = torch.cat(cols_lp, dim=1)
        if compute_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                flat = h.reshape(-1, h.shape[-1])
                for i in range(0, flat.shape[0], rows):
                    _, ent = _maybe_checkpoint(lambda hc, wc, bc: _vocab_rows(hc, wc, bc, None, True),
                                               flat[i:i + rows], weight, bias)
                    cols_ent.append(ent)
                entropies = torch.cat(cols_ent).view(B, K)
    logps = logps.masked_fill(~mask, 0.0)
    if entropies is not None:
        entropies = entropies.masked_fill(~mask, 0.0)
    return logps, entropies


_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


class SIDLogProbsMixin:
    """Put :func:`sid_per_token_logps` in place of ``GRPOTrainer._get_per_token_logps_and_entropies`` (trl 1.16's
    name and signature; every caller in the trainer, old / reference / current log-probs, goes through it).

    Mix it in before ``GRPOTrainer`` (``class T(SIDLogProbsMixin, GRPOTrainer)``) and set ``self.sid_vocab`` (a
    :class:`SIDVocabulary`) and ``self.sid_support`` (``"trie"`` | ``"level"`` | ``"vocab"``) before training.
    Forks whose method is still the older ``_get_per_token_logps(model, input_ids, attention_mask,
    logits_to_keep)`` override that one with ``sid_per_token_logps(...)[0]`` instead (docs/use_from_trl.md).
    """

    sid_vocab: SIDVocabulary
    sid_support: str = "trie"

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's signature; returns ``(logps[B, K], entropies[B, K] | None, None)``.

        Raises:
            ValueError: for multimodal inputs or a MoE auxiliary loss (text-only SID completions here).
        """
        given = [k for k, v in multimodal.items() if v is not None]
        if given:
            raise ValueError(f"SID log-probs take text-only inputs; got {given}")
        if compute_aux_loss:
            raise ValueError("compute_aux_loss=True (a MoE load-balancing loss) is not supported with SID log-probs")
        vocab = getattr(self, "sid_vocab", None)
        if not isinstance(vocab, SIDVocabulary):
            raise ValueError(f"{type(self).__name__}.sid_vocab must be a SIDVocabulary, got {type(vocab).__name__}")
        batch_size = batch_size or input_ids.size(0)
        entropy_grad = bool(getattr(self, "_entropy_bonus_enabled", False))
        logps, ents = [], []
        accelerator = getattr(self, "accelerator", None)
        for start in range(0, input_ids.size(0), batch_size):
            sl = slice(start, start + batch_size)
            # TRL runs its forward under the accelerator's autocast (bf16 / fp16 mixed precision): so do we.
            with (accelerator.autocast() if accelerator is not None else contextlib.nullcontext()):
                lp, ent = sid_per_token_logps(model, input_ids[sl], attention_mask[sl], logits_to_keep, vocab,
                                              support=self.sid_support,
                                              temperature=getattr(self, "temperature", 1.0),
                                              compute_entropy=compute_entropy, entropy_grad=entropy_grad)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps), (torch.cat(ents) if compute_entropy else None), None


# ---------------------------------------------------------------------------------------------------- rollouts
_ORIGINAL_GENERATE = "_gflowgr_original_generate"


def install_constrained_generation(model, vocab: SIDVocabulary, *, with_end_token: bool = True) -> None:
    """Make every ``model.generate`` call emit catalogue SIDs only (TRL's rollouts call it).

    The model instance's ``generate`` is wrapped: each call puts the library's
    :class:`~gflowgr_core.hf_processor.SIDTrieLogitsProcessor` (``prompt_length`` = the call's prompt width) before
    top-k / top-p / min-p truncation (those warpers are moved after the mask, so truncation cannot leave a row with
    no valid token); temperature and repetition penalty act before it as usual. With ``with_end_token`` the SID is
    followed by ``vocab.end_token_id`` (use the model's EOS so generation stops); without, generation stops after
    the ``L`` SID tokens. Works with sampling, greedy and beam search. Undo with
    :func:`remove_constrained_generation`.

    Raises:
        ValueError: when ``generate`` is already wrapped.
    """
    from transformers import LogitsProcessorList, MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if hasattr(model, _ORIGINAL_GENERATE):
        raise ValueError(f"{type(model).__name__}.generate is already constrained; call "
                         f"remove_constrained_generation first")
    original = model.generate
    L = vocab.num_levels

    def generate(*args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("constrained generate needs input_ids (decoder-only prompts)")
        config = kwargs.pop("generation_config", None)
        config = copy.deepcopy(config if config is not None else model.generation_config)
        for key in [k for k in list(kwargs) if hasattr(config, k) and k not in ("input_ids", "attention_mask")]:
            setattr(config, key, kwargs.pop(key))
        procs = LogitsProcessorList([vocab.processor(prompt_length=input_ids.shape[1])])
        if getattr(config, "do_sample", False):
            top_k, top_p, min_p = getattr(config, "top_k", None), getattr(config, "top_p", None), \
                getattr(config, "min_p", None)
            if top_k:
                procs.append(TopKLogitsWarper(int(top_k)))
            if top_p is not None and top_p < 1.0:
                procs.append(TopPLogitsWarper(float(top_p)))
            if min_p:
                procs.append(MinPLogitsWarper(float(min_p)))
            config.top_k, config.top_p, config.min_p = None, None, None
        procs.extend(kwargs.pop("logits_processor", None) or [])
        width = L + 1 if with_end_token else L
        if config.max_new_tokens is None or config.max_new_tokens > width:
            config.max_new_tokens = width
        if config.max_new_tokens < width:
            raise ValueError(f"max_new_tokens={config.max_new_tokens} is too short for a {L}-level SID"
                             f"{' and its end token' if with_end_token else ''} ({width} tokens)")
        config.min_new_tokens = None
        return original(*args, generation_config=config, logits_processor=procs, **kwargs)

    setattr(model, _ORIGINAL_GENERATE, original)
    model.generate = generate


def remove_constrained_generation(model) -> None:
    """Restore the ``generate`` that :func:`install_constrained_generation` wrapped (no-op when not wrapped)."""
    if hasattr(model, _ORIGINAL_GENERATE):
        del model.generate  # the instance attribute; the class method shows through again
        delattr(model, _ORIGINAL_GENERATE)


class SIDGRPOTrainer(SIDLogProbsMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with trie-constrained rollouts and SID-row log-probabilities.

    Same constructor as ``GRPOTrainer`` plus keyword arguments:

    Args:
        sid_vocab: the :class:`SIDVocabulary` (its ``end_token_id`` must be one of the trainer's EOS ids when
            ``with_end_token``).
        sid_support: support of the log-probabilities (:func:`sid_per_token_logps`); ``"trie"`` is the exact
            log-probability of the constrained sampler, ``"vocab"`` TRL's own value.
        constrained_rollouts: wrap the model's ``generate`` (:func:`install_constrained_generation`).
        with_end_token: rollouts end with the end token after the SID.
    """

    def __init__(self, model, reward_funcs, args: Optional[GRPOConfig] = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *, sid_vocab: SIDVocabulary, sid_support: str = "trie",
                 constrained_rollouts: bool = True, with_end_token: bool = True, **kwargs):
        if not isinstance(sid_vocab, SIDVocabulary):
            raise TypeError(f"sid_vocab must be a SIDVocabulary, got {type(sid_vocab).__name__}")
        if sid_support not in SUPPORTS:
            raise ValueError(f"sid_support must be one of {SUPPORTS}, got {sid_support!r}")
        self.sid_vocab = sid_vocab
        self.sid_support = sid_support
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if self.use_vllm:
            raise ValueError("SID rollouts run through model.generate; use_vllm=True is not supported")
        if with_end_token and sid_vocab.end_token_id not in self.eos_token_ids:
            raise ValueError(f"sid_vocab.end_token_id={sid_vocab.end_token_id} is not one of the trainer's EOS ids "
                             f"{self.eos_token_ids}: generation would not stop after the SID")
        if constrained_rollouts:
            base = _unwrap(self.model)
            remove_constrained_generation(base)  # a model reused from an earlier trainer: this trainer's settings
            install_constrained_generation(base, sid_vocab, with_end_token=with_end_token)


# ---------------------------------------------------------------------------------------------------- GFlowNet
@dataclass
class GFlowNetConfig(GRPOConfig):
    """``GRPOConfig`` plus the GFlowNet objective's settings (rollouts, rewards, batching and logging keep GRPO's
    meaning; ``beta`` must stay 0: no KL term, no reference model).

    Fields:
        gfn_objective: ``"tb"`` | ``"db"`` | ``"subtb"``.
        subtb_lambda: SubTB's lambda.
        gfn_support: support of ``log P_F`` (``"trie"`` | ``"level"`` | ``"vocab"``).
        lambda_gfn: weight of the balance loss.
        flow_hidden: hidden width of the ``log Z`` / ``log F`` MLP heads.
        flow_learning_rate: learning rate of the heads (own optimizer group); ``None``: 100 x ``learning_rate``.
        log_z_init: initial ``log Z`` for every prompt.
        log_reward: ``"log"``: ``log R = reward_beta * log(max(r, 0) + reward_eps)`` of the weighted reward sum;
            ``"raw"``: the rewards are already log-rewards, ``log R = reward_beta * r``.
        reward_eps, reward_beta: see ``log_reward``.
        sft_weight: weight of the SFT anchor (cross-entropy of the reference SID); 0 = off.
        sft_column: dataset column holding the reference SID string (required when ``sft_weight > 0``).
    """

    gfn_objective: str = field(default="tb", metadata={"help": "tb | db | subtb"})
    subtb_lambda: float = field(default=0.9, metadata={"help": "SubTB lambda"})
    gfn_support: str = field(default="trie", metadata={"help": "support of log P_F: trie | level | vocab"})
    lambda_gfn: float = field(default=1.0, metadata={"help": "weight of the balance loss"})
    flow_hidden: int = field(default=FLOW_HIDDEN, metadata={"help": "hidden width of the flow heads"})
    flow_learning_rate: Optional[float] = field(default=None, metadata={"help": "LR of the flow heads"})
    log_z_init: float = field(default=0.0, metadata={"help": "initial log Z"})
    log_reward: str = field(default="log", metadata={"help": "log | raw"})
    reward_eps: float = field(default=1e-4, metadata={"help": "added to rewards before the log"})
    reward_beta: float = field(default=1.0, metadata={"help": "log R multiplier (reward exponent)"})
    sft_weight: float = field(default=0.0, metadata={"help": "weight of the SFT anchor"})
    sft_column: Optional[str] = field(default=None, metadata={"help": "dataset column of the reference SID"})

    def __post_init__(self):
        super().__post_init__()
        if self.gfn_objective not in ("tb", "db", "subtb"):
            raise ValueError(f"gfn_objective must be 'tb', 'db' or 'subtb', got {self.gfn_objective!r}")
        if self.gfn_support not in SUPPORTS:
            raise ValueError(f"gfn_support must be one of {SUPPORTS}, got {self.gfn_support!r}")
        if self.log_reward not in ("log", "raw"):
            raise ValueError(f"log_reward must be 'log' or 'raw', got {self.log_reward!r}")
        if self.beta != 0.0:
            raise ValueError(f"beta={self.beta}: the GFlowNet objective has no KL term; leave beta at 0")
        if not self.reward_eps > 0:
            raise ValueError(f"reward_eps must be > 0, got {self.reward_eps}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.sft_weight > 0 and not self.sft_column:
            raise ValueError("sft_weight > 0 needs sft_column (the dataset column with the reference SID)")
        if self.flow_learning_rate is not None and not self.flow_learning_rate > 0:
            raise ValueError(f"flow_learning_rate must be > 0, got {self.flow_learning_rate}")


class SIDFlowHeads(nn.Module):
    """``log Z(prompt)`` and ``log F(prefix)`` heads (the library's :class:`~gflowgr_core.model.policy.FlowHead`)
    on the decision hidden states: ``log_z(h[:, 0])`` (last prompt position), ``log_f(h[:, 1:L])`` (after each SID
    prefix). Stored on the LM as the submodule ``gflowgr_flows``, so checkpoints and resumption carry them."""

    def __init__(self, d: int, hidden: int = FLOW_HIDDEN, log_z_init: float = 0.0):
        super().__init__()
        self.log_z = FlowHead(d, hidden, log_z_init)
        self.log_f = FlowHead(d, hidden, 0.0)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h[B, L, d]`` → ``(log_z[B], log_f[B, L-1])`` in float32."""
        return self.log_z(h[:, 0]).float(), self.log_f(h[:, 1:]).float()


FLOWS_ATTR = "gflowgr_flows"


class GFlowNetTrainer(SIDGRPOTrainer):
    """GFlowNet fine-tuning in ``GRPOTrainer``'s shape: same constructor (``model, reward_funcs, args,
    train_dataset, processing_class``, plus ``sid_vocab``), same rollouts (trie-constrained ``generate``, scored by
    the same reward functions), and the loss

    ``lambda_gfn * Balance(log P_F, log Z(prompt), log F, log R) + sft_weight * CE(reference SID)``

    with ``Balance`` the library's TB / DB / SubTB (:func:`gflowgr_core.objectives.balance.make_objective`),
    ``log P_F`` from :func:`~gflowgr_core.objectives.logpf.constrained_log_pf` on the SID rows of the head (at
    temperature 1: the sampling temperature only explores, and TB is valid off-policy), the learned heads
    :class:`SIDFlowHeads`, and ``log R`` from the weighted sum of the rewards (``args.log_reward``).

    Args:
        args: a :class:`GFlowNetConfig` (``GRPOConfig`` fields keep their meaning; ``beta`` = 0).
        sid_vocab, with_end_token: as in :class:`SIDGRPOTrainer` (rollouts are always constrained).
    """

    def __init__(self, model, reward_funcs, args: Optional[GFlowNetConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, *, sid_vocab: SIDVocabulary, with_end_token: bool = True,
                 **kwargs):
        if args is None:
            args = GFlowNetConfig(output_dir="gflownet-trainer")
        if not isinstance(args, GFlowNetConfig):
            raise TypeError(f"args must be a GFlowNetConfig, got {type(args).__name__}")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, sid_vocab=sid_vocab,
                         sid_support=args.gfn_support, constrained_rollouts=True, with_end_token=with_end_token,
                         **kwargs)
        self.gfn_objective = make_objective(args.gfn_objective, **(
            {"subtb_lambda": args.subtb_lambda} if args.gfn_objective == "subtb" else {}))
        base = _unwrap(self.model)
        if not hasattr(base, FLOWS_ATTR):
            d = base.get_output_embeddings().weight.shape[1]
            heads = SIDFlowHeads(d, args.flow_hidden, args.log_z_init)
            heads.to(device=base.get_output_embeddings().weight.device)
            base.add_module(FLOWS_ATTR, heads)

    @property
    def flow_heads(self) -> SIDFlowHeads:
        """The ``log Z`` / ``log F`` heads."""
        return getattr(_unwrap(self.model), FLOWS_ATTR)

    def create_optimizer(self, model=None):
        """HF's optimizer, with the flow heads in their own group at ``flow_learning_rate`` (default 100 x LR)."""
        opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
        flow_ids = {id(p) for p in self.flow_heads.parameters()}
        lr = self.args.flow_learning_rate or 100.0 * self.args.learning_rate
        moved = []
        for group in opt.param_groups:
            keep = [p for p in group["params"] if id(p) not in flow_ids]
            moved += [p for p in group["params"] if id(p) in flow_ids]
            group["params"] = keep
        opt.param_groups = [g for g in opt.param_groups if g["params"]]
        if moved:
            opt.add_param_group({"params": moved, "lr": lr, "weight_decay": 0.0})
        return opt

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gfn_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        ref_codes = None
        if self.args.sft_weight > 0:
            col = self.args.sft_column
            missing = [i for i, x in enumerate(inputs) if col not in x]
            if missing:
                raise ValueError(f"sft_column={col!r} is absent from dataset rows {missing[:8]}")
            ref_codes = self.sid_vocab.codes_from_text([x[col] for x in inputs])
        output = super()._generate_and_score_completions(inputs)
        n = output["completion_ids"].shape[0]
        rewards = self._gfn_rewards_per_func
        weights = self.reward_weights.to(rewards.device)
        total = (rewards.nan_to_num(0.0) * weights[None]).sum(1)
        lo = self.accelerator.process_index * n
        total = total[lo:lo + n]
        if self.args.log_reward == "log":
            log_r = self.args.reward_beta * torch.log(total.clamp_min(0.0) + self.args.reward_eps)
        else:
            log_r = self.args.reward_beta * total
        if not bool(torch.isfinite(log_r).all()):
            raise FloatingPointError(f"non-finite log R at rows {_rows(~torch.isfinite(log_r))} (rewards "
                                     f"{total[~torch.isfinite(log_r)][:8].tolist()})")
        output["gfn_log_r"] = log_r.to(output["completion_ids"].device)
        if ref_codes is not None:
            output["gfn_ref_codes"] = ref_codes.to(output["completion_ids"].device)
        return output

    def gfn_terms(self, model, inputs) -> dict[str, torch.Tensor]:
        """``log_pf[B, L]``, ``log_z[B]``, ``log_f[B, L-1]``, ``log_r[B]`` of a batch of rollouts (the inputs of
        the balance loss), from one forward over prompt + completion."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        K, L = completion_ids.shape[1], self.sid_vocab.num_levels
        codes, valid = self.sid_vocab.completion_codes(completion_ids, completion_mask)
        if not bool(valid.all()):
            raise ValueError(f"rollout rows {_rows(~valid)} are not catalogue SIDs (constrained generation was "
                             f"removed or bypassed)")
        hidden = completion_hidden(model, input_ids, attention_mask, K)[:, :L]
        base = _unwrap(model)
        w_sid, bias = F.sid_head_rows(base, self.sid_vocab.sid_token_ids)
        trie = self.sid_vocab.trie_on(hidden.device)
        if self.args.gfn_support == "vocab":
            head = base.get_output_embeddings()
            log_pf = constrained_log_pf(hidden, None, codes, None, "vocab", codes_per_level=trie.codes_per_level,
                                        w_full=head.weight, sid_token_ids=self.sid_vocab.sid_token_ids.to(
                                            hidden.device), bias=getattr(head, "bias", None))
        else:
            log_pf = constrained_log_pf(hidden, w_sid, codes, trie, self.args.gfn_support, bias=bias)
        log_z, log_f = getattr(base, FLOWS_ATTR)(hidden)
        return {"log_pf": log_pf.float(), "log_z": log_z, "log_f": log_f, "log_r": inputs["gfn_log_r"].float(),
                "codes": codes}

    def _sft_term(self, model, inputs) -> torch.Tensor:
        ref = inputs["gfn_ref_codes"]
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        ref_ids = self.sid_vocab.token_ids(ref).to(prompt_ids.device)
        input_ids = torch.cat([prompt_ids, ref_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, torch.ones_like(ref_ids)], dim=1)
        L = self.sid_vocab.num_levels
        hidden = completion_hidden(model, input_ids, attention_mask, L)
        w_sid, bias = F.sid_head_rows(_unwrap(model), self.sid_vocab.sid_token_ids)
        trie = self.sid_vocab.trie_on(hidden.device)
        support = "trie" if self.args.gfn_support == "vocab" else self.args.gfn_support
        return sft_cross_entropy(constrained_log_pf(hidden, w_sid, ref, trie, support, bias=bias).float())

    def _compute_loss(self, model, inputs):
        terms = self.gfn_terms(model, inputs)
        log_f = None if self.args.gfn_objective == "tb" else terms["log_f"]
        balance = self.gfn_objective.loss(terms["log_pf"], terms["log_z"], log_f, terms["log_r"])
        loss = self.args.lambda_gfn * balance
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if self.args.sft_weight > 0:
            sft = self._sft_term(model, inputs)
            loss = loss + self.args.sft_weight * sft
            metrics["gfn/sft"].append(sft.item())
        metrics["gfn/balance"].append(balance.item())
        metrics["gfn/log_z"].append(terms["log_z"].mean().item())
        metrics["gfn/log_r"].append(terms["log_r"].mean().item())
        metrics["gfn/log_pf"].append(terms["log_pf"].sum(1).mean().item())
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"non-finite GFlowNet loss {loss.item()} (balance {balance.item()})")
        if mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        return loss
