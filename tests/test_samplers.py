"""Tests of gflowgr_core.samplers (augmented-trajectory samplers, METHOD.md §4)."""
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gflowgr_core.samplers as samplers_mod
from gflowgr_core.samplers import (CurriculumSampler, LogsSampler, MixtureSampler, OnPolicySampler,
                                   RandomSampler, Sampler, SamplerError, build_cooccurrence, make_sampler)
from gflowgr_core.trajectories import ExampleBatch

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
    return ExampleBatch(example_idx, history, positive)


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
    # Only shapes where every row has n_aug items outside its history and positive: an infeasible row raises
    # SamplerError by design (test_random_exact_fallback_used_for_tiny_allowed_sets checks that error).
    forbidden = [{*h[h >= 0].tolist(), int(p)} for h, p in zip(batch.history, batch.positive)]
    assume(all(n_items - len(f) >= n_aug for f in forbidden))
    sampler = all_samplers(n_items=n_items, n_examples=B)[name]
    items = sampler.sample(batch, n_aug, torch.Generator().manual_seed(seed))
    check_guarantees(batch, items, n_items, n_aug)


# ---------------------------------------------------------------------------------------------- random

def test_random_excludes_history_and_is_uniform():
    n_items = 12
    history = torch.tensor([[-1, 0, 1, 2, 3]])
    batch = ExampleBatch(torch.tensor([0]), history, torch.tensor([4]))
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
    batch = ExampleBatch(torch.tensor([0, 1]), history, torch.tensor([3, 4]))
    with pytest.raises(SamplerError, match=r"batch row 0 needs 2 more.*only 1"):
        RandomSampler(5).sample(batch, 2, torch.Generator().manual_seed(0))
    with pytest.raises(SamplerError, match="n_items"):
        RandomSampler(5).sample(batch, 5, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("field, value, match", [
    ("positive", torch.tensor([0, 60]), r"batch.positive.*\[0, 60\).*\[1\]"),
    ("history", torch.tensor([[0, -2], [1, 2]]), r"batch.history.*\[-1, 60\)"),
    ("positive", torch.tensor([0.0, 1.0]), "integer"),
    ("example", torch.tensor([0]), "example"),
])
def test_bad_batches_are_rejected(field, value, match):
    kw = dict(example=torch.tensor([0, 1]), history=torch.tensor([[0, 1], [1, 2]]), positive=torch.tensor([3, 4]))
    kw[field] = value
    with pytest.raises(SamplerError, match=match):
        RandomSampler(60).sample(ExampleBatch(**kw), 2, torch.Generator().manual_seed(0))
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
    batch = ExampleBatch(torch.arange(3), history, positive)
    sampler = LogsSampler(n_items, cooc)
    items = sampler.sample(batch, 3, torch.Generator().manual_seed(0))
    assert items[0].tolist() == [1, 20, 21]
    assert set(items[1].tolist()) <= {2, 3, 4, 5, 6}
    assert not set(items[2].tolist()) & {0}
    assert sampler.last_stats == {"from_history": 4, "filled_cooc": 2, "filled_random": 3}


def test_logs_recent_pick_and_window():
    history = torch.tensor([[5, 6, 7, 8, 7, 9]])
    batch = ExampleBatch(torch.tensor([0]), history, torch.tensor([9]))
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
    batch = ExampleBatch(torch.tensor([0]), history, torch.tensor([9]))
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
        means.append(scorer.score(batch.example, items).mean().item())
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert sampler.last_stats["filled_random"] == 0


def test_curriculum_extremes_pick_lowest_and_highest_pool_items():
    n_items = 50
    scorer = FakeScorer(1, n_items, seed=9)
    batch = ExampleBatch(torch.tensor([0]), torch.full((1, 3), -1), torch.tensor([0]))
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
    from gflowgr_core import collaborative

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
    assert scorer.score(batch.example, hi).mean() > scorer.score(batch.example, lo).mean()


# ---------------------------------------------------------------------------------------------- on-policy

def test_onpolicy_takes_decoded_order_excluding_positive_and_fills_missing():
    calls = []

    def decode(history, k):
        calls.append(k)
        return torch.tensor([[5, 3, 5, 8, -1], [1, -1, -1, -1, -1]])

    batch = ExampleBatch(torch.arange(2), torch.tensor([[0, 1], [2, 1]]), torch.tensor([3, 9]))
    s = OnPolicySampler(decode, 20, extra=2, exclude_history=False)
    items = s.sample(batch, 3, torch.Generator().manual_seed(0))
    assert calls == [5]
    assert items[0].tolist() == [5, 8, items[0, 2].item()] and items[0, 2].item() not in {0, 1, 3, 5, 8}
    # exclude_history=False keeps decoded history items; random fills avoid the history.
    assert items[1, 0].item() == 1 and not set(items[1, 1:].tolist()) & {1, 2, 9}
    assert s.last_stats == {"from_policy": 3, "filled_random": 3}
    # The default drops them, like every sampler's augmentations.
    s = OnPolicySampler(decode, 20, extra=2)
    items = s.sample(batch, 3, torch.Generator().manual_seed(0))
    assert items[0, :2].tolist() == [5, 8] and 1 not in items[1].tolist()
    assert not set(items[1].tolist()) & {1, 2, 9} and s.last_stats == {"from_policy": 2, "filled_random": 4}


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
    batch = ExampleBatch.from_split(train, idx)
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


# ------------------------------------------------------------------- the user's training items (UserItems)

def make_split(n_users=24, n_items=80, max_history=3, seed=0):
    """A leave-one-out split of random sequences (distinct items per user), and each user's training items."""
    import numpy as np

    from gflowgr_core.data.loaders import Interactions
    from gflowgr_core.data.split import leave_one_out

    rng = np.random.default_rng(seed)
    seqs = [rng.permutation(n_items)[:int(rng.integers(4, 30))].astype(np.int64) for _ in range(n_users)]
    inter = Interactions([f"u{u}" for u in range(n_users)], [str(i) for i in range(n_items)], seqs, "synthetic")
    data = leave_one_out(inter, max_history=max_history)
    train_items = {u: set(s[:-2].tolist()) for u, s in enumerate(seqs)}
    return data.train, train_items


def test_user_items_rows_are_each_users_whole_training_part():
    train, train_items = make_split()
    ui = samplers_mod.UserItems(train)
    assert ui.num_examples == len(train)
    idx = torch.arange(len(train))
    rows = ui.rows(idx)
    for r, row in zip(idx.tolist(), rows.tolist()):
        got = [x for x in row if x >= 0]
        assert got == sorted(train_items[int(train.user[r])])
        assert row[len(got):] == [-1] * (len(row) - len(got))
    # Far more than the 3-item history window.
    assert rows.shape[1] > train.history.shape[1]
    assert ui.rows(torch.empty(0, dtype=torch.long)).shape == (0, 0)
    with pytest.raises(SamplerError, match=r"rows of the training split \[0, \d+\); got \[-1\]"):
        ui.rows(torch.tensor([0, -1]))
    with pytest.raises(SamplerError, match="UserItems"):
        make_sampler("random", n_items=80, user_items=object())


def _user_item_mask(example_idx, train, train_items):
    """Reference: Bool[B, n_items], True for the training items of each example's user."""
    mask = torch.zeros(example_idx.shape[0], 80, dtype=torch.bool)
    for b, r in enumerate(example_idx.tolist()):
        mask[b, sorted(train_items[int(train.user[r])])] = True
    return mask


def test_random_and_curriculum_exclude_every_training_item_of_the_user():
    train, train_items = make_split()
    ui = samplers_mod.UserItems(train)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(train), (64,), generator=g)
    batch = ExampleBatch.from_split(train, idx)
    mask = _user_item_mask(idx, train, train_items)
    # The scorer ranks the user's own training items highest, so the curriculum pool would take them.
    scorer = FakeScorer(len(train), 80)
    scorer.S += 10.0 * _user_item_mask(torch.arange(len(train)), train, train_items)
    with_ui = [RandomSampler(80, user_items=ui), CurriculumSampler(scorer, 80, pool_size=30, n_random=10,
                                                                  user_items=ui)]
    for s in with_ui:
        s.set_progress(1.0)
        for _ in range(5):
            items = s.sample(batch, 4, g)
            check_guarantees(batch, items, 80, 4)
            assert not mask.gather(1, items).any(), type(s).__name__
    # Without user_items only the history window is excluded: older training items do come back.
    for s in (RandomSampler(80), CurriculumSampler(scorer, 80, pool_size=30, n_random=10)):
        s.set_progress(1.0)
        hits = sum(int(mask.gather(1, s.sample(batch, 4, g)).sum()) for _ in range(5))
        assert hits > 0, type(s).__name__


