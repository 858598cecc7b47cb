"""SASRec, its whole-sequence training rows, the model cache and the CM score cache, on a tiny synthetic
split with a learnable pattern (item i -> i+1) and on the bundled Beauty slice."""
import dataclasses
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from gflowgr_core import collaborative, metrics
from gflowgr_core.collaborative import (CMScorer, SASRec, SASRecConfig, default_cache_dir, evaluate_sasrec,
                                        load_or_train_sasrec, rank_items, sasrec_cache_name, split_fingerprint,
                                        train_sasrec, whole_sequence_rows)
from gflowgr_core.data.loaders import Interactions, load_letter
from gflowgr_core.data.prepared import PreparedData, prepare
from gflowgr_core.data.split import Split, SplitData, leave_one_out

NUM_ITEMS = 40
SMALL = dict(dim=32, num_blocks=2, num_heads=2, dropout=0.1, lr=3e-3, batch_size=64, eval_ks=(1, 5, 10),
             early_stop_metric="ndcg@10", progress=False, verbose=False)


def successor_split(num_users=250, num_items=NUM_ITEMS, max_history=8, seed=0):
    """Each user walks i, i+1, i+2, ... (mod num_items) from a random start, 5 to 11 steps long."""
    rng = np.random.default_rng(seed)
    seqs = [(rng.integers(num_items) + np.arange(rng.integers(5, 12))) % num_items for _ in range(num_users)]
    inter = Interactions(user_ids=[str(u) for u in range(num_users)], item_ids=[str(i) for i in range(num_items)],
                         sequences=[s.astype(np.int64) for s in seqs], source="synthetic-successor")
    return leave_one_out(inter, max_history=max_history)


@pytest.fixture(scope="module")
def data():
    return successor_split()


@pytest.fixture(scope="module")
def trained(data):
    return train_sasrec(data, SASRecConfig(max_epochs=40, patience=3, seed=7, **SMALL))


def test_learns_successor_pattern(trained, data):
    report = trained.train_report
    # Chance is 1/40 for recall@1 and 10/40 for recall@10.
    assert report["test"]["recall@1"] > 0.8
    assert report["test"]["ndcg@10"] > 0.85
    assert report["valid"]["recall@10"] > 0.9
    assert not trained.training
    assert 1 <= report["best_epoch"] <= report["epochs_run"] <= 40
    assert report["epochs"][0]["train_loss"] > report["epochs"][report["best_epoch"] - 1]["train_loss"]
    # The report's test metrics are the metrics module's view of the model's own top-10.
    ranked = rank_items(trained, data.test.history, 10)
    assert metrics.recall_at_k(ranked, data.test.target, 10).item() == pytest.approx(report["test"]["recall@10"])


def test_same_seed_same_model_and_caller_rng_untouched(data):
    cfg = SASRecConfig(max_epochs=2, patience=5, seed=3, **SMALL)
    state = torch.get_rng_state()
    a = train_sasrec(data, cfg)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_sasrec(data, cfg)
    c = train_sasrec(data, SASRecConfig(max_epochs=2, patience=5, seed=4, **SMALL))
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert not torch.equal(a.item_emb.weight, c.item_emb.weight)
    assert a.train_report["test"] == b.train_report["test"]


