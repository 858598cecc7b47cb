"""Trie-constrained decoding: step op semantics, backend dispatch, beam search against exhaustive scoring,
validity of every output on random tries with collisions, sampling, and the real Beauty catalogue."""
import os
from pathlib import Path

import pytest
import torch

from gflowgr_core import backends
from gflowgr_core.decoding import (beam_search, constrained_step, constrained_step_torch, leaves_to_items,
                                   recommend, sample)
from gflowgr_core.model import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.sid.trie import Trie

DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------ helpers
def random_catalog(cpl, n_items, seed, n_collisions=0):
    """Random SIDs; the last ``n_collisions`` items copy the SID of an earlier item (shared leaves)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, (n_items,), generator=g) for k in cpl], dim=1)
    for i in range(n_items - n_collisions, n_items):
        codes[i] = codes[int(torch.randint(0, n_items - n_collisions, (1,), generator=g))]
    return codes


def make_policy(codes, cpl, seed=0, hidden=32):
    token_map = SIDTokenMap.from_scratch(cpl)
    model = build_tiny_causal_lm(token_map.vocab_size, hidden=hidden, layers=2, heads=4, intermediate=64,
                                 seed=seed)
    return SIDPolicy(model, token_map, codes).eval()


def random_history(n_users, width, n_items, seed):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, n_items, (n_users, width), generator=g)
    lengths = torch.randint(0, width + 1, (n_users,), generator=g)
    pad = torch.arange(width)[None, :] < (width - lengths)[:, None]
    return hist.masked_fill(pad, -1)


def children_of(codes):
    """Python prefix → set of next codes: an independent reference for the trie's children."""
    out = {}
    for row in codes.tolist():
        for level in range(len(row)):
            out.setdefault(tuple(row[:level]), set()).add(row[level])
    return out


def teacher_forced_scores(policy, catalog_codes, history, traj, renormalize=True):
    """Sum over levels of the constrained log-prob of ``traj[B, T, L]``, by teacher forcing (no decoding)."""
    kids = children_of(catalog_codes)
    with torch.no_grad():
        return _teacher_forced(policy, kids, history, traj, renormalize)


def _teacher_forced(policy, kids, history, traj, renormalize):
    h, _, _ = policy.trajectory_hidden(history, traj)
    B, T, L = traj.shape
    total = torch.zeros(B, T)
    for level in range(L):
        logits = policy.sid_logits(h[:, :, level], level).float()
        mask = torch.zeros_like(logits, dtype=torch.bool)
        for b in range(B):
            for t in range(T):
                mask[b, t, sorted(kids[tuple(traj[b, t, :level].tolist())])] = True
        if renormalize:
            logp = torch.log_softmax(logits.masked_fill(~mask, NEG_INF), dim=-1)
        else:
            logp = torch.log_softmax(logits, dim=-1)
        total += logp.gather(-1, traj[:, :, level:level + 1]).squeeze(-1)
    return total


def exhaustive_topk(policy, catalog_codes, history, k, renormalize=True):
    """Score every catalogue item by teacher forcing and rank by (score desc, item id asc)."""
    B = history.shape[0]
    n = catalog_codes.shape[0]
    scores = teacher_forced_scores(policy, catalog_codes, history, catalog_codes[None].expand(B, n, -1),
                                   renormalize)
    # Items sharing a SID get their first holder's score, exactly (a shared leaf has one score).
    first = {}
    for i, row in enumerate(catalog_codes.tolist()):
        first.setdefault(tuple(row), i)
    holder = torch.tensor([first[tuple(r)] for r in catalog_codes.tolist()])
    scores = scores[:, holder]
    items, vals = [], []
    for b in range(B):
        ranked = sorted(range(n), key=lambda i: (-float(scores[b, i]), i))[:k]
        items.append(ranked + [-1] * (k - len(ranked)))
        vals.append([float(scores[b, i]) for i in ranked] + [NEG_INF] * (k - len(ranked)))
    return torch.tensor(items), torch.tensor(vals)


def dense_scores(out, K):
    """``[R, K]`` scores of a one-beam-per-row beam step, by code; dead slots go to a dropped column."""
    cols = torch.where(out.code >= 0, out.code, K)
    return torch.full((out.code.shape[0], K + 1), NEG_INF).scatter(1, cols, out.score)[:, :K]