def test_random_with_user_items_is_uniform_over_the_unseen_items():
    train, train_items = make_split(n_users=4)
    ui = samplers_mod.UserItems(train)
    r = int(len(train) - 1)
    batch = ExampleBatch.from_split(train, torch.full((4000,), r))
    allowed = sorted(set(range(80)) - train_items[int(train.user[r])] - {int(train.target[r])})
    items = RandomSampler(80, user_items=ui).sample(batch, 2, torch.Generator().manual_seed(3))
    counts = Counter(items.flatten().tolist())
    assert sorted(counts) == allowed
    expected = 8000 / len(allowed)
    assert max(abs(c - expected) for c in counts.values()) < 6 * expected ** 0.5


def test_every_random_fill_excludes_the_users_training_items():
    train, train_items = make_split()
    ui = samplers_mod.UserItems(train)
    g = torch.Generator().manual_seed(1)
    batch = ExampleBatch.from_split(train, torch.randint(0, len(train), (32,), generator=g))
    mask = _user_item_mask(batch.example, train, train_items)
    # A decoder that returns nothing forces the on-policy sampler to fill every slot at random.
    empty = OnPolicySampler(lambda h, k: torch.full((h.shape[0], k), -1), 80, user_items=ui)
    logs = LogsSampler(80, None, window=1, user_items=ui)
    mix = MixtureSampler([(empty, 1.0)], user_items=ui)
    for s in (empty, logs, mix):
        items = s.sample(batch, 5, g)
        check_guarantees(batch, items, 80, 5)
        from_history = samplers_mod._member(items, batch.history[:, -1:])
        assert not (mask.gather(1, items) & ~from_history).any(), type(s).__name__


