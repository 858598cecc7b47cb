"""The item catalogue: every item's semantic ID (SID).

A :class:`Catalog` holds ``codes: LongTensor[n_items, L]`` (row ``i`` is the SID of internal item ``i``),
the codebook size of each level and the raw item ids. Semantic IDs built from content or collaborative
embeddings are not always unique (LETTER's Beauty index gives 13 more items than distinct SIDs). Two
policies handle that:

* ``"share"``: keep the SIDs as they are; a trie leaf may then hold several items, and decoding a shared
  SID recommends all of them.
* ``"suffix"``: append one level whose code tells apart the items that share the base SID (``0, 1, 2, ...``
  in item order, TIGER's convention); its codebook size is the largest group size, and every SID becomes
  unique.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..data.loaders import JSONPairs
from .tokens import level_letter, parse_sid_token

__all__ = ["Catalog", "COLLISION_POLICIES"]

COLLISION_POLICIES = ("share", "suffix")
_CODES_FILE = "catalog_codes.pt"
_META_FILE = "catalog.json"
_FORMAT_VERSION = 1


def _group_ranks(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each row among identical rows, in row order, and the size of each row's group.

    Args:
        codes: ``LongTensor[N, L]``.
    Returns:
        ``(rank[N], group_size[N])``: ``rank[i]`` is how many earlier rows equal row ``i``.
    """
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(inverse)
    rank[order] = torch.arange(codes.shape[0], device=codes.device) - starts[inverse[order]]
    return rank, counts[inverse]