def level_nodes(trie, level, n, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = trie.level_offsets[level].item(), trie.level_offsets[level + 1].item()
    return torch.randint(lo, hi, (n,), generator=g)


# ------------------------------------------------------------------------------------------ step op
CPL = (6, 5, 4)


@pytest.fixture(scope="module")
def small_trie():
    codes = random_catalog(CPL, 40, seed=1, n_collisions=3)
    return codes, Trie.build(codes, CPL)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_renormalized_step_is_a_distribution_over_children(small_trie, level):
    codes, trie = small_trie
    g = torch.Generator().manual_seed(level)
    R, d, K = 7, 8, CPL[level]
    h, w = torch.randn(R, d, generator=g), torch.randn(K, d, generator=g)
    node = level_nodes(trie, level, R, seed=level)
    # A beam step from one zero-score beam per row that keeps K beams lists every child with its log-prob.
    out = constrained_step(h, w, node, level, trie, "beam", scores=torch.zeros(R, 1), beams=K)
    mask = trie.child_mask(node, level)
    alive = out.score > NEG_INF
    assert torch.equal(alive.sum(1), mask.sum(1))
    torch.testing.assert_close(torch.where(alive, out.score.exp(), 0).sum(1), torch.ones(R))
    logits = h @ w.t()
    expected = torch.log_softmax(logits.masked_fill(~mask, NEG_INF), -1)
    got = dense_scores(out, K)
    torch.testing.assert_close(torch.where(mask, got, 0.0), torch.where(mask, expected, 0.0))
    # Every child leads to the trie's node for that code.
    torch.testing.assert_close(out.next_node, torch.where(alive, trie.next_node(node[:, None].expand(R, K),
                                                                               out.code), -1))

    raw = constrained_step(h, w, node, level, trie, "beam", scores=torch.zeros(R, 1), beams=K, renormalize=False)
    got_raw = dense_scores(raw, K)
    expected_raw = torch.log_softmax(logits, -1).masked_fill(~mask, NEG_INF)
    torch.testing.assert_close(got_raw, expected_raw)


def test_bias_is_added_to_the_level_logits(small_trie):
    _, trie = small_trie
    g = torch.Generator().manual_seed(0)
    h, w, bias = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    node = torch.zeros(3, dtype=torch.long)
    out = constrained_step(h, w, node, 0, trie, "beam", scores=torch.zeros(3, 1), beams=6, bias=bias)
    mask = trie.child_mask(node, 0)
    expected = torch.log_softmax((h @ w.t() + bias).masked_fill(~mask, NEG_INF), -1)
    got = dense_scores(out, 6)
    torch.testing.assert_close(got, expected)


def _one_node_case():
    """A single level-1 node with 4 children out of K=5, and fixed logits over the codes."""
    codes = torch.tensor([[0, 0], [0, 1], [0, 3], [0, 4], [1, 2]])
    trie = Trie.build(codes, (2, 5))
    w = torch.eye(5)
    logits = torch.tensor([0.3, -0.5, 2.0, 1.0, 0.0])
    return trie, w, logits, torch.tensor([True, True, False, True, True])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sample_frequencies_match_the_constrained_distribution(temperature):
    trie, w, logits, mask = _one_node_case()
    R = 40000
    node = torch.full((R,), 1)  # node 1 = prefix (0,)
    h = logits.expand(R, 5)
    out = constrained_step(h, w, node, 1, trie, "sample", temperature=temperature, seed=11)
    probs = torch.softmax((logits / temperature).masked_fill(~mask, NEG_INF), -1)
    freq = torch.bincount(out.code, minlength=5).float() / R
    assert freq[2] == 0 and bool((out.code >= 0).all())
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)
    # logp is the policy's (temperature 1) log-probability of the drawn code, renormalised over children.
    logp1 = torch.log_softmax(logits.masked_fill(~mask, NEG_INF), -1)
    torch.testing.assert_close(out.logp, logp1[out.code])
    assert torch.equal(out.next_node, trie.next_node(node, out.code))