def _users_own_first(train, n_items):
    """A decoder that recommends each user's own training items first (a recommender often does), then others."""
    ui = samplers_mod.UserItems(train)
    rows_of = {}
    for r in range(len(train)):
        rows_of.setdefault(tuple(train.history[r].tolist()), r)

    def decode(history, k):
        rows = torch.tensor([rows_of[tuple(h.tolist())] for h in history])
        own = ui.rows(rows)
        others = fake_decode(n_items)(history, k)
        return torch.cat([own, others], dim=1)[:, :k].clamp(min=-1)
    return decode


def test_onpolicy_default_excludes_the_users_training_items_and_asks_for_enough():
    train, train_items = make_split()
    ui = samplers_mod.UserItems(train)
    g = torch.Generator().manual_seed(4)
    batch = ExampleBatch.from_split(train, torch.randint(0, len(train), (48,), generator=g))
    mask = _user_item_mask(batch.example, train, train_items)
    decode = _users_own_first(train, 80)
    # The decoder's first picks are the user's items: kept with exclude_history=False ...
    kept = OnPolicySampler(decode, 80, user_items=ui, exclude_history=False).sample(batch, 3, g)
    assert mask.gather(1, kept).float().mean() > 0.9
    # ... and never by default (make_sampler, as the trainer builds it), with the decoder's own order kept.
    calls = []

    def recorded(history, k):
        calls.append(k)
        return decode(history, k)
    s = make_sampler("onpolicy", decode_fn=recorded, n_items=80, user_items=ui)
    items = s.sample(batch, 3, g)
    check_guarantees(batch, items, 80, 3)
    assert not mask.gather(1, items).any()
    assert calls == [3 + 1 + batch.history.shape[1]]  # extra covers the history window: 1 + H


def test_trainer_onpolicy_sampler_excludes_the_users_training_items(tmp_path, beauty_tiny):
    from gflowgr_core.data.prepared import prepare
    from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import Trainer

    data = prepare("letter", beauty_tiny, tmp_path / "data", max_users=40)
    lm = build_tiny_causal_lm(data.tokens.vocab_size, hidden=32, layers=1, heads=2, seed=0)
    SIDPolicy(lm, data.tokens, data.catalog.codes, data.catalog.codes_per_level, flow_hidden=16).save(tmp_path / "sft")
    trainer = Trainer(load_config(None, [f"data={tmp_path / 'data'}", f"out={tmp_path / 'out'}", "stage=gflowgr",
                                         f"init_checkpoint={tmp_path / 'sft'}", "gfn.sampler=onpolicy", "gfn.n_aug=3",
                                         "gfn.reward.use_cm=false", "device=cpu", "model.flow_hidden=16"]), data)
    train = data.split.train
    assert trainer.sampler.exclude_history
    trainer.sampler.decode_fn = _users_own_first(train, data.num_items)  # the worst case: history first
    index = torch.arange(min(64, len(train)))
    items = trainer.draw_candidates(index)
    own = samplers_mod.UserItems(train).rows(index)
    assert not samplers_mod._member(items.cpu(), own).any()
    # The beam-search decoder itself runs with the enlarged request (n_aug + 1 + H items).
    assert trainer._decode_for_sampler(train.history[index[:4]], 3 + 1 + train.history.shape[1]).shape == \
        (4, 3 + 1 + train.history.shape[1])


