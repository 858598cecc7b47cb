"""`gflowgr prepare`: the prepared folder and its stats.json, on the bundled Beauty slice, the shared full
Beauty data, and built SIDs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gflowgr_core.cli import main
from gflowgr_core.data.loaders import Interactions
from gflowgr_core.data.prepared import PreparedData, prepare

DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
BEAUTY = DATA / "letter" / "Beauty"
REQUIRED = ("num_users", "num_items", "num_interactions", "num_train_examples", "num_valid", "num_test",
            "sid_levels", "sid_codes_per_level", "sid_collisions", "trie_nodes_per_level")


# (users, items, interactions, training examples, trie leaves): every SID collision of the full file is in
# the bundled slice too (13 collisions, 11 shared SIDs holding 24 items).
FULL = (22363, 12101, 198502, 131413, 12088)
TINY = (313, 2987, 4416, 3477, 2974)


@pytest.mark.parametrize("source, counts", [
    pytest.param("tiny", TINY, id="bundled-slice"),
    pytest.param("shared", FULL, id="shared-full", marks=pytest.mark.skipif(
        not (BEAUTY / "Beauty.inter.json").exists(), reason=f"shared Beauty data not found at {BEAUTY}")),
])
def test_prepare_beauty_cli(source, counts, request, tmp_path, capsys):
    path = request.getfixturevalue("beauty_tiny") if source == "tiny" else BEAUTY
    n_users, n_items, n_interactions, n_examples, n_leaves = counts
    out = tmp_path / "beauty"
    assert main(["prepare", "--format", "letter", "--path", str(path), "--out", str(out),
                 "--collisions", "share"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert set(REQUIRED) <= set(stats)
    assert stats["num_users"] == n_users
    assert stats["num_items"] == n_items
    assert stats["num_interactions"] == n_interactions
    assert stats["num_train_examples"] == n_examples
    assert stats["num_valid"] == stats["num_test"] == n_users
    assert stats["sid_levels"] == 4 and stats["sid_codes_per_level"] == [256] * 4
    assert stats["sid_collisions"] == 13
    assert stats["catalog"]["shared_sids"] == 11 and stats["catalog"]["items_in_shared_sids"] == 24
    assert stats["trie_nodes_per_level"][0] == 1 and stats["trie_nodes_per_level"][-1] == n_leaves
    assert str(n_users) in capsys.readouterr().out.replace(",", "")

    data = PreparedData.load(out)
    assert len(data.split.train) == n_examples
    # every item's SID is in the trie and maps back to a leaf holding that item
    leaves = data.trie.leaf_of(data.catalog.codes)
    items, valid = data.trie.items_of_leaves(leaves)
    held = ((items == torch.arange(data.num_items)[:, None]) & valid).any(1)
    assert bool(held.all())


def _synthetic(n_users: int = 60, n_items: int = 40, seed: int = 0) -> Interactions:
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(n_items, size=rng.integers(3, 12), replace=False).astype(np.int64) for _ in range(n_users)]
    return Interactions(user_ids=[f"u{i}" for i in range(n_users)], item_ids=[str(i) for i in range(n_items)],
                        sequences=seqs, source="synthetic")


def test_prepare_builds_unique_sids_by_default(tmp_path, monkeypatch):
    """Formats without SIDs get RQ-KMeans SIDs; the default `suffix` policy makes every SID unique."""
    import gflowgr_core.data.prepared as prepared_mod

    monkeypatch.setattr(prepared_mod, "load_interactions", lambda fmt, path: _synthetic())
    data = prepare("p5", "unused", tmp_path / "p", levels=2, codes=4, seed=0)
    assert data.catalog.collisions == "suffix"
    assert torch.unique(data.catalog.codes, dim=0).shape[0] == data.num_items
    assert data.stats["sid_levels"] == 3  # 2 built levels + the disambiguation level
    again = prepare("p5", "unused", None, levels=2, codes=4, seed=0)
    assert torch.equal(again.catalog.codes, data.catalog.codes), "SIDs must be deterministic for a seed"
    reloaded = PreparedData.load(tmp_path / "p")
    assert torch.equal(reloaded.catalog.codes, data.catalog.codes)
    assert reloaded.stats == data.stats


def test_prepare_share_keeps_collisions(monkeypatch):
    import gflowgr_core.data.prepared as prepared_mod

    monkeypatch.setattr(prepared_mod, "load_interactions", lambda fmt, path: _synthetic())
    data = prepare("p5", "unused", None, levels=1, codes=4, collisions="share", seed=0)
    assert data.stats["sid_collisions"] == data.num_items - torch.unique(data.catalog.codes, dim=0).shape[0] > 0
    assert data.trie.stats()["nodes_per_level"][-1] == torch.unique(data.catalog.codes, dim=0).shape[0]


def test_prepared_folder_incomplete_names_missing_file(tmp_path):
    (tmp_path / "stats.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="split.pt"):
        PreparedData.load(tmp_path)


def test_prepare_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown format"):
        prepare("parquet", "x")
    with pytest.raises(ValueError, match="collision policy"):
        prepare("letter", BEAUTY, collisions="merge")


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    assert main(["train", f"data={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert "gflowgr train: error:" in err and "is not a prepared dataset folder" in err and "Traceback" not in err
    assert main(["train", "data=x", "gfn.n_agu=3"]) == 2
    assert "unknown key 'n_agu'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):  # -v shows the full error
        main(["-v", "train", f"data={tmp_path / 'missing'}"])
