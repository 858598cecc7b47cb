"""Mapping between semantic-ID codes and language-model token ids.

A catalogue SID ``(c_1, ..., c_L)`` is written as ``L`` tokens, one per level. Each level has its own
block of ``K_l`` tokens, so the same code value at two levels is two different tokens (the model must
know which level it is emitting). Two layouts exist:

* **from scratch** (a model whose vocabulary is only SIDs): specials ``pad=0, bos=1, eos=2, sep=3``, then
  the SID tokens level by level: level 0 codes ``0..K_0-1`` are ids ``4..4+K_0-1``, and so on.
* **pretrained** (an existing HF tokenizer): the SID tokens are added as ``<a_12>``-style added tokens
  (level letter ``a, b, c, ...``, then the code), the style of LETTER's index files, and their ids are
  whatever the tokenizer assigns.

In both cases ``level_token_ids[l]`` lists the ids of level ``l`` in code order and ``sid_token_ids`` is
their level-major concatenation: exactly the LM-head rows the constrained decoding and loss kernels
gather, so the hot paths never compute full-vocabulary logits.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["SIDTokenMap", "level_letter", "sid_token", "parse_sid_token", "parse_sid", "format_sid",
           "SID_TOKEN_PATTERN"]

_LETTERS = string.ascii_lowercase
#: Regular expression of one SID token such as ``<a_183>``: group 1 the level letter, group 2 the code.
SID_TOKEN_PATTERN = re.compile(r"^<([a-z])_(0|[1-9][0-9]*)>$")

_SPECIAL_NAMES = ("pad", "bos", "eos", "sep")
_FORMAT_VERSION = 1


def level_letter(level: int) -> str:
    """Letter naming SID level ``level`` (0 → ``"a"``, 1 → ``"b"``, ...); at most 26 levels."""
    if not 0 <= level < len(_LETTERS):
        raise ValueError(f"SID level {level} has no letter: SID tokens support levels 0..{len(_LETTERS) - 1}")
    return _LETTERS[level]


def sid_token(level: int, code: int) -> str:
    """The token string of ``code`` at ``level``, e.g. ``sid_token(0, 12) == "<a_12>"``."""
    if code < 0:
        raise ValueError(f"SID code must be >= 0, got {code} at level {level}")
    return f"<{level_letter(level)}_{code}>"


def parse_sid_token(token: str) -> tuple[int, int]:
    """Parse ``"<a_183>"`` into ``(level, code) = (0, 183)``.

    Raises ``ValueError`` for anything that is not exactly one letter ``a``-``z``, an underscore and a
    non-negative decimal code without leading zeros, inside angle brackets.
    """
    if not isinstance(token, str):
        raise ValueError(f"SID token must be a string like '<a_12>', got {type(token).__name__} {token!r}")
    match = SID_TOKEN_PATTERN.match(token)
    if match is None:
        raise ValueError(f"malformed SID token {token!r}: expected '<letter_code>' such as '<a_12>'")
    return _LETTERS.index(match.group(1)), int(match.group(2))


_SID_PIECE = re.compile(r"<([a-z])_(0|[1-9][0-9]*)>")


def parse_sid(text: str) -> tuple[int, ...]:
    """Parse a whole SID string such as ``"<a_130><b_122><c_86>"`` into its codes ``(130, 122, 86)``.

    The string is the concatenation of one token per level, level letters in order from ``a`` (the form of
    MiniOneRec's ``item_sid`` column and of LETTER's index tokens joined). Surrounding whitespace is ignored.

    Raises:
        ValueError: naming the string and the character where it stops being a SID: an empty string, a
            malformed token, a level letter out of order, or text between or after the tokens.
    """
    if not isinstance(text, str):
        raise ValueError(f"SID must be a string like '<a_1><b_2>', got {type(text).__name__} {text!r}")
    body = text.strip()
    if not body:
        raise ValueError(f"empty SID {text!r}: expected tokens like '<a_1><b_2><c_3>'")
    codes: list[int] = []
    at = 0
    while at < len(body):
        match = _SID_PIECE.match(body, at)
        if match is None:
            raise ValueError(f"malformed SID {text!r} at character {at}: expected a token "
                             f"'<{level_letter(len(codes)) if len(codes) < len(_LETTERS) else '?'}_code>' "
                             f"there, found {body[at:at + 12]!r}")
        level = _LETTERS.index(match.group(1))
        if level != len(codes):
            raise ValueError(f"malformed SID {text!r}: token {len(codes)} is {match.group(0)!r}, level letter "
                             f"{match.group(1)!r} out of order (expected {level_letter(len(codes))!r})")
        codes.append(int(match.group(2)))
        at = match.end()
    return tuple(codes)


def format_sid(codes: Sequence[int]) -> str:
    """The SID string of ``codes``: ``format_sid((130, 122, 86)) == "<a_130><b_122><c_86>"`` (inverse of
    :func:`parse_sid`)."""
    return "".join(sid_token(level, int(code)) for level, code in enumerate(codes))


def _check_codes_per_level(codes_per_level: Sequence[int]) -> tuple[int, ...]:
    cpl = tuple(int(k) for k in codes_per_level)
    if len(cpl) == 0:
        raise ValueError("codes_per_level is empty: a SID needs at least one level")
    if any(k < 1 for k in cpl):
        raise ValueError(f"codes_per_level must be positive at every level, got {cpl}")
    if len(cpl) > len(_LETTERS):
        raise ValueError(f"{len(cpl)} SID levels requested; at most {len(_LETTERS)} are supported")
    return cpl


@dataclass(eq=False)
class SIDTokenMap:
    """Token ids of SID codes and special tokens, with vectorised encode/decode.

    Attributes:
        codes_per_level: ``(K_0, ..., K_{L-1})``.
        level_token_ids: per level a ``LongTensor[K_l]``; entry ``c`` is the token id of code ``c``.
        vocab_size: size of the vocabulary the ids live in (the model's embedding needs at least this
            many rows).
        pad_id, bos_id, eos_id, sep_id: special token ids (``sep`` separates items in a prompt).
        kind: ``"scratch"`` or ``"pretrained"``.

    Derived lookup tensors (built in ``__post_init__``):
        sid_token_ids: ``LongTensor[sum K_l]``, level-major concatenation of ``level_token_ids``.
        level_of_token: ``LongTensor[vocab_size]``, the SID level of each token id, ``-1`` if not a SID token.
        code_of_token: ``LongTensor[vocab_size]``, the SID code of each token id, ``-1`` if not a SID token.
    """

    codes_per_level: tuple[int, ...]
    level_token_ids: list[torch.Tensor]
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    sep_id: int
    kind: str = "scratch"

    def __post_init__(self) -> None:
        self.codes_per_level = _check_codes_per_level(self.codes_per_level)
        if self.kind not in ("scratch", "pretrained"):
            raise ValueError(f"kind must be 'scratch' or 'pretrained', got {self.kind!r}")
        if len(self.level_token_ids) != len(self.codes_per_level):
            raise ValueError(f"level_token_ids has {len(self.level_token_ids)} levels, "
                             f"codes_per_level has {len(self.codes_per_level)}")
        self.level_token_ids = [torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
                                for t in self.level_token_ids]
        for level, (ids, k) in enumerate(zip(self.level_token_ids, self.codes_per_level)):
            if ids.numel() != k:
                raise ValueError(f"level {level} has {ids.numel()} token ids, expected K_{level} = {k}")
        self.vocab_size = int(self.vocab_size)
        self.sid_token_ids = torch.cat(self.level_token_ids)
        specials = {name: int(getattr(self, f"{name}_id")) for name in _SPECIAL_NAMES}
        for name, tid in specials.items():
            setattr(self, f"{name}_id", tid)
        all_ids = torch.cat([self.sid_token_ids, torch.tensor(list(specials.values()), dtype=torch.long)])
        if int(all_ids.min()) < 0 or int(all_ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}), found range "
                             f"[{int(all_ids.min())}, {int(all_ids.max())}]")
        if torch.unique(self.sid_token_ids).numel() != self.sid_token_ids.numel():
            raise ValueError("two SID codes map to the same token id")
        special_set = set(specials.values())
        clash = special_set.intersection(self.sid_token_ids.tolist())
        if clash:
            raise ValueError(f"special token id(s) {sorted(clash)} are also SID token ids")

        self.level_of_token = torch.full((self.vocab_size,), -1, dtype=torch.long)
        self.code_of_token = torch.full((self.vocab_size,), -1, dtype=torch.long)
        k_max = max(self.codes_per_level)
        # Padded [L, K_max] table so encode is a single gather; -1 marks codes beyond K_l.
        self._code_to_token = torch.full((self.num_levels, k_max), -1, dtype=torch.long)
        for level, ids in enumerate(self.level_token_ids):
            self.level_of_token[ids] = level
            self.code_of_token[ids] = torch.arange(ids.numel())
            self._code_to_token[level, : ids.numel()] = ids
        self._k_tensor = torch.tensor(self.codes_per_level, dtype=torch.long)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scratch(cls, codes_per_level: Sequence[int]) -> "SIDTokenMap":
        """Vocabulary of a model that only speaks SIDs: ``pad=0, bos=1, eos=2, sep=3``, then level-major SIDs."""
        cpl = _check_codes_per_level(codes_per_level)
        offsets = [4]
        for k in cpl:
            offsets.append(offsets[-1] + k)
        level_ids = [torch.arange(offsets[l], offsets[l + 1], dtype=torch.long) for l in range(len(cpl))]
        return cls(codes_per_level=cpl, level_token_ids=level_ids, vocab_size=offsets[-1],
                   pad_id=0, bos_id=1, eos_id=2, sep_id=3, kind="scratch")

    @classmethod
    def for_pretrained(cls, tokenizer, codes_per_level: Sequence[int]) -> "SIDTokenMap":
        """Add ``<a_0>``...``<a_{K_0-1}>``, ``<b_0>``... as added tokens to a HF tokenizer and record their ids.

        The tokenizer is modified in place. Tokens it already has (a tokenizer saved after a previous call)
        are reused, so calling this twice is harmless. Special tokens come from the tokenizer's own
        ``pad/bos/eos/sep`` tokens; any it lacks is added as a special token ``<|sid_pad|>``,
        ``<|sid_bos|>``, ``<|sid_eos|>`` or ``<|sid_sep|>`` (the tokenizer's ``pad_token`` etc. attributes
        are left unchanged). Call :meth:`resize` on the model afterwards.

        Args:
            tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``).
            codes_per_level: ``(K_0, ..., K_{L-1})``.
        """
        from tokenizers import AddedToken  # transformers depends on tokenizers

        cpl = _check_codes_per_level(codes_per_level)
        sid_strings = [sid_token(level, code) for level, k in enumerate(cpl) for code in range(k)]
        # normalized=False keeps the token matched verbatim whatever the tokenizer's normaliser does.
        tokenizer.add_tokens([AddedToken(s, single_word=False, normalized=False, special=False)
                              for s in sid_strings])
        special_ids = {}
        for name in _SPECIAL_NAMES:
            tid = getattr(tokenizer, f"{name}_token_id", None)
            if tid is None:
                token = f"<|sid_{name}|>"
                tokenizer.add_tokens([AddedToken(token, normalized=False, special=True)], special_tokens=True)
                tid = tokenizer.convert_tokens_to_ids(token)
            special_ids[name] = int(tid)
        ids = tokenizer.convert_tokens_to_ids(sid_strings)
        unk = getattr(tokenizer, "unk_token_id", None)
        for s, tid in zip(sid_strings, ids):
            if tid is None or (unk is not None and tid == unk):
                raise ValueError(f"tokenizer did not register SID token {s!r} (got id {tid})")
        level_ids, start = [], 0
        for k in cpl:
            level_ids.append(torch.tensor(ids[start:start + k], dtype=torch.long))
            start += k
        vocab_size = max(len(tokenizer), max(ids) + 1, max(special_ids.values()) + 1)
        return cls(codes_per_level=cpl, level_token_ids=level_ids, vocab_size=vocab_size,
                   pad_id=special_ids["pad"], bos_id=special_ids["bos"], eos_id=special_ids["eos"],
                   sep_id=special_ids["sep"], kind="pretrained")

    # ------------------------------------------------------------------ properties
    @property
    def num_levels(self) -> int:
        """Number of SID levels ``L``."""
        return len(self.codes_per_level)

    @property
    def num_sid_tokens(self) -> int:
        """``sum_l K_l``."""
        return int(self.sid_token_ids.numel())

    @property
    def code_offsets(self) -> list[int]:
        """Start of each level's codes inside ``sid_token_ids`` (length ``L + 1``): row offsets, not the trie's
        node offsets ``Trie.level_offsets``."""
        out = [0]
        for k in self.codes_per_level:
            out.append(out[-1] + k)
        return out

    def token_strings(self) -> list[str]:
        """The ``<a_12>``-style strings of ``sid_token_ids``, in the same level-major order."""
        return [sid_token(level, code) for level, k in enumerate(self.codes_per_level) for code in range(k)]

    # ------------------------------------------------------------------ model
    def resize(self, model, pad_to_multiple_of: int | None = None) -> int:
        """Grow the model's input embeddings (and a tied or untied LM head) to hold every token id.

        Never shrinks: a model whose embedding already has ``>= vocab_size`` rows (pretrained models often
        pad their vocabulary) is left as is. New rows are initialised by ``transformers``
        (``resize_token_embeddings``, mean of the existing rows). Returns the resulting number of rows.
        """
        rows = model.get_input_embeddings().weight.shape[0]
        if rows >= self.vocab_size:
            return int(rows)
        model.resize_token_embeddings(self.vocab_size, pad_to_multiple_of=pad_to_multiple_of)
        rows = model.get_input_embeddings().weight.shape[0]
        out = model.get_output_embeddings()
        if out is not None and out.weight.shape[0] < self.vocab_size:
            raise RuntimeError(f"LM head has {out.weight.shape[0]} rows after resizing, expected >= "
                               f"{self.vocab_size}")
        return int(rows)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """SID codes → token ids.

        Args:
            codes: integer tensor ``[..., L]``, code of level ``l`` in the last dimension's slot ``l``.
        Returns:
            ``LongTensor[..., L]`` on the same device as ``codes``.
        Raises:
            ValueError naming the first offending position when a code is outside ``[0, K_l)``.
        """
        codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() == 0 or codes.shape[-1] != self.num_levels:
            raise ValueError(f"codes must have shape [..., {self.num_levels}], got {tuple(codes.shape)}")
        codes = codes.long()
        k = self._k_tensor.to(codes.device)
        bad = (codes < 0) | (codes >= k)
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            level = pos[-1]
            raise ValueError(f"SID code {int(codes[pos])} at position {pos} is outside level {level}'s "
                             f"range [0, {self.codes_per_level[level]})")
        table = self._code_to_token.to(codes.device)
        levels = torch.arange(self.num_levels, device=codes.device).expand_as(codes)
        return table[levels, codes]

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids → SID codes.

        Args:
            ids: integer tensor ``[..., L]``: each trailing row must be one token of level 0, then level 1, ...
        Returns:
            ``LongTensor[..., L]`` of codes, on the same device as ``ids``.
        Raises:
            ValueError naming the first offending position for a non-SID token or a token of the wrong level.
        """
        ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() == 0 or ids.shape[-1] != self.num_levels:
            raise ValueError(f"token ids must have shape [..., {self.num_levels}], got {tuple(ids.shape)}")
        ids = ids.long()
        out_of_vocab = (ids < 0) | (ids >= self.vocab_size)
        if bool(out_of_vocab.any()):
            pos = tuple(int(i) for i in out_of_vocab.nonzero()[0])
            raise ValueError(f"token id {int(ids[pos])} at position {pos} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        level_of = self.level_of_token.to(ids.device)[ids]
        expected = torch.arange(self.num_levels, device=ids.device).expand_as(ids)
        wrong = level_of != expected
        if bool(wrong.any()):
            pos = tuple(int(i) for i in wrong.nonzero()[0])
            got = int(level_of[pos])
            what = "is not a SID token" if got < 0 else f"is a level-{got} SID token"
            raise ValueError(f"token id {int(ids[pos])} at position {pos} {what}; expected a level-{pos[-1]} "
                             f"SID token")
        return self.code_of_token.to(ids.device)[ids]

    # ------------------------------------------------------------------ device / persistence
    def to(self, device) -> "SIDTokenMap":
        """A copy whose lookup tensors live on ``device`` (for use inside device-side decoding loops)."""
        other = SIDTokenMap.__new__(SIDTokenMap)
        other.__dict__.update(self.__dict__)
        for name in ("sid_token_ids", "level_of_token", "code_of_token", "_code_to_token", "_k_tensor"):
            setattr(other, name, getattr(self, name).to(device))
        other.level_token_ids = [t.to(device) for t in self.level_token_ids]
        return other

    def to_dict(self) -> dict:
        """JSON-serialisable description (inverse of :meth:`from_dict`)."""
        return {
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "codes_per_level": list(self.codes_per_level),
            "level_token_ids": [t.tolist() for t in self.level_token_ids],
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "sep_id": self.sep_id,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "SIDTokenMap":
        """Rebuild a map from :meth:`to_dict` output; ``source`` names the origin in error messages."""
        required = ("codes_per_level", "level_token_ids", "vocab_size", "pad_id", "bos_id", "eos_id", "sep_id")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{source}: SID token map is missing field(s) {missing}")
        version = data.get("format_version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported SID token map format_version {version}")
        try:
            return cls(codes_per_level=tuple(data["codes_per_level"]),
                       level_token_ids=[torch.tensor(x, dtype=torch.long) for x in data["level_token_ids"]],
                       vocab_size=data["vocab_size"], pad_id=data["pad_id"], bos_id=data["bos_id"],
                       eos_id=data["eos_id"], sep_id=data["sep_id"], kind=data.get("kind", "scratch"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid SID token map: {exc}") from exc

    def save(self, path: str | Path) -> None:
        """Write the map as JSON to ``path`` (a file path)."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "SIDTokenMap":
        """Read a map written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ``ValueError`` unless ``tokenizer`` maps every ``<a_12>`` token to the recorded id.

        Use after loading a saved pretrained map together with a saved tokenizer.
        """
        strings = self.token_strings()
        got = tokenizer.convert_tokens_to_ids(strings)
        expected = self.sid_token_ids.tolist()
        for s, g, e in zip(strings, got, expected):
            if g != e:
                raise ValueError(f"tokenizer maps {s!r} to id {g}, the SID token map expects {e}")