def test_logs_cooccurrence_fill_skips_the_users_items():
    train, train_items = make_split(max_history=3)
    ui = samplers_mod.UserItems(train)
    rows = torch.tensor([r for r in range(len(train)) if len(train_items[int(train.user[r])]) >= 8][:16])
    batch = ExampleBatch.from_split(train, rows)
    mask = _user_item_mask(rows, train, train_items)
    # Every positive's top co-occurring items are its user's own training items (older than the window),
    # then items of nobody's history.
    cooc = torch.full((80, 12), -1, dtype=torch.long)
    for b, r in enumerate(rows.tolist()):
        own = sorted(train_items[int(train.user[r])] - {int(train.target[r])})
        fresh = [i for i in range(80) if not mask[b, i] and i != int(train.target[r])]
        cooc[int(train.target[r])] = torch.tensor((own[:6] + fresh[:6])[:12])
    window = LogsSampler(80, cooc, window=1, user_items=ui)
    items = window.sample(batch, 5, torch.Generator().manual_seed(0))
    check_guarantees(batch, items, 80, 5)
    from_history = samplers_mod._member(items, batch.history[:, -1:])
    assert not (mask.gather(1, items) & ~from_history).any()  # only the history picks are the user's items
    assert window.last_stats["filled_cooc"] > 0 and window.last_stats["filled_random"] == 0
    # Without user_items the example's history (here 3 positions, of which `window` picks from the last) is
    # still kept out of the fill: co-occurrence lists led by the two older history items.
    for b, r in enumerate(rows.tolist()):
        older = [int(x) for x in batch.history[b, :2] if x >= 0 and int(x) != int(train.target[r])]
        cooc[int(train.target[r]), :len(older)] = torch.tensor(older, dtype=torch.long)
    plain = LogsSampler(80, cooc, window=1)
    items = plain.sample(batch, 5, torch.Generator().manual_seed(0))
    check_guarantees(batch, items, 80, 5)
    older = samplers_mod._member(items, batch.history) & ~samplers_mod._member(items, batch.history[:, -1:])
    assert not older.any() and plain.last_stats["filled_cooc"] > 0


# ---------------------------------------------------------------------------- items sharing the positive's SID

