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
from dataclasses import dataclass
from pathlib import Path

import torch

from gflowgr_core.data.loaders import Interactions, letter_paths, load_interactions
from gflowgr_core.data.split import SplitData, Split, kcore_filter, leave_one_out
from gflowgr_core.metrics import item_popularity
from gflowgr_core.sid.catalog import Catalog
from gflowgr_core.sid.tokenizer import build_catalog
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.sid.trie import Trie

log = logging.getLogger("gflowgr")

FORMATS = ("letter", "p5", "csv", "ml100k")


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


def prepare(fmt: str, path: str | Path | None, out: str | Path | None = None, *, levels: int = 3,
            codes: int = 256, collisions: str | None = None, kcore: int = 0, max_history: int = 20,
            embeddings: str | Path | None = None, seed: int = 0, dense_levels: int = 2,
            max_users: int | None = None) -> PreparedData:
    """Load interactions, split them leave-one-out, build the SID catalogue and trie, and (if ``out``) save.

    ``fmt`` is one of :data:`FORMATS`. For ``letter`` the SIDs come from ``X.index.json`` (``levels`` and
    ``codes`` are then read from the index); for the other formats they are built by RQ-KMeans over
    ``embeddings`` (a ``.npy`` file, one row per item in internal order) or, by default, over collaborative
    embeddings computed from the training part of the sequences only (validation and test items never
    inform the SIDs). ``collisions`` defaults to ``share`` for LETTER SIDs (as LETTER evaluates them) and to
    ``suffix`` for built SIDs, where collisions are common and a shared SID would recommend all of its
    items at once. ``max_users`` keeps only the first N users of the file (quick experiments and tests);
    the item catalogue stays whole, so every item can still be recommended.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if collisions is None:  # LETTER SIDs are evaluated with shared SIDs; built SIDs collide far more often
        collisions = "share" if fmt == "letter" else "suffix"
    if collisions not in ("share", "suffix"):
        raise ValueError(f"unknown collision policy {collisions!r}; expected 'share' or 'suffix'")
    interactions = load_interactions(fmt, path)
    if max_users is not None:
        interactions = Interactions(user_ids=interactions.user_ids[:max_users], item_ids=interactions.item_ids,
                                    sequences=interactions.sequences[:max_users], source=interactions.source)
    if kcore > 1:
        interactions, report = kcore_filter(interactions, kcore)
        log.info("k-core filter (k=%d): %s", kcore, report)
    split = leave_one_out(interactions, max_history=max_history)
    if fmt == "letter":
        _, index_path = letter_paths(path)
        if index_path is None:
            raise FileNotFoundError(f"no *.index.json (LETTER SIDs) beside the interactions at {path}")
        catalog = Catalog.from_letter_index(index_path, interactions.item_ids, collisions=collisions)
    else:
        train_only = Interactions(user_ids=interactions.user_ids, item_ids=interactions.item_ids,
                                  sequences=[seq[:-2] for seq in interactions.sequences],
                                  source=interactions.source)
        catalog = build_catalog(train_only, levels=levels, codes=codes, collisions=collisions,
                                embeddings=embeddings, seed=seed)
    trie = Trie.build(catalog.codes, catalog.codes_per_level, dense_levels=dense_levels)
    tokens = SIDTokenMap.from_scratch(catalog.codes_per_level)
    split_stats = split.stats()
    catalog_stats = catalog.stats()
    stats = {
        "source": str(interactions.source),
        "format": fmt,
        "num_users": len(interactions.user_ids),
        "num_items": len(interactions.item_ids),
        "num_interactions": int(interactions.num_interactions),
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
    return data