def test_causal_and_padding_invariant():
    torch.manual_seed(0)
    model = SASRec(NUM_ITEMS, 6, dim=16, num_blocks=2, num_heads=2, dropout=0.0).eval()
    hist = torch.tensor([[-1, -1, 3, 4, 5, 6], [-1, -1, -1, -1, -1, 9], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        h = model.encode(hist)
        changed = hist.clone()
        changed[:, -1] = torch.tensor([20, 21, 22])
        h2 = model.encode(changed)
        # Earlier positions never see later items.
        torch.testing.assert_close(h[:, :-1], h2[:, :-1])
        assert not torch.allclose(h[:, -1], h2[:, -1])
        # A narrower history is left-padded; what sits in pad slots never matters.
        torch.testing.assert_close(model.user_representation(hist[:1, 2:]), model.user_representation(hist[:1]))
        assert torch.isfinite(h).all()
        # The shortcut that computes only the last position of the last block changes nothing.
        torch.testing.assert_close(model.encode(hist, last_only=True)[:, 0], h[:, -1])
        torch.testing.assert_close(model.user_representation(hist), h[:, -1])
    with pytest.raises(ValueError, match="max_history=6"):
        model.encode(torch.zeros(1, 7, dtype=torch.long))


def test_rank_items_exclude_history(trained, data):
    ranked = rank_items(trained, data.valid.history, 10, batch_size=37, exclude_history=True)
    assert ranked.shape == (len(data.valid.target), 10)
    hist = data.valid.history
    overlap = (ranked[:, :, None] == hist[:, None, :]) & (hist[:, None, :] >= 0)
    assert not overlap.any()
    plain = rank_items(trained, data.valid.history, 10, batch_size=1000)
    assert plain.shape == ranked.shape


def test_save_load_model(trained, data, tmp_path):
    path = trained.save(tmp_path / "sasrec.pt")
    loaded = SASRec.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(data.valid.history), trained(data.valid.history))


# ---------------------------------------------------------------------------------------------- CMScorer


@pytest.fixture(scope="module")
def scorer(trained, data):
    return CMScorer.build(trained, data.train, batch_size=50)


def test_cm_scores_match_model(trained, data, scorer):
    n = len(data.train.target)
    assert scorer.user_repr.shape == (n, trained.dim) and scorer.item_emb.shape == (NUM_ITEMS, trained.dim)
    rows = torch.tensor([0, 5, n - 1, 5])
    with torch.no_grad():
        full = trained(data.train.history[rows])
    torch.testing.assert_close(scorer.full_scores(rows), full, rtol=1e-5, atol=1e-5)
    items = torch.tensor([[0, 1, 39], [2, 2, 3], [10, 11, 12], [39, 0, 7]])
    torch.testing.assert_close(scorer.score(rows, items), full.gather(1, items), rtol=1e-5, atol=1e-5)
    pool = scorer.topk_pool(rows, 7)
    assert pool.shape == (4, 7) and pool.dtype == torch.long
    torch.testing.assert_close(full.gather(1, pool), full.topk(7, dim=1).values, rtol=1e-5, atol=1e-5)
    # The cache carries the pattern: the successor of the last history item is the top item.
    succ = (data.train.history[:, -1] + 1) % NUM_ITEMS
    top1 = scorer.topk_pool(torch.arange(n), 1)[:, 0]
    assert (top1 == succ).float().mean() > 0.8


def test_cm_normalisations(scorer):
    rows = torch.arange(0, 60, 3)
    items = torch.randint(0, NUM_ITEMS, (len(rows), 9), generator=torch.Generator().manual_seed(1))
    full = scorer.full_scores(rows).double()
    own = full.gather(1, items)
    z = (own - full.mean(1, keepdim=True)) / full.std(1, unbiased=False, keepdim=True)
    sig = scorer.normalized(rows, items, "sigmoid_z")
    torch.testing.assert_close(sig.double(), torch.sigmoid(z), rtol=1e-4, atol=1e-5)
    pct = scorer.normalized(rows, items, "percentile")
    lower = (full[:, None, :] < own[:, :, None]).sum(-1)
    ties = (full[:, None, :] == own[:, :, None]).sum(-1) - 1
    torch.testing.assert_close(pct.double(), (lower + 0.5 * ties).double() / (NUM_ITEMS - 1))
    for values in (sig, pct):
        assert values.shape == items.shape and values.min() >= 0 and values.max() <= 1
    best = scorer.topk_pool(rows, 1)
    worst = (-full).argmax(1, keepdim=True)
    assert torch.all(scorer.normalized(rows, best, "percentile") == 1.0)
    assert torch.all(scorer.normalized(rows, worst, "percentile") == 0.0)
    # Ranking is preserved by both normalisations.
    order = own.argsort(1)
    assert torch.all(sig.gather(1, order).diff(dim=1) >= 0)
    with pytest.raises(ValueError, match="sigmoid_z"):
        scorer.normalized(rows, items, "tanh")


def test_cm_save_load_and_fingerprint(scorer, data, tmp_path):
    path = scorer.save(tmp_path / "run" / "cm_train.pt")
    loaded = CMScorer.load(path, split=data.train)
    rows, items = torch.tensor([1, 2]), torch.tensor([[3, 4], [5, 6]])
    assert torch.equal(loaded.score(rows, items), scorer.score(rows, items))
    assert torch.equal(loaded.score_std, scorer.score_std)
    assert loaded.fingerprint == split_fingerprint(data.train)
    with pytest.raises(ValueError, match="different split"):
        CMScorer.load(path, split=data.valid)


def test_cm_errors(scorer):
    n = scorer.num_examples
    with pytest.raises(IndexError, match=f"example index {n} outside"):
        scorer.score(torch.tensor([0, n]), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(IndexError, match="item 40 at \\[1, 0\\]"):
        scorer.score(torch.tensor([0, 1]), torch.tensor([[0], [40]]))
    with pytest.raises(ValueError, match="row 2 is NaN/inf"):
        CMScorer(torch.tensor([[1.0], [2.0], [float("nan")]]), torch.ones(3, 1))
    huge = CMScorer(torch.full((2, 2), 3e38), torch.full((4, 2), 3e38))
    with pytest.raises(FloatingPointError, match="CM score is inf for example 0"):
        huge.score(torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.long))


def test_training_input_errors(data):
    bad_hist = data.valid.history.clone()
    bad_hist[3] = -1
    broken = SplitData(data.train, Split(bad_hist, data.valid.target, data.valid.user), data.test,
                       data.num_users, data.num_items, data.max_history, data.dropped_users)
    with pytest.raises(ValueError, match="valid row 3 has an empty history"):
        train_sasrec(broken, SASRecConfig(max_epochs=1, **SMALL))
    with pytest.raises(ValueError, match="early_stop_metric"):
        SASRecConfig(early_stop_metric="ndcg@50")
    with pytest.raises(ValueError, match="unknown SASRecConfig field"):
        SASRecConfig.from_dict({"dim": 8, "layers": 2})


def test_epoch_log_lines(data, tmp_path):
    log = tmp_path / "logs" / "sasrec.jsonl"
    model = train_sasrec(data, SASRecConfig(max_epochs=2, patience=5, log_path=str(log), **SMALL))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"train_loss", "valid_ndcg@10", "valid_recall@10", "valid_coverage@10"} <= set(lines[0])
    popularity = metrics.item_popularity(data)
    again = evaluate_sasrec(model, data.valid, popularity, ks=(1, 5, 10))
    assert again == model.train_report["valid"]