def shared_codes(n_items=60, seed=0):
    """SIDs where items 2k and 2k+1 share one (every item has a sibling), L = 2."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randperm(n_items // 2 * 7, generator=g)[: n_items // 2]
    codes = torch.stack([base // 7, base % 7], dim=1).repeat_interleave(2, dim=0)
    return codes


def sibling(items):
    return items ^ 1


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_no_sampler_offers_an_item_with_the_positives_sid(name):
    n_items = 60
    codes = shared_codes(n_items)
    base = all_samplers(n_items)
    batch = make_batch(n_items=n_items, seed=5)
    # Siblings are everywhere the samplers look: in the history, first in the decoded lists, atop the pool,
    # first among the co-occurring items.
    batch.history[:, -2] = sibling(batch.positive)

    def decode(history, k):
        # history[:, -2] holds the positive's sibling (rows may be a mixture's subset).
        return torch.cat([history[:, -2:-1], fake_decode(n_items)(history, k - 1)], dim=1)

    scorer = FakeScorer(16, n_items)
    scorer.S[batch.example, sibling(batch.positive)] = 100.0
    cooc = torch.full((n_items, 3), -1)
    cooc[:, 0] = sibling(torch.arange(n_items))
    kw = dict(item_codes=codes)
    built = {
        "random": RandomSampler(n_items, **kw),
        "logs": LogsSampler(n_items, cooc, **kw),
        "logs_recent_window": LogsSampler(n_items, cooc, window=3, pick="recent", **kw),
        "logs_no_cooc": LogsSampler(n_items, None, **kw),
        "cm_curriculum": CurriculumSampler(scorer, n_items, pool_size=20, n_random=20, end_quantile=1.0, **kw),
        "onpolicy": OnPolicySampler(decode, n_items, **kw),
    }
    built["cm_curriculum"].set_progress(1.0)
    built["mixture_slot"] = MixtureSampler([(built["random"], 1.0), (built["logs"], 1.0),
                                            (built["cm_curriculum"], 0.5), (built["onpolicy"], 0.5)], **kw)
    built["mixture_example"] = MixtureSampler([(built["random"], 1.0), (built["logs"], 2.0),
                                               (built["onpolicy"], 1.0)], mode="example", **kw)
    assert set(built) == set(base)
    s = built[name]
    g = torch.Generator().manual_seed(0)
    for n_aug in (1, 3, 6):
        items = s.sample(batch, n_aug, g)
        check_guarantees(batch, items, n_items, n_aug)
        assert not (items == sibling(batch.positive)[:, None]).any()
    # Without item_codes the same sampler does offer the sibling (the case the exclusion is for).
    if name in ("onpolicy", "logs_recent_window"):
        plain = OnPolicySampler(decode, n_items, exclude_history=False) if name == "onpolicy" else \
            LogsSampler(n_items, cooc, window=3, pick="recent")
        assert (plain.sample(batch, 3, g) == sibling(batch.positive)[:, None]).any()


def test_output_check_rejects_an_item_with_the_positives_sid():
    codes = shared_codes(40)

    class Offers(Sampler):
        def __init__(self, n_items, offer, **kw):
            super().__init__(n_items, **kw)
            self.offer = offer

        def _sample(self, batch, n_aug, generator):
            return self.offer(batch)[:, :n_aug]

    batch = ExampleBatch(torch.arange(2), torch.full((2, 3), -1), torch.tensor([4, 9]))
    bad = Offers(40, lambda b: torch.stack([sibling(b.positive), b.positive + 2], dim=1), item_codes=codes)
    with pytest.raises(SamplerError, match=r"positive's SID in batch row 0: positive 4, items \[5\]"):
        bad.sample(batch, 1, torch.Generator())
    with pytest.raises(SamplerError, match=r"item_codes must be \[n_items=40, L\]"):
        RandomSampler(40, item_codes=codes[:-1])
    # Unique SIDs (a "suffix" catalogue): nothing beyond the positive is excluded.
    unique = torch.arange(40)[:, None]
    assert Offers(40, lambda b: sibling(b.positive)[:, None], item_codes=unique).sample(batch, 1).tolist() == \
        [[5], [8]]


# ------------------------------------------------------------------------------- on-policy sampling mode

def fake_sample_fn(n_items, calls=None):
    """Draws with replacement from a fixed distribution sharpened by 1/temperature, using the generator."""
    logits = torch.linspace(3.0, -3.0, n_items)

    def sample_fn(history, k, temperature, generator):
        if calls is not None:
            calls.append((k, temperature))
        probs = torch.softmax(logits / temperature, 0).expand(history.shape[0], -1)
        return torch.multinomial(probs, k, replacement=True, generator=generator)

    return sample_fn


def test_onpolicy_sample_mode_uses_temperature_generator_and_keeps_distinct_draws():
    calls = []
    s = OnPolicySampler(None, 60, mode="sample", sample_fn=fake_sample_fn(60, calls), temperature=0.7)
    batch = make_batch()
    a = s.sample(batch, 4, torch.Generator().manual_seed(9))
    assert calls == [(16, 0.7)]  # default extra = n_aug (draws repeat) + history width 8 (history dropped)
    check_guarantees(batch, a, 60, 4)
    assert s.last_stats["from_policy"] + s.last_stats["filled_random"] == 16 * 4
    b = s.sample(batch, 4, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    assert OnPolicySampler(None, 60, extra=0, mode="sample", sample_fn=fake_sample_fn(60, calls)).sample(
        batch, 4, torch.Generator().manual_seed(9)).shape == (16, 4) and calls[-1] == (4, 1.0)


def test_onpolicy_sample_mode_keeps_draws_in_order_and_drops_forbidden_ones():
    draws = torch.tensor([[7, 7, 3, 5, 3, 9], [2, 2, 2, 2, 2, 2]])
    batch = ExampleBatch(torch.arange(2), torch.tensor([[0, 5], [1, 4]]), torch.tensor([3, 8]))
    s = OnPolicySampler(None, 20, mode="sample", sample_fn=lambda h, k, t, g: draws, exclude_history=False)
    items = s.sample(batch, 3, torch.Generator().manual_seed(0))
    assert items[0].tolist() == [7, 5, 9]              # 3 is the positive; 5 is kept (history allowed)
    assert items[1, 0].item() == 2 and not set(items[1, 1:].tolist()) & {1, 4, 8, 2}
    assert s.last_stats == {"from_policy": 4, "filled_random": 2}
    s = OnPolicySampler(None, 20, mode="sample", sample_fn=lambda h, k, t, g: draws, extra=3)  # default: excluded
    assert 5 not in s.sample(batch, 3, torch.Generator().manual_seed(0))[0].tolist()


@pytest.mark.parametrize("kw, match", [
    (dict(mode="sample"), r"mode='sample'\)\.sample_fn must be callable"),
    (dict(mode="greedy", sample_fn=fake_sample_fn(60)), "mode must be 'beam' or 'sample'"),
    (dict(mode="sample", sample_fn=fake_sample_fn(60), temperature=0.0), "temperature"),
    (dict(mode="sample", sample_fn=fake_sample_fn(60), temperature=float("inf")), "temperature"),
    (dict(mode="sample", sample_fn=fake_sample_fn(60), extra=-1), "extra"),
])
def test_onpolicy_sample_mode_validation(kw, match):
    with pytest.raises(SamplerError, match=match):
        OnPolicySampler(None, 60, **kw)


def test_onpolicy_sample_mode_bad_output_is_reported():
    s = OnPolicySampler(None, 60, mode="sample", sample_fn=lambda h, k, t, g: torch.zeros(h.shape[0], k + 1))
    with pytest.raises(SamplerError, match="sample_fn output must be an integer tensor"):
        s.sample(make_batch(), 2, torch.Generator())
    s = OnPolicySampler(None, 60, mode="sample",
                        sample_fn=lambda h, k, t, g: torch.zeros(h.shape[0], k + 1, dtype=torch.long))
    # k = n_aug 2 + extra (n_aug 2 + history width 8)
    with pytest.raises(SamplerError, match=r"sample_fn\(history\[16, 8\], 12\) returned \(16, 13\)"):
        s.sample(make_batch(), 2, torch.Generator())


def test_user_items_and_shared_sids_on_letter_beauty():
    root = DATA / "letter" / "Beauty"
    if not (root / "Beauty.inter.json").exists():
        pytest.skip(f"shared data absent: {root}")
    from gflowgr_core.data.loaders import load_letter
    from gflowgr_core.data.split import leave_one_out
    from gflowgr_core.sid.catalog import Catalog

    inter = load_letter(root)
    data = leave_one_out(inter)
    train, n_items = data.train, data.num_items
    catalog = Catalog.from_letter_index(root / "Beauty.index.json", inter.item_ids)
    ui = samplers_mod.UserItems(train)
    g = torch.Generator().manual_seed(0)
    # Rows whose positive has a SID sibling, plus random rows.
    _, group, counts = torch.unique(catalog.codes, dim=0, return_inverse=True, return_counts=True)
    shared_rows = (counts[group[train.target]] > 1).nonzero().flatten()
    assert shared_rows.numel() > 0
    idx = torch.cat([shared_rows[:64], torch.randint(0, len(train), (192,), generator=g)])
    batch = ExampleBatch.from_split(train, idx)
    rows = ui.rows(idx)
    for b in range(0, idx.numel(), 37):
        u = int(train.user[idx[b]])
        mine = train.user == u
        want = set(train.target[mine].tolist()) | set(train.history[mine].flatten().tolist()) - {-1}
        assert set(rows[b].tolist()) - {-1} == want
    scorer = LowRankScorer(len(train), n_items)
    for sampler in (RandomSampler(n_items, user_items=ui, item_codes=catalog),
                    CurriculumSampler(scorer, n_items, user_items=ui, item_codes=catalog)):
        items = sampler.sample(batch, 5, g)
        check_guarantees(batch, items, n_items, 5)
        assert not samplers_mod._member(items, rows).any()
        assert not (group[items] == group[batch.positive][:, None]).any()


def test_set_helpers_match_python_sets():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-1, 9, (50, 12), generator=g)
    s = torch.randint(-1, 9, (50, 5), generator=g)
    member = samplers_mod._member(x, s)
    for row, srow, mrow, n in zip(x.tolist(), s.tolist(), member.tolist(), samplers_mod._distinct_count(x).tolist()):
        assert n == len(set(row) - {-1})
        assert mrow == [v in srow for v in row]
    assert samplers_mod._distinct_count(torch.empty(3, 0, dtype=torch.long)).tolist() == [0, 0, 0]
