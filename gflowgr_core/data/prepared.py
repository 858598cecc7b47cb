"""The prepared-dataset folder: everything training and evaluation read, built once by ``gflowgr prepare``.

Layout of ``DIR``::

    stats.json      counts and SID/trie statistics (the numbers a user checks first)
    items.json      raw item ids, index = internal item id
    users.json      raw user ids, index = the user number in the split tensors
    split.pt        train / valid / test tensors (history, target, user)
    catalog/        the SID catalogue (Catalog.save)
    trie.pt         the device trie tables
    tokens.json     the from-scratch SID token map
    popularity.pt   item interaction counts in the training part (exposure metrics)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gflowgr_core.data.formats import load_interactions
from gflowgr_core.data.loaders import Interactions, letter_paths
from gflowgr_core.data.split import SplitData, Split, kcore_filter, leave_one_out
from gflowgr_core.metrics import item_popularity
from gflowgr_core.sid.catalog import Catalog
from gflowgr_core.sid.tokenizer import build_catalog
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.sid.trie import Trie

log = logging.getLogger("gflowgr")

FORMATS = ("letter", "p5", "csv", "minionerec", "ml100k")


@dataclass
class PreparedData:
    """A prepared dataset in memory: split tensors, SID catalogue, trie, token map and item popularity."""

    split: SplitData
    catalog: Catalog
    trie: Trie
    tokens: SIDTokenMap
    popularity: torch.Tensor
    item_ids: list[str]
    user_ids: list[str]
    stats: dict

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps(self.stats, indent=2) + "\n")
        (out / "items.json").write_text(json.dumps(self.item_ids))
        (out / "users.json").write_text(json.dumps(self.user_ids))
        torch.save({name: _split_tensors(getattr(self.split, name)) for name in ("train", "valid", "test")}
                   | {"num_users": self.split.num_users, "num_items": self.split.num_items,
                      "max_history": self.split.max_history, "dropped_users": self.split.dropped_users},
                   out / "split.pt")
        self.catalog.save(out / "catalog")
        torch.save(self.trie.state_dict(), out / "trie.pt")
        self.tokens.save(out / "tokens.json")
        torch.save(self.popularity, out / "popularity.pt")
        return out

    @classmethod
    def load(cls, path: str | Path) -> "PreparedData":
        """Load a folder written by :func:`prepare`; names the missing file when the folder is incomplete."""
        path = Path(path)
        needed = ("stats.json", "items.json", "users.json", "split.pt", "catalog", "trie.pt", "tokens.json",
                  "popularity.pt")
        missing = [name for name in needed if not (path / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a prepared dataset folder: missing {', '.join(missing)} "
                f"(create it with `gflowgr prepare --format ... --path ... --out {path}`)")
        raw = torch.load(path / "split.pt", weights_only=True)
        split = SplitData(train=Split(**raw["train"]), valid=Split(**raw["valid"]), test=Split(**raw["test"]),
                          num_users=raw["num_users"], num_items=raw["num_items"],
                          max_history=raw["max_history"], dropped_users=raw["dropped_users"])
        return cls(split=split, catalog=Catalog.load(path / "catalog"),
                   trie=Trie.from_state_dict(torch.load(path / "trie.pt", weights_only=True)),
                   tokens=SIDTokenMap.load(path / "tokens.json"),
                   popularity=torch.load(path / "popularity.pt", weights_only=True),
                   item_ids=json.loads((path / "items.json").read_text()),
                   user_ids=json.loads((path / "users.json").read_text()),
                   stats=json.loads((path / "stats.json").read_text()))


def _split_tensors(split: Split) -> dict:
    return {"history": split.history, "target": split.target, "user": split.user}


#: Formats whose SIDs are read from an ``X.index.json`` rather than built by RQ-KMeans.
GIVEN_SID_FORMATS = ("letter", "minionerec")
DEFAULT_LEVELS, DEFAULT_CODES = 3, 256
_MAX_BUILT_LEVELS = 25  # level letters a..z, one kept for the collision suffix


def _positive_int(name: str, value, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}{hint}")
    return value


def check_prepare_options(fmt: str, levels: int | None, codes: int | None, collisions: str | None, kcore: int,
                          max_history: int, embeddings, max_users: int | None,
                          columns: dict[str, str | None]) -> tuple[int, int, str]:
    """Check the options of :func:`prepare` before any data is read; returns ``(levels, codes, collisions)``
    with the defaults filled in.

    Raises:
        ValueError: naming the option and its value (``levels``/``codes`` out of range, an unknown format or
            collision policy, column names for a format other than ``csv``, a missing embeddings file).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if fmt in GIVEN_SID_FORMATS:
        given = [f"{k}={v}" for k, v in (("levels", levels), ("codes", codes)) if v is not None]
        if given:
            log.warning("prepare: %s ignored: format %r keeps the SIDs of its X.index.json (levels and codes "
                        "are read from it)", ", ".join(given), fmt)
    levels = DEFAULT_LEVELS if levels is None else levels
    codes = DEFAULT_CODES if codes is None else codes
    _positive_int("levels", levels, 1)
    if levels > _MAX_BUILT_LEVELS:
        raise ValueError(f"levels={levels}: at most {_MAX_BUILT_LEVELS} (SID tokens are named by the letters "
                         f"a..z, one is kept for the collision suffix)")
    _positive_int("codes", codes, 2, " (codes per level; a level of one code tells no items apart)")
    if collisions is None:  # given SIDs are evaluated with shared SIDs; built SIDs collide far more often
        collisions = "share" if fmt in GIVEN_SID_FORMATS else "suffix"
    if collisions not in ("share", "suffix"):
        raise ValueError(f"unknown collision policy {collisions!r}; expected 'share' or 'suffix'")
    _positive_int("kcore", kcore, 0)
    _positive_int("max_history", max_history, 1)
    if max_users is not None:
        _positive_int("max_users", max_users, 1)
    named = {k: v for k, v in columns.items() if v is not None}
    if named and fmt != "csv":
        raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in named.items())}: column names are only for "
                         f"--format csv, not {fmt!r}")
    if embeddings is not None and fmt in GIVEN_SID_FORMATS:
        raise ValueError(f"embeddings={str(embeddings)!r}: format {fmt!r} keeps the SIDs of its index; "
                         f"embeddings only serve SIDs built by RQ-KMeans")
    if isinstance(embeddings, (str, Path)) and not Path(embeddings).is_file():
        raise FileNotFoundError(f"embeddings file {embeddings} does not exist")
    return levels, codes, collisions