# ------------------------------------------------------------------------------------ whole-sequence rows


def per_prefix_pairs(split):
    """Multiset of (visible history, target) of the per-prefix rows."""
    return Counter((tuple(h[h >= 0].tolist()), int(t)) for h, t in zip(split.history, split.target))


def whole_sequence_pairs(rows):
    """Multiset of (items the causal model sees at a scored position, label) of whole-sequence rows."""
    pairs = Counter()
    for h, labels in zip(rows.history, rows.labels):
        for p in (labels >= 0).nonzero().squeeze(1).tolist():
            seen = h[: p + 1]
            pairs[(tuple(seen[seen >= 0].tolist()), int(labels[p]))] += 1
    return pairs


def expected_row_count(split_data):
    """One row per user with training targets, plus one per target whose history was truncated."""
    per_user = torch.bincount(split_data.train.user, minlength=split_data.num_users)
    return int((per_user > 0).sum() + (per_user - split_data.max_history).clamp(min=0).sum())


def letter_split(path, max_history):
    return leave_one_out(load_letter(path), max_history=max_history)


@pytest.mark.parametrize("source,max_history", [("successor", 5), ("successor", 2), ("beauty_tiny", 20),
                                                ("beauty_tiny", 4), ("letter_tiny", 1)])
def test_whole_sequence_rows_train_on_the_per_prefix_pairs(source, max_history, beauty_tiny):
    if source == "successor":
        split_data = successor_split(num_users=60, max_history=max_history)
    elif source == "beauty_tiny":
        split_data = letter_split(beauty_tiny, max_history)
    else:
        split_data = letter_split(os.path.join(os.path.dirname(__file__), "fixtures", "data", "letter",
                                               "Tiny.inter.json"),
                                  max_history)
    rows = whole_sequence_rows(split_data.train)
    assert rows.history.shape == rows.labels.shape and rows.history.shape[1] == max_history
    assert whole_sequence_pairs(rows) == per_prefix_pairs(split_data.train)
    assert len(rows) == expected_row_count(split_data)
    # Labels sit only where the model reads a real item.
    assert bool((rows.history[rows.labels >= 0] >= 0).all())
    # Each case mixes users that fit in one row with users whose histories were truncated.
    per_user = torch.bincount(split_data.train.user)
    assert bool((per_user > max_history).any()) and bool(((per_user > 0) & (per_user <= max_history)).any())


def test_whole_sequence_rows_of_any_row_order_are_exact(data):
    # A random subset in random order breaks most runs; every row must still be scored once, as it was.
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:300]
    subset = data.train.subset(order)
    rows = whole_sequence_rows(subset)
    assert whole_sequence_pairs(rows) == per_prefix_pairs(subset)
    sorted_subset = data.train.subset(order.sort().values)
    assert len(whole_sequence_rows(sorted_subset)) < len(sorted_subset)
    with pytest.raises(ValueError, match="split row 1 has an empty history"):
        bad = data.train.history[:3].clone()
        bad[1] = -1
        whole_sequence_rows(Split(bad, data.train.target[:3], data.train.user[:3]))


def test_sequence_loss_is_the_mean_over_scored_positions(data):
    torch.manual_seed(0)
    model = SASRec(NUM_ITEMS, data.max_history, dim=16, num_blocks=2, num_heads=2, dropout=0.0).eval()
    rows = whole_sequence_rows(data.train)
    hist, labels = rows.history[:7], rows.labels[:7]
    with torch.no_grad():
        loss = collaborative._sequence_loss(model, hist, labels)
        terms = []
        for w in range(hist.shape[0]):
            hidden = model.encode(hist[w:w + 1])[0]
            for p in (labels[w] >= 0).nonzero().squeeze(1).tolist():
                logits = hidden[p] @ model.item_embeddings().T
                terms.append(torch.logsumexp(logits, 0) - logits[labels[w, p]])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # The last column of a row is exactly the per-prefix user representation of its last target.
    end = labels[:, -1] >= 0
    with torch.no_grad():
        torch.testing.assert_close(model.encode(hist)[end, -1], model.user_representation(hist[end]))