def test_sample_is_deterministic_for_a_seed():
    trie, w, logits, _ = _one_node_case()
    h = (logits + torch.randn(64, 5)).contiguous()
    node = torch.full((64,), 1)
    a = constrained_step(h, w, node, 1, trie, "sample", seed=5)
    b = constrained_step(h, w, node, 1, trie, "sample", seed=5)
    c = constrained_step(h, w, node, 1, trie, "sample", seed=6)
    assert torch.equal(a.code, b.code) and not torch.equal(a.code, c.code)
    # A generator draws the noise key from its stream: equal generator states give equal draws.
    d = constrained_step(h, w, node, 1, trie, "sample", generator=torch.Generator().manual_seed(5))
    e = constrained_step(h, w, node, 1, trie, "sample", generator=torch.Generator().manual_seed(5))
    assert torch.equal(d.code, e.code)
    # A one-element device tensor is a key too (for CUDA graphs): same draws as the Python int.
    f = constrained_step(h, w, node, 1, trie, "sample", seed=torch.tensor([5]))
    assert torch.equal(a.code, f.code)


def test_sample_rejects_bad_temperature_and_handles_dead_rows():
    trie, w, logits, _ = _one_node_case()
    with pytest.raises(ValueError, match="temperature"):
        constrained_step(logits[None], w, torch.tensor([1]), 1, trie, "sample", temperature=0.0)
    out = constrained_step(logits.expand(2, 5), w, torch.tensor([-1, 1]), 1, trie, "sample", seed=0)
    assert out.code[0] == -1 and out.next_node[0] == -1 and out.logp[0] == NEG_INF
    assert out.code[1] >= 0 and torch.isfinite(out.logp[1])


def brute_force_beam(scores, logp, node, trie, level, beams):
    """Per batch element, rank every (beam, code) candidate by (score desc, flat index asc)."""
    B, beams_in = scores.shape
    K = logp.shape[1]
    parent = torch.zeros(B, beams, dtype=torch.long)
    code = torch.full((B, beams), -1)
    nxt = torch.full((B, beams), -1)
    score = torch.full((B, beams), NEG_INF)
    for b in range(B):
        cands = []
        for i in range(beams_in):
            for c in range(K):
                v = float(scores[b, i]) + float(logp[b * beams_in + i, c])
                if v > NEG_INF:
                    cands.append((-v, i * K + c, v))
        cands.sort()
        for slot, (_, flat, v) in enumerate(cands[:beams]):
            parent[b, slot], code[b, slot], score[b, slot] = flat // K, flat % K, v
            nxt[b, slot] = int(trie.next_node(node[b * beams_in + flat // K].reshape(1),
                                              torch.tensor([flat % K]), level=level))
    return parent, code, nxt, score


@pytest.mark.parametrize("seed, beams", [(0, 4), (1, 9), (2, 30)])
def test_beam_step_matches_brute_force_with_ties_and_dead_beams(small_trie, seed, beams):
    _, trie = small_trie
    level, K, d = 1, CPL[1], 6
    g = torch.Generator().manual_seed(seed)
    B, beams_in = 3, 4
    R = B * beams_in
    # Small integers make the logits exact whatever the matmul's summation order, so the ties are exact.
    w = torch.randint(-2, 3, (K, d), generator=g).float()
    w[3] = w[1]  # identical rows: tied logits
    h = torch.randint(-2, 3, (R, d), generator=g).float()
    h[5] = h[4]  # identical beams of one batch element: tied candidates across beams
    node = level_nodes(trie, level, R, seed)
    node[5] = node[4]
    scores = torch.randn(B, beams_in, generator=g)
    scores[1, 1] = scores[1, 0]
    scores[0, 2:] = NEG_INF  # dead beams
    scores[2, 1:] = NEG_INF  # few candidates: with beams > children some slots stay dead
    node[2] = -1
    out = constrained_step(h, w, node, level, trie, "beam", scores=scores, beams=beams)
    mask = trie.child_mask(node, level)
    logp = torch.log_softmax((h @ w.t()).masked_fill(~mask, NEG_INF), -1).masked_fill(~mask, NEG_INF)
    parent, code, nxt, score = brute_force_beam(scores, logp, node, trie, level, beams)
    torch.testing.assert_close(out.score, score)
    assert torch.equal(out.code, code) and torch.equal(out.next_node, nxt)
    alive = score > NEG_INF
    assert torch.equal(out.parent[alive], parent[alive])
    assert bool(((out.parent >= 0) & (out.parent < beams_in)).all())
    if beams == 30:
        assert not bool(alive[2].all())  # element 2 has one live beam with at most K children


def test_step_validates_shapes(small_trie):
    _, trie = small_trie
    h, w = torch.randn(2, 4), torch.randn(6, 4)
    node = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="K = 5"):
        constrained_step(h, w, node, 1, trie, "beam", scores=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="mode"):
        constrained_step(h, w, node, 0, trie, "greedy")
    with pytest.raises(ValueError, match="B \\* beams_in"):
        constrained_step(h, w, node, 0, trie, "beam", scores=torch.zeros(3, 1))