def prepare(fmt: str, path: str | Path | None, out: str | Path | None = None, *, levels: int | None = None,
            codes: int | None = None, collisions: str | None = None, kcore: int = 0, max_history: int = 20,
            embeddings: str | Path | None = None, seed: int = 0, dense_levels: int = 2,
            max_users: int | None = None, user_col: str | None = None, item_col: str | None = None,
            time_col: str | None = None) -> PreparedData:
    """Load interactions, split them leave-one-out, build the SID catalogue and trie, and (if ``out``) save.

    ``fmt`` is one of :data:`FORMATS`. For ``letter`` and ``minionerec`` the SIDs come from ``X.index.json``,
    kept as given (``levels`` and ``codes`` are then read from the index); for the other formats they are
    built by RQ-KMeans (``levels`` default 3, ``codes`` default 256 per level) over ``embeddings`` (a
    ``.npy`` file, one row per item in internal order) or, by default, over collaborative embeddings
    computed from the training part of the sequences only (validation and test items never inform the
    SIDs). ``collisions`` defaults to ``share`` for given SIDs (as LETTER evaluates them) and to ``suffix``
    for built SIDs, where collisions are common and a shared SID would recommend all of its items at once.
    ``max_users`` keeps only the first N users of the file (quick experiments and tests); the item
    catalogue stays whole, so every item can still be recommended. ``user_col``, ``item_col`` and
    ``time_col`` name the columns of a ``csv`` file (by default the usual names are looked for).
    ``minionerec`` rows are chained into per-user sequences, see :mod:`gflowgr_core.data.minionerec`.

    Every option is checked before any data is read; the stages (loading, split, embeddings, RQ-KMeans
    level by level, trie) are logged at INFO level (``gflowgr prepare`` shows them).
    """
    columns = {"user_col": user_col, "item_col": item_col, "time_col": time_col}
    levels, codes, collisions = check_prepare_options(fmt, levels, codes, collisions, kcore, max_history,
                                                      embeddings, max_users, columns)
    begin = time.perf_counter()
    log.info("prepare [1/4] loading %s data from %s", fmt, path if path is not None else "the recbole wheel")
    options = {k: v for k, v in columns.items() if v is not None}
    rows_per_file = None
    if fmt == "minionerec":  # read here rather than by name, to report the rows of each file
        from gflowgr_core.data.minionerec import load_minionerec, minionerec_files

        files = minionerec_files(path)
        interactions = load_minionerec(path, files)
        rows_per_file = dict(files.rows)
    else:
        interactions = load_interactions(fmt, path, **options) if options else load_interactions(fmt, path)
    log.info("prepare: loaded %d users, %d items, %d interactions (%.1f s)", interactions.num_users,
             interactions.num_items, interactions.num_interactions, time.perf_counter() - begin)
    if max_users is not None:
        interactions = Interactions(user_ids=interactions.user_ids[:max_users], item_ids=interactions.item_ids,
                                    sequences=interactions.sequences[:max_users], source=interactions.source)
    if kcore > 1:
        interactions, report = kcore_filter(interactions, kcore)
        log.info("k-core filter (k=%d): %s", kcore, report)
    log.info("prepare [2/4] leave-one-out split (history of up to %d items)", max_history)
    split = leave_one_out(interactions, max_history=max_history)
    if fmt in GIVEN_SID_FORMATS:
        index_path = _index_path(fmt, path)
        log.info("prepare [3/4] SIDs as given in %s", index_path)
        catalog = Catalog.from_letter_index(index_path, interactions.item_ids, collisions=collisions)
    else:
        train_only = Interactions(user_ids=interactions.user_ids, item_ids=interactions.item_ids,
                                  sequences=[seq[:-2] for seq in interactions.sequences],
                                  source=interactions.source)
        log.info("prepare [3/4] SIDs: %s, then RQ-KMeans %d levels x %d codes",
                 f"embeddings from {embeddings}" if embeddings is not None else
                 "collaborative item embeddings from the training part", levels, codes)
        catalog = build_catalog(train_only, levels=levels, codes=codes, collisions=collisions,
                                embeddings=embeddings, seed=seed)
    log.info("prepare [4/4] trie and token map over %d SID levels %s", len(catalog.codes_per_level),
             list(catalog.codes_per_level))
    trie = Trie.build(catalog.codes, catalog.codes_per_level, dense_levels=dense_levels)
    tokens = SIDTokenMap.from_scratch(catalog.codes_per_level)
    split_stats = split.stats()
    catalog_stats = catalog.stats()
    stats = {
        "source": str(interactions.source),
        "format": fmt,
        **({"rows_per_file": rows_per_file} if rows_per_file is not None else {}),
        "num_users": len(interactions.user_ids),
        "num_items": len(interactions.item_ids),
        "num_interactions": int(interactions.num_interactions),
        "items_without_interactions": int(interactions.num_items - _items_seen(interactions)),
        "num_train_examples": split_stats["num_train_examples"],
        "num_valid": split_stats["num_valid"],
        "num_test": split_stats["num_test"],
        "dropped_users": split.dropped_users,
        "max_history": max_history,
        "max_users": max_users,
        "kcore": kcore,
        "sid_levels": len(catalog.codes_per_level),
        "sid_codes_per_level": list(catalog.codes_per_level),
        "sid_collisions": catalog_stats["sid_collisions"],
        "sid_collision_policy": collisions,
        "catalog": catalog_stats,
        "trie_nodes_per_level": trie.stats()["nodes_per_level"],
        "trie": trie.stats(),
        "vocab_size": tokens.vocab_size,
    }
    data = PreparedData(split=split, catalog=catalog, trie=trie, tokens=tokens,
                        popularity=item_popularity(split), item_ids=list(interactions.item_ids),
                        user_ids=list(interactions.user_ids), stats=stats)
    if out is not None:
        data.save(out)
        log.info("prepare: wrote %s (%.1f s in all)", out, time.perf_counter() - begin)
    return data


def _items_seen(interactions: Interactions) -> int:
    seqs = [seq for seq in interactions.sequences if len(seq)]
    return len(set(np.concatenate(seqs).tolist())) if seqs else 0


def _index_path(fmt: str, path) -> Path:
    """The ``X.index.json`` of a given-SID format."""
    if fmt == "minionerec":
        from gflowgr_core.data.minionerec import minionerec_files

        return minionerec_files(path).index
    _, index_path = letter_paths(path)
    if index_path is None:
        raise FileNotFoundError(f"no *.index.json (LETTER SIDs) beside the interactions at {path}")
    return index_path
