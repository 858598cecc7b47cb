"""Trie-constrained semantic-ID decoding inside stock Hugging Face ``model.generate``.

:class:`SIDTrieLogitsProcessor` is a ``transformers.LogitsProcessor``: pass it in ``logits_processor=`` and
greedy search, sampling and beam search (``num_beams > 1``, ``num_return_sequences``) only ever emit SIDs
of the catalogue, followed by the end token. It is the drop-in replacement of a Python
``prefix_allowed_tokens_fn`` over a dict trie: the mask of every row is built in a handful of vectorised
device operations per step (no per-row Python, no host synchronisation), from the device tables of a
:class:`~gflowgr_core.sid.trie.Trie`.

The processor keeps no state between calls. Each call re-derives every row's trie node from the tokens the
row generated since its SID started (at most ``L`` of them), so HF's beam reordering between steps, reuse
across ``generate`` calls and ``num_return_sequences`` expansion cannot desynchronise it. Where the SID
starts is known in one of two ways:

* ``prompt_length=P`` (recommended): the SID starts at position ``P`` of ``input_ids`` in every row. For a
  decoder-only model with a left-padded batch, ``P = input_ids.shape[1]`` of the prompt batch; for an
  encoder-decoder model the decoder starts from ``decoder_start_token_id``, so ``P = 1`` (or the length of
  the ``decoder_input_ids`` given to ``generate``). The SID level is then the same Python int for all rows.
* ``prompt_length=None``: the SID is the trailing run of SID tokens after the last non-SID token of each
  row (``SEP``, ``BOS``, the decoder start token, ...). This needs the prompt to end with a non-SID token;
  a prompt ending in SID tokens (history items with no separator) must use ``prompt_length``.

A row whose generated tokens are not a catalogue SID prefix (possible only when another processor or a
forced token interfered, or when the prompt breaks the rule above) is allowed only the end token; with
``strict=True`` the processor raises instead, naming the rows (one host synchronisation per step).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

from .sid.tokens import SIDTokenMap
from .sid.trie import Trie

try:  # transformers is a dependency of the library; keep the class importable for type checks without it
    from transformers import LogitsProcessor as _HFLogitsProcessor
except ImportError:  # pragma: no cover - transformers is installed with gflowgr
    _HFLogitsProcessor = object

__all__ = ["SIDTrieLogitsProcessor", "sids_from_sequences"]

_NEG_INF = float("-inf")


def _token_ids(name: str, ids) -> torch.Tensor:
    """``ids`` (a tensor, array or sequence) as an int64 tensor; ``TypeError`` naming ``name`` unless they are
    integers already (a float id such as ``5.7`` would be truncated to another token without a word)."""
    t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got a {t.dtype} tensor: token ids are never "
                        f"rounded or truncated")
    return t.long()


def _check_id_tensor(name: str, t: torch.Tensor) -> None:
    """``TypeError`` naming ``name`` unless ``t`` is an integer tensor (token ids as ``generate`` passes them)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {t.dtype}")


def _whole_number(name: str, value, optional: bool = False) -> Optional[int]:
    """``value`` as an ``int``; ``TypeError`` naming ``name`` unless it is an integer (a Python or NumPy int, or
    a one-element integer tensor)."""
    if value is None and optional:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (value.is_floating_point()
                                                                       or value.is_complex()
                                                                       or value.dtype == torch.bool):
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer{' or None' if optional else ''}, got "
                        f"{type(value).__name__} {value!r}")
    return int(value)


class _DeviceTables:
    """The trie and the token lookup tables on one device (built once per device and reused)."""

    def __init__(self, trie: Trie, level_token_ids: torch.Tensor, level_of_token: torch.Tensor,
                 code_of_token: torch.Tensor, device: torch.device):
        self.trie = trie.to(device)
        self.level_token_ids = level_token_ids.to(device)  # [L, K_max], -1 beyond K_l
        self.level_of_token = level_of_token.to(device)  # [V_map], -1 = not a SID token
        self.code_of_token = code_of_token.to(device)