# ------------------------------------------------------------------------------------------- model cache

TINY = dict(SMALL, max_epochs=1)


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = collaborative.train_sasrec

    def counted(split_data, config=None):
        calls.append(config)
        return real(split_data, config)

    monkeypatch.setattr(collaborative, "train_sasrec", counted)
    return calls


def test_cache_name_follows_every_model_setting(data):
    cfg = SASRecConfig(**TINY)
    name = sasrec_cache_name(data, cfg)
    assert name.startswith("sasrec_") and name.endswith(".pt")
    # Display and placement settings do not change the model, so they share its file.
    for change in ({"verbose": True}, {"progress": True}, {"device": "auto"}, {"log_path": "x.jsonl"}):
        assert sasrec_cache_name(data, SASRecConfig(**{**TINY, **change})) == name, change
    changes = ({"dim": 16}, {"num_blocks": 1}, {"num_heads": 1}, {"ffn_dim": 64}, {"dropout": 0.2}, {"lr": 2e-3},
               {"weight_decay": 0.1}, {"batch_size": 32}, {"max_epochs": 2}, {"patience": 2},
               {"early_stop_metric": "recall@10"}, {"eval_ks": (1, 5, 10, 20)}, {"eval_batch_size": 7},
               {"exclude_history": True}, {"grad_clip": None}, {"seed": 1})
    shown = {"verbose", "progress", "device", "log_path"}
    assert {key for change in changes for key in change} | shown == {f.name for f in dataclasses.fields(cfg)}
    names = {sasrec_cache_name(data, SASRecConfig(**{**TINY, **change})) for change in changes}
    assert len(names) == len(changes) and name not in names
    # Another split (here: other valid/test rows on the same training rows) is another model.
    moved = SplitData(data.train, data.test, data.valid, data.num_users, data.num_items, data.max_history,
                      data.dropped_users)
    assert sasrec_cache_name(moved, cfg) != name


def test_cache_reuses_and_retrains(data, tmp_path, count_training):
    cfg = SASRecConfig(**TINY)
    first = load_or_train_sasrec(data, cfg, tmp_path)
    assert (tmp_path / sasrec_cache_name(data, cfg)).is_file() and len(count_training) == 1
    assert not first.training
    again = load_or_train_sasrec(data, SASRecConfig(**{**TINY, "verbose": True}), tmp_path)
    assert len(count_training) == 1
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert again.train_report["test"] == first.train_report["test"] and not again.training
    # A changed CM setting trains a new model beside the old one.
    changed = load_or_train_sasrec(data, SASRecConfig(**{**TINY, "lr": 2e-3}), tmp_path)
    assert len(count_training) == 2 and len(list(tmp_path.glob("sasrec_*.pt"))) == 2
    assert not torch.equal(changed.item_emb.weight, first.item_emb.weight)


def test_cache_other_processes_load_what_the_main_one_wrote(data, tmp_path, count_training):
    cfg = SASRecConfig(**TINY)
    waited = []
    main = load_or_train_sasrec(data, cfg, tmp_path, is_main=True, barrier=lambda: waited.append("main"))
    other = load_or_train_sasrec(data, cfg, tmp_path, is_main=False, barrier=lambda: waited.append("other"))
    assert waited == ["main", "other"] and len(count_training) == 1
    assert torch.equal(main.item_emb.weight, other.item_emb.weight)


def test_cache_folder_errors_before_training(data, tmp_path, count_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"cannot create the SASRec cache folder {blocker / 'cm'}"):
        load_or_train_sasrec(data, SASRecConfig(**TINY), blocker / "cm")
    assert count_training == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GFLOWGR_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "cm"
    monkeypatch.delenv("GFLOWGR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "gflowgr" / "cm"


def snapshot(folder):
    return {(str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_read_only_data_folder(beauty_tiny, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    prepare("letter", beauty_tiny, folder)
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        before = snapshot(folder)
        monkeypatch.setenv("GFLOWGR_CACHE", str(tmp_path / "cache"))
        data = PreparedData.load(folder)
        cfg = SASRecConfig(**{**TINY, "eval_ks": (5, 10, 20)})
        model = load_or_train_sasrec(data.split, cfg)
        assert snapshot(folder) == before
        assert (tmp_path / "cache" / "cm" / sasrec_cache_name(data.split, cfg)).is_file()
        assert model.num_items == data.num_items
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