# ------------------------------------------------------------------------------------------ dispatch
def test_auto_backend_on_cpu_is_the_reference(small_trie):
    _, trie = small_trie
    out = constrained_step(torch.randn(2, 4), torch.randn(6, 4), torch.zeros(2, dtype=torch.long), 0, trie,
                           "beam", scores=torch.zeros(2, 1), beams=3)
    fused_cpu = [b for b in ("cpp",)
                 if b in backends.registered("constrained_step") and b in backends.available_backends()]
    assert (backends.last_resolution("constrained_step").name == (fused_cpu[0] if fused_cpu else "torch")
            and out.score.shape == (2, 3))
    constrained_step(torch.randn(2, 4), torch.randn(6, 4), torch.zeros(2, dtype=torch.long), 0, trie,
                     "beam", scores=torch.zeros(2, 1), beams=3, backend="torch")
    assert backends.last_resolution("constrained_step").name == "torch"


def test_registered_backend_is_dispatched_and_recorded(small_trie, monkeypatch):
    _, trie = small_trie
    entry = backends._op("constrained_step")
    monkeypatch.setattr(entry, "impls", {"torch": entry.impls["torch"]})
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch", "cpp"))
    calls = []

    def fake_cpp(*args, **kwargs):
        calls.append(args[3])
        return constrained_step_torch(*args, **kwargs)

    backends.register("constrained_step", "cpp", fake_cpp)
    args = (torch.randn(2, 4), torch.randn(6, 4), torch.zeros(2, dtype=torch.long), 0, trie, "beam")
    constrained_step(*args, scores=torch.zeros(2, 1), beams=3)
    assert calls == [0] and backends.last_resolution("constrained_step").name == "cpp"
    assert backends.last_resolution("constrained_step").reason == "auto on cpu chose 'cpp'"
    constrained_step(*args, scores=torch.zeros(2, 1), beams=3, backend="torch")
    assert calls == [0] and backends.last_resolution("constrained_step").name == "torch"
    # Named backends that cannot run here fall back to the auto choice and say why.
    constrained_step(*args, scores=torch.zeros(2, 1), backend="triton")
    assert calls == [0, 0] and backends.last_resolution("constrained_step").name == "cpp"
    assert "'triton' requested but constrained_step has no 'triton' implementation" in \
        backends.last_resolution("constrained_step").reason
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch",))
    constrained_step(*args, scores=torch.zeros(2, 1), backend="cpp")
    assert backends.last_resolution("constrained_step").name == "torch"
    reason = backends.last_resolution("constrained_step").reason
    assert "'cpp' requested but 'cpp' is not available here" in reason and "chose 'torch'" in reason
    with pytest.raises(ValueError, match="unknown backend"):
        constrained_step(*args, scores=torch.zeros(2, 1), backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.register("constrained_step", "tpu", fake_cpp)


# ------------------------------------------------------------------------------------------ beam search
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("cpl, n_items, collisions, seed", [((4, 3, 3), 24, 4, 0), ((5, 6), 20, 0, 1)])
def test_full_width_beam_equals_exhaustive_topk(cpl, n_items, collisions, seed, renormalize):
    codes = random_catalog(cpl, n_items, seed, collisions)
    trie = Trie.build(codes, cpl)
    policy = make_policy(codes, cpl, seed)
    history = random_history(3, 5, n_items, seed)
    k = n_items  # every item, ranked
    res = beam_search(policy, trie, history, beams=trie.num_leaves, topk=k, renormalize=renormalize)
    items, vals = exhaustive_topk(policy, codes, history, k, renormalize)
    assert torch.equal(res.items, items)
    torch.testing.assert_close(res.scores, vals, atol=1e-5, rtol=1e-5)
    assert res.backend == backends.resolve_backend("constrained_step", "auto", torch.device("cpu")).name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_returns_only_valid_distinct_catalogue_items(seed):
    cpl = (4, 4, 3)
    n_items = 30 + 5 * seed
    codes = random_catalog(cpl, n_items, seed, n_collisions=4)
    trie = Trie.build(codes, cpl)
    policy = make_policy(codes, cpl, seed)
    history = random_history(5, 6, n_items, seed + 10)
    beams = 6
    res = beam_search(policy, trie, history, beams=beams, topk=9, batch_size=2)
    assert res.items.shape == (5, 9) and res.leaves.shape == (5, beams)
    kids = children_of(codes)
    sids = {tuple(r) for r in codes.tolist()}
    for b in range(5):
        row = [i for i in res.items[b].tolist() if i >= 0]
        assert len(row) == len(set(row)) > 0
        assert res.items[b, :len(row)].tolist() == row  # -1 only at the end
        assert all(tuple(codes[i].tolist()) in sids for i in row)
        assert all(int(trie.item_leaf[i]) in res.leaves[b].tolist() for i in row)
        s = res.scores[b, :len(row)]
        assert bool((s[1:] <= s[:-1]).all())
    assert bool(trie.contains(trie.leaf_sid(res.leaves)).all())
    # The beams' scores are the teacher-forced scores of their SIDs (checks the KV-cache reordering).
    tf = teacher_forced_scores(policy, codes, history, trie.leaf_sid(res.leaves))
    torch.testing.assert_close(res.leaf_scores, tf, atol=1e-5, rtol=1e-5)
    assert len(kids) > 1


def test_beam_wider_than_catalogue_gives_dead_slots():
    cpl = (3, 3)
    codes = torch.tensor([[0, 1], [0, 2], [2, 0], [2, 0]])  # items 2 and 3 share a SID
    trie = Trie.build(codes, cpl)
    policy = make_policy(codes, cpl)
    res = beam_search(policy, trie, torch.tensor([[0, 1], [-1, 2]]), beams=5, topk=6)
    assert (res.leaves >= 0).sum(1).tolist() == [3, 3]
    assert bool((res.leaf_scores[:, 3:] == NEG_INF).all()) and bool((res.leaves[:, 3:] == -1).all())
    for b in range(2):
        assert sorted(res.items[b, :4].tolist()) == [0, 1, 2, 3]
        assert res.items[b, 4:].tolist() == [-1, -1]
        pos = res.items[b].tolist()
        assert abs(pos.index(3) - pos.index(2)) == 1 and pos.index(2) < pos.index(3)
        assert res.scores[b, pos.index(2)] == res.scores[b, pos.index(3)]


def test_leaves_to_items_ranks_by_score_then_item_id():
    codes = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0], [1, 0]])
    trie = Trie.build(codes, (2, 2))
    leaf = trie.item_leaf
    leaves = torch.tensor([[leaf[0], leaf[1], leaf[3], -1]])
    scores = torch.tensor([[-1.0, -0.5, -1.0, -0.1]])
    items, vals = leaves_to_items(trie, leaves, scores, k=7)
    assert items.tolist() == [[1, 0, 2, 3, 4, -1, -1]]
    assert vals.tolist() == [[-0.5, -1.0, -1.0, -1.0, -1.0, NEG_INF, NEG_INF]]