@dataclass(eq=False)
class Catalog:
    """Item → SID table.

    Attributes:
        codes: ``LongTensor[n_items, L]``; under ``"suffix"`` the last column is the disambiguation level.
        codes_per_level: ``(K_0, ..., K_{L-1})``; codes of level ``l`` lie in ``[0, K_l)``.
        item_ids: raw item id of each internal item (``len == n_items``).
        collisions: ``"share"`` or ``"suffix"``.
        base_levels: number of levels before any suffix (``L`` under ``"share"``, ``L - 1`` under ``"suffix"``).
        provenance: free-form JSON-serialisable description of how the SIDs were made (saved with the catalogue).

    Build with :meth:`from_codes` or :meth:`from_letter_index`, which apply the collision policy; the
    plain constructor takes final codes as they are and only validates them.
    """

    codes: torch.Tensor
    codes_per_level: tuple[int, ...]
    item_ids: list[str]
    collisions: str = "share"
    base_levels: int | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        codes = torch.as_tensor(self.codes)
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"SID codes must be integers, got dtype {codes.dtype}")
        if codes.dim() != 2:
            raise ValueError(f"SID codes must be [n_items, L], got shape {tuple(codes.shape)}")
        self.codes = codes.long().cpu().contiguous()
        self.codes_per_level = tuple(int(k) for k in self.codes_per_level)
        self.item_ids = [str(x) for x in self.item_ids]
        n, num_levels = self.codes.shape
        if self.collisions not in COLLISION_POLICIES:
            raise ValueError(f"collisions must be one of {COLLISION_POLICIES}, got {self.collisions!r}")
        if len(self.codes_per_level) != num_levels:
            raise ValueError(f"codes have {num_levels} levels but codes_per_level has "
                             f"{len(self.codes_per_level)}: {self.codes_per_level}")
        if any(k < 1 for k in self.codes_per_level):
            raise ValueError(f"codes_per_level must be positive, got {self.codes_per_level}")
        if len(self.item_ids) != n:
            raise ValueError(f"{n} SID rows but {len(self.item_ids)} item ids")
        if len(set(self.item_ids)) != n:
            seen, dup = set(), None
            for x in self.item_ids:
                if x in seen:
                    dup = x
                    break
                seen.add(x)
            raise ValueError(f"item ids must be unique; {dup!r} appears more than once")
        if n == 0:
            raise ValueError("a catalogue needs at least one item")
        k = torch.tensor(self.codes_per_level, dtype=torch.long)
        bad = (self.codes < 0) | (self.codes >= k)
        if bool(bad.any()):
            row, level = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"item {self.item_ids[row]!r} (index {row}) has code {int(self.codes[row, level])} "
                             f"at level {level}, outside [0, {self.codes_per_level[level]})")
        if self.base_levels is None:
            self.base_levels = num_levels - 1 if self.collisions == "suffix" else num_levels
        self.base_levels = int(self.base_levels)
        expected_base = num_levels - 1 if self.collisions == "suffix" else num_levels
        if self.base_levels != expected_base or self.base_levels < 1:
            raise ValueError(f"base_levels={self.base_levels} is inconsistent with {num_levels} levels under "
                             f"collisions={self.collisions!r} (expected {expected_base}, at least 1)")
        if self.collisions == "suffix":
            distinct = torch.unique(self.codes, dim=0).shape[0]
            if distinct != n:
                raise ValueError(f"collisions='suffix' but {n - distinct} items still share a SID")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, codes, codes_per_level: Sequence[int], item_ids: Sequence, collisions: str = "share",
                   provenance: dict | None = None) -> "Catalog":
        """Catalogue from base SIDs, applying the collision policy.

        Args:
            codes: integer ``[n_items, L]`` (tensor or array): the base SIDs, one row per internal item.
            codes_per_level: ``(K_0, ..., K_{L-1})`` of the base levels.
            item_ids: raw id of each row.
            collisions: ``"share"`` keeps SIDs as given; ``"suffix"`` appends a disambiguation level.
            provenance: optional description stored with the catalogue.
        """
        if collisions not in COLLISION_POLICIES:
            raise ValueError(f"collisions must be one of {COLLISION_POLICIES}, got {collisions!r}")
        base = cls(codes=codes, codes_per_level=codes_per_level, item_ids=list(item_ids), collisions="share",
                   provenance=dict(provenance or {}))
        if collisions == "share":
            return base
        rank, _ = _group_ranks(base.codes)
        k_suffix = int(rank.max()) + 1  # the largest group size, at least 1
        return cls(codes=torch.cat([base.codes, rank[:, None]], dim=1),
                   codes_per_level=base.codes_per_level + (k_suffix,), item_ids=base.item_ids,
                   collisions="suffix", base_levels=base.codes.shape[1], provenance=base.provenance)

    @classmethod
    def from_letter_index(cls, path: str | Path, item_ids: Sequence, codes_per_level: Sequence[int] | None = None,
                          collisions: str = "share") -> "Catalog":
        """Read a LETTER-style index ``{"item_id": ["<a_183>", "<b_70>", "<c_232>", "<d_6>"], ...}``.

        Args:
            path: the ``*.index.json`` file.
            item_ids: raw ids of the catalogue's items in internal order (``Interactions.item_ids``); row
                ``i`` of the result is the SID of ``item_ids[i]``.
            codes_per_level: codebook sizes; by default per level 256 when every code of the level is
                below 256, else its largest code + 1.
            collisions: ``"share"`` or ``"suffix"``.
        Raises:
            ValueError naming the file and the item for an item of ``item_ids`` with no SID, a SID whose
            length differs from the others (or from ``codes_per_level``), a malformed token, a level letter
            out of order, or a code outside ``codes_per_level``.
        Items present in the index but absent from ``item_ids`` are ignored, with a warning giving their count.
        """
        path = Path(path)
        index = _read_letter_index(path)
        item_ids = [str(x) for x in item_ids]
        sids = _item_sids(path, index, item_ids)
        if codes_per_level is not None:
            num_levels = len(codes_per_level)
        else:
            # The most common length is the reference, so one odd item is the one named in the error.
            lengths = [len(sid) for sid in sids]
            num_levels = max(set(lengths), key=lengths.count) if lengths else 0
        codes = [_parse_sid(path, item, sid, num_levels) for item, sid in zip(item_ids, sids)]
        extra = len(index) - len(item_ids)
        if extra > 0:
            warnings.warn(f"{path}: {extra} item(s) in the SID index do not appear in the interactions "
                          f"and are ignored", stacklevel=2)
        codes_t = torch.tensor(codes, dtype=torch.long).reshape(len(item_ids), num_levels)
        codes_per_level = _letter_codes_per_level(path, codes_t, item_ids, codes_per_level)
        return cls.from_codes(codes_t, codes_per_level, item_ids, collisions=collisions,
                              provenance={"source": "letter_index", "path": str(path)})

    # ------------------------------------------------------------------ views
    @property
    def num_items(self) -> int:
        """Number of items ``n_items``."""
        return int(self.codes.shape[0])

    @property
    def num_levels(self) -> int:
        """Number of SID levels ``L`` (including the suffix level, if any)."""
        return int(self.codes.shape[1])

    @property
    def base_codes(self) -> torch.Tensor:
        """``LongTensor[n_items, base_levels]``: the SIDs before any disambiguation suffix."""
        return self.codes[:, : self.base_levels]

    def stats(self) -> dict:
        """Summary of the SIDs.

        Returns a dict with:
            ``num_items``, ``collision_policy``;
            ``sid_levels`` (``L``, with suffix), ``sid_codes_per_level`` (list of ``K_l``), ``base_levels``;
            on the base levels (the tokenisation itself): ``sid_collisions`` (items − distinct SIDs),
            ``shared_sids`` (SIDs held by more than one item), ``items_in_shared_sids``,
            ``max_items_per_base_sid``;
            on the final codes (what the trie holds): ``distinct_sids``, ``max_items_per_sid``;
            per level ``l`` (lists of length ``L``): ``codebook_usage`` (distinct codes used / ``K_l``),
            ``codes_used``, ``distinct_prefixes`` (distinct prefixes of length ``l + 1``).
        """
        base = self.base_codes
        _, base_counts = torch.unique(base, dim=0, return_counts=True)
        _, final_counts = torch.unique(self.codes, dim=0, return_counts=True)
        shared = base_counts > 1
        codes_used = [int(torch.unique(self.codes[:, l]).numel()) for l in range(self.num_levels)]
        prefixes = [int(torch.unique(self.codes[:, : l + 1], dim=0).shape[0]) for l in range(self.num_levels)]
        return {
            "num_items": self.num_items,
            "collision_policy": self.collisions,
            "sid_levels": self.num_levels,
            "sid_codes_per_level": list(self.codes_per_level),
            "base_levels": self.base_levels,
            "sid_collisions": self.num_items - int(base_counts.numel()),
            "shared_sids": int(shared.sum()),
            "items_in_shared_sids": int(base_counts[shared].sum()),
            "max_items_per_base_sid": int(base_counts.max()),
            "distinct_sids": int(final_counts.numel()),
            "max_items_per_sid": int(final_counts.max()),
            "codes_used": codes_used,
            "codebook_usage": [u / k for u, k in zip(codes_used, self.codes_per_level)],
            "distinct_prefixes": prefixes,
        }

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Write ``catalog_codes.pt`` (the codes tensor) and ``catalog.json`` (metadata) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"codes": self.codes}, directory / _CODES_FILE)
        meta = {
            "format_version": _FORMAT_VERSION,
            "codes_per_level": list(self.codes_per_level),
            "collisions": self.collisions,
            "base_levels": self.base_levels,
            "num_items": self.num_items,
            "item_ids": self.item_ids,
            "provenance": self.provenance,
        }
        (directory / _META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> "Catalog":
        """Read a catalogue written by :meth:`save`."""
        directory = Path(directory)
        meta_path, codes_path = directory / _META_FILE, directory / _CODES_FILE
        for p in (meta_path, codes_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: catalogue file missing (expected the output of Catalog.save)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported catalogue format_version {meta.get('format_version')}")
        payload = torch.load(codes_path, map_location="cpu", weights_only=True)
        codes = payload.get("codes") if isinstance(payload, dict) else None
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"{codes_path}: expected a dict with a 'codes' tensor")
        if codes.shape[0] != meta.get("num_items"):
            raise ValueError(f"{codes_path}: {codes.shape[0]} rows but {meta_path} says "
                             f"{meta.get('num_items')} items")
        try:
            return cls(codes=codes, codes_per_level=tuple(meta["codes_per_level"]), item_ids=meta["item_ids"],
                       collisions=meta["collisions"], base_levels=meta["base_levels"],
                       provenance=meta.get("provenance", {}))
        except KeyError as exc:
            raise ValueError(f"{meta_path}: missing field {exc}") from exc


# ------------------------------------------------------------------ LETTER index reading
def _read_letter_index(path: Path) -> dict:
    """The ``{item_id: SID tokens}`` object of a LETTER ``*.index.json``; an item listed twice is an error."""
    try:
        with open(path) as fh:
            # Pairs rather than a dict: json would silently keep only the last of duplicated keys.
            parsed = json.load(fh, object_pairs_hook=JSONPairs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(parsed, JSONPairs):
        raise ValueError(f"{path}: expected a JSON object mapping item id to a list of SID tokens, "
                         f"got {type(parsed).__name__}")
    index: dict = {}
    for key, value in parsed:
        if key in index:
            raise ValueError(f"{path}: item {key!r} appears more than once in the SID index")
        index[key] = value
    return index


def _item_sids(path: Path, index: dict, item_ids: list[str]) -> list[list]:
    """The token list of each of ``item_ids``, in that order; every item must have one."""
    missing = [x for x in item_ids if x not in index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} item(s) have no SID, first {missing[0]!r}"
                         + (f" (also {missing[1:4]})" if len(missing) > 1 else ""))
    sids = []
    for item in item_ids:
        sid = index[item]
        if isinstance(sid, JSONPairs) or not isinstance(sid, list):
            raise ValueError(f"{path}: item {item!r}: SID must be a list of tokens, got {sid!r}")
        sids.append(sid)
    return sids


def _parse_sid(path: Path, item: str, sid: list, num_levels: int) -> list[int]:
    """The codes of one item's tokens (``["<a_183>", "<b_70>", ...]``): ``num_levels`` of them, with level
    letters in order."""
    if len(sid) != num_levels:
        raise ValueError(f"{path}: item {item!r}: SID {sid} has {len(sid)} token(s), expected {num_levels}")
    codes = []
    for position, token in enumerate(sid):
        try:
            level, code = parse_sid_token(token)
        except ValueError as exc:
            raise ValueError(f"{path}: item {item!r}: token {position}: {exc}") from None
        if level != position:
            raise ValueError(f"{path}: item {item!r}: token {position} is {token!r}, level letter "
                             f"{level_letter(level)!r} out of order (expected {level_letter(position)!r})")
        codes.append(code)
    return codes


def _letter_codes_per_level(path: Path, codes: torch.Tensor, item_ids: list[str],
                            codes_per_level: Sequence[int] | None) -> tuple[int, ...]:
    """``codes_per_level`` checked against ``codes[n_items, L]``, or by default per level 256 when every
    code of the level is below 256, else its largest code + 1."""
    if codes_per_level is None:
        max_code = codes.max(dim=0).values.tolist() if len(item_ids) else [0] * codes.shape[1]
        return tuple(256 if m < 256 else m + 1 for m in max_code)
    codes_per_level = tuple(int(k) for k in codes_per_level)
    bad = codes >= torch.tensor(codes_per_level, dtype=torch.long)
    if bool(bad.any()):
        row, level = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{path}: item {item_ids[row]!r}: code {int(codes[row, level])} at level "
                         f"{level_letter(level)!r} is outside [0, {codes_per_level[level]})")
    return codes_per_level