class SIDTrieLogitsProcessor(_HFLogitsProcessor):
    """Restrict ``generate`` to catalogue SIDs: at SID level ``l`` only the trie children of the row's
    prefix are allowed; after the ``L``-th SID token only ``end_token_id``.

    Args:
        trie: the catalogue :class:`~gflowgr_core.sid.trie.Trie` (any device; moved to the scores' device
            on first use and cached).
        tokens: a :class:`~gflowgr_core.sid.tokens.SIDTokenMap`, or the token ids of each level as a
            sequence of ``L`` integer tensors ``[K_l]`` (entry ``c`` = token id of code ``c``).
        end_token_id: the token forced after the last SID token. Defaults to ``tokens.eos_id`` for a
            token map; required with explicit token ids. Use the model's ``eos_token_id`` so that
            ``generate`` stops there.
        prompt_length: position in ``input_ids`` where the SID starts (the same for every row), or ``None``
            to take the trailing run of SID tokens after each row's last non-SID token (see the module
            docstring).
        renormalize: ``True``: return ``log_softmax`` over the allowed tokens (the GFlowNet policy
            renormalised over the trie children; the forced end token then has log-probability 0).
            ``False``: return the incoming scores with disallowed tokens set to ``-inf`` (what a
            ``prefix_allowed_tokens_fn`` does).
        strict: raise ``ValueError`` naming the rows whose generated suffix is not a catalogue SID prefix
            (costs one host synchronisation per step); by default such rows are allowed only the end token.

    Call: ``processor(input_ids[R, S], scores[R, V]) -> scores[R, V]`` (``S`` = tokens so far, ``V`` >= every
    SID token id). The output has the dtype and device of ``scores``.

    Raises:
        ValueError: at construction, when the token ids do not match the trie's levels or codes, collide,
            or include the end token; at a call, when ``scores`` is too narrow for the SID tokens, the call
            comes before ``prompt_length``, or (``strict``) a row left the trie.
        TypeError: token ids (``tokens``, ``input_ids``), ``end_token_id`` or ``prompt_length`` that are not
            integers (a float id is never truncated to some other token), naming the argument.
    """

    def __init__(self, trie: Trie, tokens: Union[SIDTokenMap, Sequence[torch.Tensor]], *,
                 end_token_id: Optional[int] = None, prompt_length: Optional[int] = None,
                 renormalize: bool = False, strict: bool = False):
        if not isinstance(trie, Trie):
            raise TypeError(f"trie must be a gflowgr_core.sid.trie.Trie, got {type(trie).__name__}")
        if isinstance(tokens, SIDTokenMap):
            level_ids = [_token_ids(f"tokens.level_token_ids[{lv}]", t).cpu()
                         for lv, t in enumerate(tokens.level_token_ids)]
            if end_token_id is None:
                end_token_id = tokens.eos_id
        else:
            level_ids = [_token_ids(f"tokens[{lv}]", t).reshape(-1).cpu() for lv, t in enumerate(tokens)]
            if end_token_id is None:
                raise ValueError("end_token_id is required when the SID token ids are given as tensors "
                                 "(pass the model's eos_token_id)")
        L = trie.num_levels
        if len(level_ids) != L:
            raise ValueError(f"{len(level_ids)} levels of SID token ids given, the trie has {L} levels")
        for level, (ids, k) in enumerate(zip(level_ids, trie.codes_per_level)):
            if ids.numel() != k:
                raise ValueError(f"level {level}: {ids.numel()} token ids given, the trie's level has "
                                 f"K_{level} = {k} codes")
        flat = torch.cat(level_ids)
        if int(flat.min()) < 0:
            raise ValueError(f"SID token ids must be >= 0, found {int(flat.min())}")
        if torch.unique(flat).numel() != flat.numel():
            raise ValueError("two SID codes share a token id: every (level, code) needs its own token")
        self.end_token_id = _whole_number("end_token_id", end_token_id)
        if self.end_token_id < 0:
            raise ValueError(f"end_token_id must be >= 0, got {self.end_token_id}")
        if bool((flat == self.end_token_id).any()):
            raise ValueError(f"end_token_id {self.end_token_id} is also a SID token id")
        prompt_length = _whole_number("prompt_length", prompt_length, optional=True)
        if prompt_length is not None and prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0 or None, got {prompt_length}")
        self.prompt_length = prompt_length
        self.renormalize = bool(renormalize)
        self.strict = bool(strict)
        self.trie = trie
        self.num_levels = L
        self.codes_per_level = tuple(trie.codes_per_level)
        #: smallest vocabulary (scores width) that holds every SID token and the end token.
        self.min_vocab_size = max(int(flat.max()), self.end_token_id) + 1

        table = torch.full((L, max(self.codes_per_level)), -1, dtype=torch.long)
        level_of = torch.full((self.min_vocab_size,), -1, dtype=torch.long)
        code_of = torch.full((self.min_vocab_size,), -1, dtype=torch.long)
        for level, ids in enumerate(level_ids):
            table[level, : ids.numel()] = ids
            level_of[ids] = level
            code_of[ids] = torch.arange(ids.numel())
        self._level_token_ids = table
        self._level_of_token = level_of
        self._code_of_token = code_of
        self._per_level = level_ids
        self._tables: dict[torch.device, _DeviceTables] = {}

    # ------------------------------------------------------------------ construction helpers
    def with_prompt_length(self, prompt_length: Optional[int]) -> "SIDTrieLogitsProcessor":
        """A processor with the same trie and tokens (tables shared, nothing rebuilt) for another prompt
        length, e.g. ``processor.with_prompt_length(batch["input_ids"].shape[1])`` per batch."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        prompt_length = _whole_number("prompt_length", prompt_length, optional=True)
        if prompt_length is not None and prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0 or None, got {prompt_length}")
        other.prompt_length = prompt_length
        return other

    def _device_tables(self, device: torch.device) -> _DeviceTables:
        tables = self._tables.get(device)
        if tables is None:
            tables = _DeviceTables(self.trie, self._level_token_ids, self._level_of_token,
                                   self._code_of_token, device)
            self._tables[device] = tables
        return tables

    # ------------------------------------------------------------------ per-step work
    def _token_level_code(self, tab: _DeviceTables, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SID level and code of each token (``-1`` for non-SID tokens, ids beyond the SID tables included)."""
        size = tab.level_of_token.numel()
        inside = (tokens >= 0) & (tokens < size)
        safe = torch.where(inside, tokens, torch.zeros_like(tokens))
        minus = torch.full_like(tokens, -1)
        return (torch.where(inside, tab.level_of_token[safe], minus),
                torch.where(inside, tab.code_of_token[safe], minus))

    def _nodes_fixed(self, tab: _DeviceTables, input_ids: torch.Tensor, level: int) -> torch.Tensor:
        """Trie node ``[R]`` of every row after its first ``level`` SID tokens (``prompt_length`` mode)."""
        start = self.prompt_length
        tok_level, tok_code = self._token_level_code(tab, input_ids[:, start:start + level])
        node = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        for j in range(level):
            code = torch.where(tok_level[:, j] == j, tok_code[:, j], torch.full_like(node, -1))
            node = tab.trie.next_node(node, code, level=j)
        return node

    def _nodes_trailing(self, tab: _DeviceTables, input_ids: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(level[R], node[R])`` from each row's trailing run of SID tokens (``prompt_length=None``).

        ``level`` is the run length (``L + 1`` marks a run longer than a SID); ``node`` is ``-1`` where the
        run is not a catalogue prefix.
        """
        L = self.num_levels
        R, S = input_ids.shape
        width = min(S, L + 1)
        window = input_ids[:, S - width:]
        tok_level, tok_code = self._token_level_code(tab, window)
        is_sid = tok_level >= 0
        # Run length: the count of leading True in the reversed window (cumprod stops at the first False).
        run = is_sid.flip(1).to(torch.int32).cumprod(dim=1).sum(dim=1).long()
        node = torch.zeros(R, dtype=torch.long, device=input_ids.device)
        for j in range(min(L, width)):
            # Token j of the run sits at window column width - run + j (only meaningful when j < run).
            col = (width - run + j).clamp(0, width - 1)
            lv = tok_level.gather(1, col[:, None]).squeeze(1)
            cd = tok_code.gather(1, col[:, None]).squeeze(1)
            step = tab.trie.next_node(node, torch.where(lv == j, cd, torch.full_like(cd, -1)), level=j)
            node = torch.where(j < run, step, node)
        node = torch.where(run > L, torch.full_like(node, -1), node)
        return run, node

    def _check_rows(self, input_ids: torch.Tensor, bad: torch.Tensor) -> None:
        if bool(bad.any()):
            rows = bad.nonzero().flatten()
            shown = rows[:8].tolist()
            start = self.prompt_length
            tail = input_ids[rows[0], start:] if start is not None else input_ids[rows[0], -(self.num_levels + 1):]
            raise ValueError(
                f"SIDTrieLogitsProcessor: rows {shown}{' ...' if rows.numel() > 8 else ''} have generated tokens "
                f"that are not a catalogue SID prefix (row {shown[0]} ends with token ids {tail.tolist()}); "
                f"check prompt_length={self.prompt_length} and the other logits processors")

    def allowed_mask(self, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``Bool[R, vocab_size]``: the tokens each row may emit next (no host synchronisation unless
        ``strict``)."""
        _check_id_tensor("input_ids", input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [R, S], got shape {tuple(input_ids.shape)}")
        if vocab_size < self.min_vocab_size:
            raise ValueError(f"scores have {vocab_size} columns but the SID / end token ids need "
                             f"{self.min_vocab_size}: the model's vocabulary does not contain the SID tokens")
        device = input_ids.device
        tab = self._device_tables(device)
        R, S = input_ids.shape
        L = self.num_levels
        if self.prompt_length is not None:
            level = S - self.prompt_length
            if level < 0:
                raise ValueError(f"input_ids has {S} tokens, fewer than prompt_length={self.prompt_length}: "
                                 f"the processor was built for a longer prompt")
            if level >= L:
                mask = torch.zeros(R, vocab_size, dtype=torch.bool, device=device)
                mask[:, self.end_token_id] = True
                return mask
            node = self._nodes_fixed(tab, input_ids, level)
            if self.strict:
                self._check_rows(input_ids, node < 0)
            mask = torch.zeros(R, vocab_size, dtype=torch.bool, device=device)
            # A dead row (node -1) has no children: only the end token below.
            mask[:, self._per_level_on(device, level)] = tab.trie.child_mask(node, level)
            mask[:, self.end_token_id] = node < 0
            return mask

        level, node = self._nodes_trailing(tab, input_ids)
        done = level == L
        dead = (node < 0) & ~done
        if self.strict:
            self._check_rows(input_ids, dead)
        # Children of any node (mixed levels across rows): codes [R, B], mapped to the level's token ids.
        codes, _, valid = tab.trie.children(node)
        row_level = level.clamp(0, L - 1)[:, None].expand_as(codes)
        tok = tab.level_token_ids[row_level, codes.clamp_min(0)]
        # Invalid slots write into a spare last column that is cut off.
        cols = torch.where(valid, tok, torch.full_like(tok, vocab_size))
        mask = torch.zeros(R, vocab_size + 1, dtype=torch.bool, device=device)
        mask.scatter_(1, cols, True)
        mask = mask[:, :vocab_size]
        mask[:, self.end_token_id] = done | dead
        return mask

    def _per_level_on(self, device: torch.device, level: int) -> torch.Tensor:
        tab = self._device_tables(device)
        return tab.level_token_ids[level, : self.codes_per_level[level]]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Mask (and optionally renormalise) ``scores[R, V]`` given the tokens so far ``input_ids[R, S]``."""
        if scores.dim() != 2 or scores.shape[0] != input_ids.shape[0]:
            raise ValueError(f"scores must be [R, V] with R = {input_ids.shape[0]} rows of input_ids, got "
                             f"{tuple(scores.shape)}")
        mask = self.allowed_mask(input_ids, scores.shape[1])
        masked = scores.masked_fill(~mask, _NEG_INF)
        if self.renormalize:
            return torch.log_softmax(masked.float(), dim=-1).to(scores.dtype)
        return masked

    def __repr__(self) -> str:
        return (f"SIDTrieLogitsProcessor(levels={self.num_levels}, codes_per_level={self.codes_per_level}, "
                f"end_token_id={self.end_token_id}, prompt_length={self.prompt_length}, "
                f"renormalize={self.renormalize}, strict={self.strict})")

    # ------------------------------------------------------------------ reading the result
    def sids(self, sequences: torch.Tensor, prompt_length: Optional[int] = None) -> torch.Tensor:
        """SID codes of generated ``sequences[N, S]`` (see :func:`sids_from_sequences`)."""
        start = self.prompt_length if prompt_length is None else _whole_number("prompt_length", prompt_length)
        if start is None:
            raise ValueError("sids() needs prompt_length (the processor was built without one)")
        return sids_from_sequences(sequences, start, self._per_level, self.trie)


def sids_from_sequences(sequences: torch.Tensor, prompt_length: int,
                        level_token_ids: Union[SIDTokenMap, Sequence[torch.Tensor]],
                        trie: Optional[Trie] = None) -> torch.Tensor:
    """Codes ``LongTensor[N, L]`` of the SID that ``generate`` wrote after ``prompt_length`` in each row.

    Args:
        sequences: ``[N, S]`` output of ``generate`` (``S >= prompt_length + L``).
        prompt_length: position of the first SID token.
        level_token_ids: a :class:`~gflowgr_core.sid.tokens.SIDTokenMap` or the per-level token ids.
        trie: optional; when given, rows whose SID is not in the trie become all ``-1``.
    Returns:
        ``LongTensor[N, L]`` codes; ``-1`` where a token is not the right level's SID token.
    """
    _check_id_tensor("sequences", sequences)
    prompt_length = _whole_number("prompt_length", prompt_length)
    if isinstance(level_token_ids, SIDTokenMap):
        level_token_ids = level_token_ids.level_token_ids
    level_token_ids = [_token_ids(f"level_token_ids[{lv}]", ids) for lv, ids in enumerate(level_token_ids)]
    L = len(level_token_ids)
    if sequences.dim() != 2 or sequences.shape[1] < prompt_length + L:
        raise ValueError(f"sequences must be [N, S] with S >= prompt_length + L = {prompt_length + L}, got "
                         f"{tuple(sequences.shape)}")
    out = []
    for level, ids in enumerate(level_token_ids):
        ids = ids.to(sequences.device).reshape(-1)
        tok = sequences[:, prompt_length + level]
        hit = tok[:, None] == ids[None, :]
        out.append(torch.where(hit.any(1), hit.long().argmax(1), torch.full_like(tok, -1)))
    codes = torch.stack(out, dim=1)
    if trie is not None:
        ok = trie.to(sequences.device).contains(codes.clamp_min(0)) & (codes >= 0).all(1)
        codes = torch.where(ok[:, None], codes, torch.full_like(codes, -1))
    return codes