def test_beam_search_does_not_depend_on_batch_size():
    cpl = (4, 4, 3)
    codes = random_catalog(cpl, 30, 4, n_collisions=2)
    trie = Trie.build(codes, cpl)
    policy = make_policy(codes, cpl, 4)
    history = random_history(5, 7, 30, 3)
    a = beam_search(policy, trie, history, beams=5, batch_size=64)
    b = beam_search(policy, trie, history, beams=5, batch_size=2)
    assert torch.equal(a.items, b.items) and torch.equal(a.leaves, b.leaves)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def test_beam_search_single_level_and_restores_training_mode():
    cpl = (9,)
    codes = torch.tensor([[3], [1], [7], [1]])
    trie = Trie.build(codes, cpl)
    policy = make_policy(codes, cpl).train()
    res = beam_search(policy, trie, torch.tensor([[0, 2]]), beams=3, topk=4)
    assert policy.training
    assert sorted(res.items[0].tolist()) == [0, 1, 2, 3]
    items, vals = exhaustive_topk(policy.eval(), codes, torch.tensor([[0, 2]]), 4)
    assert torch.equal(res.items, items)


def test_beam_search_rejects_mismatched_trie():
    codes = random_catalog((4, 4), 10, 0)
    policy = make_policy(codes, (4, 4))
    with pytest.raises(ValueError, match="codes_per_level"):
        beam_search(policy, Trie.build(codes, (4, 5)), torch.tensor([[0]]))


