"""Tests of gflowgr_core.samplers (augmented-trajectory samplers, METHOD.md §4)."""
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gflowgr_core.samplers as samplers_mod
from gflowgr_core.samplers import (CurriculumSampler, LogsSampler, MixtureSampler, OnPolicySampler,
                                   RandomSampler, Sampler, SamplerBatch, SamplerError, build_cooccurrence,
                                   make_sampler)

DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


class FakeScorer:
    """Stand-in for ``CMScorer``: a fixed score matrix over (example, item)."""

    def __init__(self, n_examples, n_items, seed=0):
        self.S = torch.randn(n_examples, n_items, generator=torch.Generator().manual_seed(seed))

    def score(self, example_idx, items):
        return self.S[example_idx[:, None], items]

    def topk_pool(self, example_idx, m):
        return self.S[example_idx].topk(m, dim=1).indices

    def normalized(self, example_idx, items, method="sigmoid_z"):
        return torch.sigmoid(self.score(example_idx, items))


class LowRankScorer(FakeScorer):
    """``FakeScorer`` with factorised scores, for catalogues too large for a dense score matrix."""

    def __init__(self, n_examples, n_items, dim=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.U, self.V = torch.randn(n_examples, dim, generator=g), torch.randn(n_items, dim, generator=g)

    def score(self, example_idx, items):
        return (self.U[example_idx][:, None, :] * self.V[items]).sum(-1)

    def topk_pool(self, example_idx, m):
        return (self.U[example_idx] @ self.V.T).topk(m, dim=1).indices


def fake_decode(n_items, seed=1):
    """A deterministic stand-in decoder: a fixed item ranking per history (hash of the history)."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))

    def decode(history, k):
        start = (history.clamp(min=0).sum(dim=1) * 7) % n_items
        return perm[(start[:, None] + torch.arange(k)[None, :]) % n_items]

    return decode


def make_batch(B=16, H=8, n_items=60, seed=0, n_examples=None):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, n_items, (B, H), generator=g)
    lengths = torch.randint(1, H + 1, (B,), generator=g)
    pad = torch.arange(H)[None, :] < (H - lengths)[:, None]
    history[pad] = -1
    positive = torch.randint(0, n_items, (B,), generator=g)
    # Some examples have the positive in their own history (repeat interactions).
    history[::3, -1] = positive[::3]
    n_examples = n_examples or B
    example_idx = torch.randint(0, n_examples, (B,), generator=g)
    return SamplerBatch(example_idx, history, positive)


def all_samplers(n_items=60, n_examples=16, history=None, target=None):
    scorer = FakeScorer(n_examples, n_items)
    if history is None:
        b = make_batch(B=n_examples, n_items=n_items, seed=11)
        history, target = b.history, b.positive
    cooc = build_cooccurrence(history, target, n_items, top_c=5)
    logs = LogsSampler(n_items, cooc)
    cur = CurriculumSampler(scorer, n_items, pool_size=20, n_random=20)
    cur.set_progress(0.5)
    onp = OnPolicySampler(fake_decode(n_items), n_items)
    return {
        "random": RandomSampler(n_items),
        "logs": logs,
        "logs_recent_window": LogsSampler(n_items, cooc, window=3, pick="recent"),
        "logs_no_cooc": LogsSampler(n_items, None),
        "cm_curriculum": cur,
        "onpolicy": onp,
        "mixture_slot": MixtureSampler([(RandomSampler(n_items), 1.0), (logs, 1.0), (cur, 0.5), (onp, 0.5)]),
        "mixture_example": MixtureSampler([(RandomSampler(n_items), 1.0), (logs, 2.0), (onp, 1.0)],
                                          mode="example"),
    }


SAMPLER_NAMES = list(all_samplers())


def check_guarantees(batch, items, n_items, n_aug):
    assert items.dtype == torch.long and items.shape == (batch.size, n_aug)
    assert torch.all((items >= 0) & (items < n_items))
    assert not torch.any(items == batch.positive[:, None])
    full = torch.cat([batch.positive[:, None], items], dim=1)
    for row in full.tolist():
        assert len(set(row)) == len(row), row


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("n_aug", [1, 3, 7])
def test_guarantees_and_determinism(name, n_aug):
    batch = make_batch()
    sampler = all_samplers()[name]
    a = sampler.sample(batch, n_aug, torch.Generator().manual_seed(5))
    check_guarantees(batch, a, 60, n_aug)
    b = all_samplers()[name].sample(batch, n_aug, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_n_aug_zero_returns_empty(name):
    batch = make_batch()
    out = all_samplers()[name].sample(batch, 0, torch.Generator().manual_seed(0))
    assert out.shape == (batch.size, 0) and out.dtype == torch.long


@pytest.mark.parametrize("name", ["random", "logs", "cm_curriculum", "mixture_slot"])
def test_different_seeds_differ(name):
    batch = make_batch()
    outs = {tuple(all_samplers()[name].sample(batch, 3, torch.Generator().manual_seed(s)).flatten().tolist())
            for s in range(4)}
    assert len(outs) > 1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_items=st.integers(12, 80), B=st.integers(1, 9), H=st.integers(1, 10),
       n_aug=st.integers(0, 5), name=st.sampled_from(SAMPLER_NAMES))
def test_guarantees_random_shapes(seed, n_items, B, H, n_aug, name):
    batch = make_batch(B=B, H=H, n_items=n_items, seed=seed)
    sampler = all_samplers(n_items=n_items, n_examples=B)[name]
    items = sampler.sample(batch, n_aug, torch.Generator().manual_seed(seed))
    check_guarantees(batch, items, n_items, n_aug)


# ---------------------------------------------------------------------------------------------- random

def test_random_excludes_history_and_is_uniform():
    n_items = 12
    history = torch.tensor([[-1, 0, 1, 2, 3]])
    batch = SamplerBatch(torch.tensor([0]), history, torch.tensor([4]))
    counts = Counter()
    g = torch.Generator().manual_seed(0)
    sampler = RandomSampler(n_items)
    draws = 1500
    for _ in range(draws):
        counts.update(sampler.sample(batch, 3, g)[0].tolist())
    assert set(counts) == set(range(5, 12))
    expected = draws * 3 / 7
    for item, c in counts.items():
        assert abs(c - expected) < 5 * expected ** 0.5, (item, c, expected)


def test_random_exact_fallback_used_for_tiny_allowed_sets(monkeypatch):
    # With no rejection rounds every item comes from the dense fallback; the guarantees still hold.
    monkeypatch.setattr(samplers_mod, "_REJECTION_ROUNDS", 0)
    batch = make_batch(B=8, H=6, n_items=15, seed=3)
    items = RandomSampler(15).sample(batch, 4, torch.Generator().manual_seed(1))
    check_guarantees(batch, items, 15, 4)
    assert not samplers_mod._member(items, batch.history).any()


def test_infeasible_request_names_row():
    history = torch.tensor([[0, 1, 2], [-1, -1, 0]])
    batch = SamplerBatch(torch.tensor([0, 1]), history, torch.tensor([3, 4]))
    with pytest.raises(SamplerError, match=r"batch row 0 needs 2 more.*only 1"):
        RandomSampler(5).sample(batch, 2, torch.Generator().manual_seed(0))
    with pytest.raises(SamplerError, match="n_items"):
        RandomSampler(5).sample(batch, 5, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("field, value, match", [
    ("positive", torch.tensor([0, 60]), r"batch.positive.*\[0, 60\).*\[1\]"),
    ("history", torch.tensor([[0, -2], [1, 2]]), r"batch.history.*\[-1, 60\)"),
    ("positive", torch.tensor([0.0, 1.0]), "integer"),
    ("example_idx", torch.tensor([0]), "example_idx"),
])
def test_bad_batches_are_rejected(field, value, match):
    kw = dict(example_idx=torch.tensor([0, 1]), history=torch.tensor([[0, 1], [1, 2]]), positive=torch.tensor([3, 4]))
    kw[field] = value
    with pytest.raises(SamplerError, match=match):
        RandomSampler(60).sample(SamplerBatch(**kw), 2, torch.Generator().manual_seed(0))
    with pytest.raises(SamplerError, match="n_aug"):
        RandomSampler(60).sample(make_batch(), -1, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- logs

def brute_cooccurrence(history, target, n_items, top_c, max_distance=None):
    counts = [Counter() for _ in range(n_items)]
    H = history.shape[1]
    for h, t in zip(history.tolist(), target.tolist()):
        for pos, x in enumerate(h):
            if x < 0 or x == t or (max_distance is not None and H - pos > max_distance):
                continue
            counts[t][x] += 1
            counts[x][t] += 1
    out = torch.full((n_items, top_c), -1, dtype=torch.long)
    for i, c in enumerate(counts):
        ranked = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top_c]
        for j, (item, _) in enumerate(ranked):
            out[i, j] = item
    return out


@pytest.mark.parametrize("max_distance", [None, 1, 3])
def test_build_cooccurrence_matches_brute_force(max_distance):
    batch = make_batch(B=40, H=6, n_items=15, seed=4)
    got = build_cooccurrence(batch.history, batch.positive, 15, top_c=4, max_distance=max_distance)
    assert torch.equal(got, brute_cooccurrence(batch.history, batch.positive, 15, 4, max_distance))


def test_build_cooccurrence_counts_sequence_pairs_from_every_prefix():
    # The sequence 0 1 2 0 as every-prefix examples. Pairs: 0-1 twice, 0-2 twice, 1-2 once (0-0 is not a
    # co-occurrence).
    history = torch.tensor([[-1, -1, 0], [-1, 0, 1], [0, 1, 2]])
    target = torch.tensor([1, 2, 0])
    cooc = build_cooccurrence(history, target, 4, top_c=3)
    assert cooc[0].tolist() == [1, 2, -1]
    assert cooc[1].tolist() == [0, 2, -1]
    assert cooc[2].tolist() == [0, 1, -1]
    assert cooc[3].tolist() == [-1, -1, -1]


def test_logs_picks_from_history_window_then_cooc_then_random():
    n_items = 30
    cooc = torch.full((n_items, 4), -1, dtype=torch.long)
    cooc[9] = torch.tensor([1, 20, 21, 22])    # 1 is already in the history window of row 0
    history = torch.tensor([
        [-1, -1, -1, 1, 9],       # positive 9 in history; window items other than 9: {1}
        [2, 3, 4, 5, 6],          # enough history items
        [-1, -1, -1, -1, -1],     # empty history: cooc of positive 0 is empty -> random
    ])
    positive = torch.tensor([9, 7, 0])
    batch = SamplerBatch(torch.arange(3), history, positive)
    sampler = LogsSampler(n_items, cooc)
    items = sampler.sample(batch, 3, torch.Generator().manual_seed(0))
    assert items[0].tolist() == [1, 20, 21]
    assert set(items[1].tolist()) <= {2, 3, 4, 5, 6}
    assert not set(items[2].tolist()) & {0}
    assert sampler.last_stats == {"from_history": 4, "filled_cooc": 2, "filled_random": 3}


def test_logs_recent_pick_and_window():
    history = torch.tensor([[5, 6, 7, 8, 7, 9]])
    batch = SamplerBatch(torch.tensor([0]), history, torch.tensor([9]))
    s = LogsSampler(20, None, pick="recent")
    assert s.sample(batch, 3, torch.Generator().manual_seed(0)).tolist() == [[7, 8, 6]]
    # Window of the last 3 positions holds {8, 7} once the positive is removed; one slot goes random,
    # and random items avoid the whole history.
    s = LogsSampler(20, None, window=3)
    out = s.sample(batch, 3, torch.Generator().manual_seed(0))[0].tolist()
    assert set(out[:2]) == {7, 8} and out[2] not in {5, 6, 7, 8, 9}
    assert s.last_stats["filled_random"] == 1


def test_logs_random_pick_covers_the_window_uniformly():
    history = torch.tensor([[0, 1, 2, 3, 4, 5]])
    batch = SamplerBatch(torch.tensor([0]), history, torch.tensor([9]))
    s = LogsSampler(12, None)
    g = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(1200):
        counts.update(s.sample(batch, 2, g)[0].tolist())
    assert set(counts) == set(range(6))
    assert max(counts.values()) - min(counts.values()) < 0.25 * 400


def test_logs_from_split_and_factory():
    class Split:
        history = torch.tensor([[-1, 0, 1], [0, 1, 2]])
        target = torch.tensor([2, 3])

    s = make_sampler("logs", split=Split(), n_items=5, top_c=2)
    assert isinstance(s, LogsSampler) and s.cooccurrence.shape == (5, 2)
    assert s.cooccurrence[3].tolist() == [0, 1]
    with pytest.raises(SamplerError, match="cooccurrence"):
        LogsSampler(5, torch.zeros(4, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- curriculum

def test_curriculum_moves_from_easy_to_hard_with_progress():
    n_items, B = 200, 32
    scorer = FakeScorer(B, n_items, seed=3)
    batch = make_batch(B=B, H=8, n_items=n_items, seed=2, n_examples=B)
    sampler = CurriculumSampler(scorer, n_items, pool_size=30, n_random=30)
    means = []
    for p in (0.0, 0.25, 0.5, 0.75, 1.0):
        sampler.set_progress(p)
        items = sampler.sample(batch, 3, torch.Generator().manual_seed(0))
        check_guarantees(batch, items, n_items, 3)
        means.append(scorer.score(batch.example_idx, items).mean().item())
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert sampler.last_stats["filled_random"] == 0


def test_curriculum_extremes_pick_lowest_and_highest_pool_items():
    n_items = 50
    scorer = FakeScorer(1, n_items, seed=9)
    batch = SamplerBatch(torch.tensor([0]), torch.full((1, 3), -1), torch.tensor([0]))
    # A pool of the whole catalogue (n_random = 0, pool_size > n_items) and a window of exactly n_aug.
    sampler = CurriculumSampler(scorer, n_items, pool_size=100, n_random=0, window_factor=1.0)
    ranked = [i for i in scorer.S[0].argsort().tolist() if i != 0]
    sampler.set_progress(0.0)
    assert set(sampler.sample(batch, 2, torch.Generator().manual_seed(0))[0].tolist()) == set(ranked[:2])
    sampler.set_progress(1.0)
    assert set(sampler.sample(batch, 2, torch.Generator().manual_seed(0))[0].tolist()) == set(ranked[-2:])


def test_curriculum_state_dict_resume_and_progress_validation():
    scorer = FakeScorer(16, 60)
    a = CurriculumSampler(scorer, 60, start_quantile=0.2, end_quantile=0.8)
    a.set_progress(0.5)
    assert a.quantile == pytest.approx(0.5)
    b = CurriculumSampler(scorer, 60, start_quantile=0.2, end_quantile=0.8)
    b.load_state_dict(a.state_dict())
    batch = make_batch()
    assert torch.equal(a.sample(batch, 3, torch.Generator().manual_seed(1)),
                       b.sample(batch, 3, torch.Generator().manual_seed(1)))
    with pytest.raises(SamplerError, match="progress"):
        a.set_progress(1.5)
    with pytest.raises(SamplerError, match="unknown"):
        a.load_state_dict({"progress": 0.1, "step": 3})
    with pytest.raises(SamplerError, match="start_quantile"):
        CurriculumSampler(scorer, 60, start_quantile=-0.1)
    with pytest.raises(SamplerError, match="score"):
        CurriculumSampler(object(), 60)


def test_curriculum_bad_scorer_output_is_reported():
    class NaNScorer(FakeScorer):
        def score(self, example_idx, items):
            out = super().score(example_idx, items)
            out[2, 0] = float("nan")
            return out

    with pytest.raises(SamplerError, match=r"NaN/inf.*\[2\]"):
        CurriculumSampler(NaNScorer(16, 60), 60).sample(make_batch(), 3, torch.Generator().manual_seed(0))

    class ShortPool(FakeScorer):
        def topk_pool(self, example_idx, m):
            return super().topk_pool(example_idx, m)[:, :-1]

    with pytest.raises(SamplerError, match="topk_pool"):
        CurriculumSampler(ShortPool(16, 60), 60).sample(make_batch(), 3, torch.Generator().manual_seed(0))


def test_curriculum_with_collaborative_cmscorer():
    collaborative = pytest.importorskip("gflowgr_core.collaborative")
    g = torch.Generator().manual_seed(0)
    n_items, B = 80, 24
    scorer = collaborative.CMScorer(torch.randn(B, 8, generator=g), torch.randn(n_items, 8, generator=g))
    batch = make_batch(B=B, n_items=n_items, seed=5, n_examples=B)
    sampler = CurriculumSampler(scorer, n_items, pool_size=20, n_random=20)
    lo = sampler.sample(batch, 3, torch.Generator().manual_seed(0))
    sampler.set_progress(1.0)
    hi = sampler.sample(batch, 3, torch.Generator().manual_seed(0))
    for items in (lo, hi):
        check_guarantees(batch, items, n_items, 3)
    assert scorer.score(batch.example_idx, hi).mean() > scorer.score(batch.example_idx, lo).mean()


# ---------------------------------------------------------------------------------------------- on-policy

def test_onpolicy_takes_decoded_order_excluding_positive_and_fills_missing():
    calls = []

    def decode(history, k):
        calls.append(k)
        return torch.tensor([[5, 3, 5, 8, -1], [1, -1, -1, -1, -1]])

    batch = SamplerBatch(torch.arange(2), torch.tensor([[0, 1], [2, 1]]), torch.tensor([3, 9]))
    s = OnPolicySampler(decode, 20, extra=2)
    items = s.sample(batch, 3, torch.Generator().manual_seed(0))
    assert calls == [5]
    assert items[0].tolist() == [5, 8, items[0, 2].item()] and items[0, 2].item() not in {0, 1, 3, 5, 8}
    # Decoded history items are kept by default; random fills avoid the history.
    assert items[1, 0].item() == 1 and not set(items[1, 1:].tolist()) & {1, 2, 9}
    assert s.last_stats == {"from_policy": 3, "filled_random": 3}
    s = OnPolicySampler(decode, 20, extra=2, exclude_history=True)
    assert 1 not in s.sample(batch, 3, torch.Generator().manual_seed(0))[1].tolist()


def test_onpolicy_bad_decoder_output_is_reported():
    batch = make_batch()
    with pytest.raises(SamplerError, match="expected"):
        OnPolicySampler(lambda h, k: torch.zeros(h.shape[0], k - 1, dtype=torch.long), 60).sample(
            batch, 3, torch.Generator().manual_seed(0))
    with pytest.raises(SamplerError, match=r"decode_fn output.*\[-1, 60\)"):
        OnPolicySampler(lambda h, k: torch.full((h.shape[0], k), 60), 60).sample(
            batch, 3, torch.Generator().manual_seed(0))
    with pytest.raises(SamplerError, match="callable"):
        OnPolicySampler(None, 60)


# ---------------------------------------------------------------------------------------------- mixture

class ConstSampler(Sampler):
    """Always offers the same ordered items (minus the positive): makes the mixture's sources visible."""

    name = "const"

    def __init__(self, n_items, offer):
        super().__init__(n_items)
        self.offer = torch.tensor(offer)

    def _sample(self, batch, n_aug, generator):
        cand = self.offer.expand(batch.size, -1)
        items = torch.full((batch.size, n_aug), -1, dtype=torch.long)
        items, _ = samplers_mod._fill_slots(items, cand, batch.positive[:, None])
        return items


def test_mixture_example_mode_takes_every_item_from_one_component():
    n_items = 40
    a, b = ConstSampler(n_items, list(range(0, 10))), ConstSampler(n_items, list(range(20, 30)))
    m = MixtureSampler([(a, 1.0), (b, 3.0)], mode="example")
    batch = make_batch(B=200, n_items=n_items, seed=1)
    batch.positive[:] = 35
    items = m.sample(batch, 3, torch.Generator().manual_seed(0))
    from_b = (items >= 20).all(dim=1)
    assert torch.all(from_b | (items < 10).all(dim=1))
    assert 0.65 < from_b.float().mean().item() < 0.85


def test_mixture_slot_mode_proportions_and_no_conflicts():
    n_items = 40
    a, b = ConstSampler(n_items, list(range(0, 10))), ConstSampler(n_items, list(range(0, 10)))
    m = MixtureSampler([(a, 1.0), (b, 1.0)], mode="slot")
    batch = make_batch(B=64, n_items=n_items, seed=1)
    batch.positive[:] = 35
    items = m.sample(batch, 4, torch.Generator().manual_seed(0))
    check_guarantees(batch, items, n_items, 4)
    # Both components offer the same list; the second one skips what the first took, so every set is
    # still the first four items with no random filling.
    assert torch.all(items.sort(dim=1).values == torch.arange(4))
    assert m.last_stats["filled_random"] == 0
    assert m.last_stats["0:const"] + m.last_stats["1:const"] == 64 * 4

    c = ConstSampler(n_items, list(range(20, 30)))
    m = MixtureSampler([(a, 1.0), (c, 0.0)], mode="slot")
    assert torch.all(m.sample(batch, 4, torch.Generator().manual_seed(0)) < 10)


def test_mixture_propagates_progress_and_state():
    scorer = FakeScorer(16, 60)
    cur = CurriculumSampler(scorer, 60)
    m = MixtureSampler([(RandomSampler(60), 1.0), (cur, 1.0)])
    m.set_progress(0.7)
    assert cur.progress == pytest.approx(0.7)
    state = m.state_dict()
    cur2 = CurriculumSampler(scorer, 60)
    m2 = MixtureSampler([(RandomSampler(60), 1.0), (cur2, 1.0)])
    m2.load_state_dict(state)
    assert cur2.progress == pytest.approx(0.7)


@pytest.mark.parametrize("args, match", [
    (([],), "at least one"),
    (([(RandomSampler(10), -1.0)],), "weight"),
    (([(RandomSampler(10), 0.0)],), "positive sum"),
    (([(RandomSampler(10), 1.0), (RandomSampler(11), 1.0)],), "n_items"),
    (([(RandomSampler(10), 1.0)], "row"), "mode"),
    (([("random", 1.0)],), "Sampler, weight"),
])
def test_mixture_validation(args, match):
    with pytest.raises(SamplerError, match=match):
        MixtureSampler(*args)


# ---------------------------------------------------------------------------------------------- factory

def test_make_sampler_builds_every_strategy():
    scorer = FakeScorer(16, 60)
    assert isinstance(make_sampler("random", n_items=60), RandomSampler)
    assert isinstance(make_sampler("logs", n_items=60), LogsSampler)
    assert isinstance(make_sampler("cm_curriculum", scorer=scorer, n_items=60), CurriculumSampler)
    assert isinstance(make_sampler("onpolicy", decode_fn=fake_decode(60), n_items=60), OnPolicySampler)
    m = make_sampler("mixture", components=[(RandomSampler(60), 1.0)], mode="example")
    assert isinstance(m, MixtureSampler) and m.mode == "example"
    with pytest.raises(SamplerError, match="unknown sampler"):
        make_sampler("popularity", n_items=60)
    with pytest.raises(SamplerError, match="bad arguments"):
        make_sampler("random", n_items=60, pool_size=3)


# ---------------------------------------------------------------------------------------------- real data

def test_samplers_on_letter_beauty_training_examples():
    root = DATA / "letter" / "Beauty"
    if not (root / "Beauty.inter.json").exists():
        pytest.skip(f"shared data absent: {root}")
    from gflowgr_core.data.loaders import load_letter
    from gflowgr_core.data.split import leave_one_out

    data = leave_one_out(load_letter(root))
    train, n_items = data.train, data.num_items
    # Co-occurrence from a slice of the training examples keeps the test fast.
    logs = LogsSampler.from_split(train.subset(torch.arange(20000)), n_items, top_c=10)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 20000, (256,), generator=g)
    batch = SamplerBatch.from_split(train, idx)
    scorer = LowRankScorer(20000, n_items)
    for sampler in (logs, RandomSampler(n_items), CurriculumSampler(scorer, n_items),
                    OnPolicySampler(fake_decode(n_items), n_items)):
        items = sampler.sample(batch, 3, g)
        check_guarantees(batch, items, n_items, 3)
    items = logs.sample(batch, 5, g)
    hist_items = samplers_mod._member(items, batch.history)
    others = torch.where(batch.history != batch.positive[:, None], batch.history, -1)
    enough = samplers_mod._distinct_count(others) >= 5
    assert enough.any() and hist_items[enough].all()
    stats = logs.last_stats
    assert stats["from_history"] + stats["filled_cooc"] + stats["filled_random"] == 256 * 5
    assert stats["filled_cooc"] > 0
