"""SASRec and the CM score cache on a tiny synthetic split with a learnable pattern (item i -> i+1)."""
import json

import numpy as np
import pytest
import torch

from gflowgr_core import metrics
from gflowgr_core.collaborative import (CMScorer, SASRec, SASRecConfig, evaluate_sasrec, rank_items,
                                        split_fingerprint, train_sasrec)
from gflowgr_core.data.loaders import Interactions
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
        scorer.normalized(rows, items, "softmax")


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