def test_recommend_over_a_split():
    from gflowgr_core.data.split import Split

    cpl = (4, 3)
    codes = random_catalog(cpl, 12, 2)
    trie = Trie.build(codes, cpl)
    policy = make_policy(codes, cpl)
    history = random_history(5, 4, 12, 1)
    split = Split(history=history, target=torch.zeros(5, dtype=torch.long), user=torch.arange(5))
    res = recommend(policy, trie, split, k=3, beams=4, batch_size=2, progress=False)
    ref = beam_search(policy, trie, history, beams=4, topk=3)
    assert res.items.shape == (5, 3) and torch.equal(res.items, ref.items)
    with pytest.raises(TypeError, match="history"):
        recommend(policy, trie, history)


# ------------------------------------------------------------------------------------------ sampling
def test_sample_returns_catalogue_items_with_teacher_forced_log_probs():
    cpl = (4, 4, 3)
    codes = random_catalog(cpl, 25, 7, n_collisions=3)
    trie = Trie.build(codes, cpl)
    policy = make_policy(codes, cpl, 7)
    history = random_history(4, 5, 25, 2)
    res = sample(policy, trie, history, n=6, temperature=1.3, seed=0, batch_size=3)
    assert res.items.shape == (4, 6) and res.codes.shape == (4, 6, 3)
    assert bool((res.items >= 0).all()) and bool((res.items < 25).all())
    assert torch.equal(codes[res.items], res.codes)
    assert torch.equal(trie.item_leaf[res.items], res.leaves)
    torch.testing.assert_close(res.log_probs, teacher_forced_scores(policy, codes, history, res.codes),
                               atol=1e-5, rtol=1e-5)
    again = sample(policy, trie, history, n=6, temperature=1.3, seed=0, batch_size=3)
    other = sample(policy, trie, history, n=6, temperature=1.3, seed=1, batch_size=3)
    assert torch.equal(res.items, again.items) and not torch.equal(res.items, other.items)


def test_sample_picks_every_item_of_a_shared_leaf():
    codes = torch.tensor([[0, 0], [0, 0], [0, 0]])
    trie = Trie.build(codes, (1, 1))
    policy = make_policy(codes, (1, 1))
    res = sample(policy, trie, torch.tensor([[0]]), n=300, seed=0)
    assert set(res.items[0].tolist()) == {0, 1, 2}
    torch.testing.assert_close(res.log_probs, torch.zeros(1, 300))


# ------------------------------------------------------------------------------------------ real data
def test_beam_search_on_the_beauty_catalogue():
    index = DATA / "letter" / "Beauty" / "Beauty.index.json"
    if not index.is_file():
        pytest.skip(f"{index} absent (set GFLOWGR_DATA to the shared data folder)")
    from gflowgr_core.data.loaders import load_letter
    from gflowgr_core.sid.catalog import Catalog

    inter = load_letter(index.parent)
    catalog = Catalog.from_letter_index(index, inter.item_ids)
    trie = Trie.build(catalog.codes, catalog.codes_per_level)
    assert trie.num_items - trie.num_leaves == 13  # the known shared SIDs are kept
    policy = make_policy(catalog.codes, catalog.codes_per_level, hidden=32)
    history = torch.full((3, 20), -1)
    for u in range(3):
        seq = torch.as_tensor(inter.sequences[u][:-1][-20:])
        history[u, 20 - len(seq):] = seq
    res = beam_search(policy, trie, history, beams=20, topk=10)
    assert bool((res.items >= 0).all()) and bool((res.items < catalog.num_items).all())
    assert all(len(set(r)) == 10 for r in res.items.tolist())
    assert bool(trie.contains(catalog.codes[res.items]).all())
    tf = teacher_forced_scores(policy, catalog.codes, history, trie.leaf_sid(res.leaves))
    torch.testing.assert_close(res.leaf_scores, tf, atol=1e-4, rtol=1e-5)
