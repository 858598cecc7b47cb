"""Evaluation: length-sorted beam search gives the rankings of the given order, the beam tree over one copy of
each prompt (``shared_prompt``) those of per-beam cache copies, both scorings come from one call, and the level scoring (``renormalize=False``) ranks SIDs as Hugging Face beam search does.

A tiny prepared dataset built in memory: random sequences of 3..14 items (histories from 1 item to past
``max_history``), a random 3-level catalogue with shared SIDs, a tiny Qwen2 with peaked logits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from gflowgr_core.data.loaders import Interactions
from gflowgr_core.data.prepared import PreparedData
from gflowgr_core.data.split import leave_one_out
from gflowgr_core.decoding import search as search_module
from gflowgr_core.decoding.search import beam_search, beam_search_scorings
from gflowgr_core.evaluation import (AGREEMENT_KEY, EVAL_KS, evaluate_policy, leaf_representatives,
                                     top_k_agreement)
from gflowgr_core.hf_processor import SIDTrieLogitsProcessor, sids_from_sequences
from gflowgr_core.metrics import evaluate_rankings, item_popularity
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.sid.catalog import Catalog
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.sid.trie import Trie

CPL = (6, 5, 4)
N_ITEMS = 60
MAX_HISTORY = 8


def tiny_data(seed: int = 0, n_users: int = 70) -> PreparedData:
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, N_ITEMS, size=int(rng.integers(3, 15))).astype(np.int64) for _ in range(n_users)]
    interactions = Interactions(user_ids=[f"u{i}" for i in range(n_users)],
                                item_ids=[str(i) for i in range(N_ITEMS)], sequences=sequences, source="random")
    split = leave_one_out(interactions, max_history=MAX_HISTORY)
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, (N_ITEMS,), generator=g) for k in CPL], dim=1)
    codes[1] = codes[0]  # a shared SID: one leaf, two items
    catalog = Catalog.from_codes(codes, CPL, interactions.item_ids, collisions="share")
    trie = Trie.build(catalog.codes, CPL)
    return PreparedData(split=split, catalog=catalog, trie=trie, tokens=SIDTokenMap.from_scratch(CPL),
                        popularity=item_popularity(split), item_ids=interactions.item_ids,
                        user_ids=interactions.user_ids, stats={"sid_collisions": 1})


def tiny_policy(data: PreparedData, seed: int = 0) -> SIDPolicy:
    model = build_tiny_causal_lm(data.tokens.vocab_size, hidden=32, layers=2, heads=2, seed=seed)
    with torch.no_grad():  # peaked next-token distributions: rankings far from uniform, no near-ties
        model.lm_head.weight.mul_(30.0)
    return SIDPolicy(model, data.tokens, data.catalog.codes, data.catalog.codes_per_level, flow_hidden=16).eval()


@pytest.fixture(scope="module")
def setup():
    data = tiny_data()
    return data, tiny_policy(data)


def assert_same_rankings(a, b):
    assert torch.equal(a.items, b.items)
    assert torch.equal(a.leaves, b.leaves)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.leaf_scores, b.leaf_scores, rtol=1e-5, atol=1e-5)


def test_fixture_mixes_history_lengths(setup):
    data, _ = setup
    lengths = (data.split.valid.history >= 0).sum(1)
    assert int(lengths.min()) <= 2 and int(lengths.max()) == MAX_HISTORY  # short users and truncated ones
    assert len(torch.unique(lengths)) >= 5


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("batch_size", [5, 32])
def test_length_sorted_beam_search_equals_given_order(setup, renormalize, batch_size):
    data, policy = setup
    history = data.split.valid.history
    ref = beam_search(policy, data.trie, history, beams=12, topk=20, batch_size=batch_size,
                      renormalize=renormalize, sort_by_length=False)
    got = beam_search(policy, data.trie, history, beams=12, topk=20, batch_size=batch_size,
                      renormalize=renormalize)
    assert_same_rankings(got, ref)
    # The sorted path really reorders: the first batch of the given order mixes lengths.
    lengths = (history[:batch_size] >= 0).sum(1)
    assert len(torch.unique(lengths)) > 1


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_beam_tree_equals_per_beam_cache_copies(arch, attn):
    data = tiny_data(seed=1)
    model = build_tiny_causal_lm(data.tokens.vocab_size, hidden=32, layers=2, heads=2, arch=arch, seed=3,
                                 attn_implementation=attn)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    policy = SIDPolicy(model, data.tokens, data.catalog.codes, CPL, flow_hidden=16).eval()
    history = data.split.valid.history
    # Beam 7 > 6 first-level children: dead beams at level 0 are carried along; beam 70 > 60 items: dead at the end.
    for beams in (7, 70):
        tree = beam_search_scorings(policy, data.trie, history, (False, True), beams=beams, topk=20, batch_size=16)
        copies = beam_search_scorings(policy, data.trie, history, (False, True), beams=beams, topk=20,
                                      batch_size=16, shared_prompt=False)
        for a, b in zip(tree, copies):
            assert_same_rankings(a, b)
        assert bool((tree[0].leaves == -1).any()) == (beams == 70)


def test_beam_tree_falls_back_for_attention_without_4d_masks(setup, monkeypatch):
    data, policy = setup
    assert search_module._beam_cache(policy, True) is search_module._BeamTree
    assert search_module._beam_cache(policy, False) is search_module._CopiedBeams
    monkeypatch.setattr(policy.model.config, "_attn_implementation", "flash_attention_2")
    assert search_module._beam_cache(policy, True) is search_module._CopiedBeams


def test_both_scorings_in_one_call_equal_separate_searches(setup):
    data, policy = setup
    history = data.split.test.history
    both = beam_search_scorings(policy, data.trie, history, (False, True), beams=10, topk=20, batch_size=16)
    for result, renormalize in zip(both, (False, True)):
        alone = beam_search(policy, data.trie, history, beams=10, topk=20, batch_size=16,
                            renormalize=renormalize, sort_by_length=False)
        assert_same_rankings(result, alone)
    # The two scorings rank differently on this model (else the test would not tell them apart).
    assert not torch.equal(both[0].leaves, both[1].leaves)


def test_top_k_agreement():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1], [7, 8, 9, 10]])
    b = torch.tensor([[4, 3, 9, 8], [6, -1, -1, 5], [11, 12, 13, 14]])
    assert top_k_agreement(a, b) == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert top_k_agreement(a, a) == pytest.approx((1 + 0.5 + 1) / 3)  # empty slots never agree
    with pytest.raises(ValueError, match="same"):
        top_k_agreement(a, b[:, :3])


def test_evaluate_policy_reports_both_scorings(setup):
    data, policy = setup
    index = torch.arange(5, 60)
    item_key = data.trie.item_leaf
    metrics = evaluate_policy(policy, data, "valid", index=index, beams=12, batch_size=8, item_key=item_key)
    history = data.split.valid.history[index]
    target = data.split.valid.target[index]
    k = max(EVAL_KS)
    for prefix, renormalize in (("", False), ("renorm/", True)):
        result = beam_search(policy, data.trie, history, beams=12, topk=k, renormalize=renormalize,
                             sort_by_length=False)
        expect = evaluate_rankings(result.items, target, data.popularity, ks=EVAL_KS, item_key=item_key,
                                   sid_ranked=leaf_representatives(data.trie, result.leaves, k))
        for key, value in expect.items():
            assert metrics[prefix + key] == pytest.approx(value, abs=1e-12), prefix + key
    assert 0.0 < metrics[AGREEMENT_KEY] < 1.0
    unsorted = evaluate_policy(policy, data, "valid", index=index, beams=12, batch_size=8, item_key=item_key,
                               sort_by_length=False)
    assert unsorted == metrics
    assert set(metrics) == {*expect, *(f"renorm/{key}" for key in expect), AGREEMENT_KEY}


def test_evaluate_policy_rejects_another_device(setup):
    data, policy = setup
    with pytest.raises(ValueError, match="policy is on cpu"):
        evaluate_policy(policy, data, "valid", device=torch.device("meta"))


class LevelLogSoftmax(LogitsProcessor):
    """HF processor: at SID level ``l`` the log-softmax over the level's tokens only; then only EOS (score 0)."""

    def __init__(self, tokens: SIDTokenMap, prompt_length: int):
        self.level_ids = tokens.level_token_ids
        self.eos = tokens.eos_id
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        level = input_ids.shape[1] - self.prompt_length
        out = torch.full_like(scores, float("-inf"))
        if level < len(self.level_ids):
            ids = self.level_ids[level]
            out[:, ids] = torch.log_softmax(scores[:, ids].float(), dim=-1).to(scores.dtype)
        else:
            out[:, self.eos] = 0.0
        return out


def test_level_scoring_is_hf_prefix_allowed_ranking(setup):
    """renormalize=False ranks like stock HF beam search whose next-token log-probs at SID level l are taken
    over the level's tokens, masked to the trie children by a prefix_allowed_tokens_fn-style processor."""
    data, policy = setup
    history = data.split.valid.history[:6]
    ids, mask, _ = policy.build_prompt(history)
    P, L, beams = ids.shape[1], len(CPL), 8
    processors = [LevelLogSoftmax(data.tokens, P), SIDTrieLogitsProcessor(data.trie, data.tokens, prompt_length=P,
                                                                          renormalize=False)]
    with torch.no_grad():
        out = policy.model.generate(input_ids=ids, attention_mask=mask, logits_processor=processors,
                                    num_beams=beams, num_return_sequences=beams, do_sample=False,
                                    max_new_tokens=L + 1, length_penalty=0.0, early_stopping=True,
                                    eos_token_id=data.tokens.eos_id, pad_token_id=data.tokens.pad_id,
                                    output_scores=True, return_dict_in_generate=True)
    hf_codes = sids_from_sequences(out.sequences, P, data.tokens).reshape(6, beams, L)
    hf_scores = out.sequences_scores.reshape(6, beams).float()
    ours = beam_search(policy, data.trie, history, beams=beams, renormalize=False)
    assert torch.equal(hf_codes, data.trie.leaf_sid(ours.leaves))
    torch.testing.assert_close(hf_scores, ours.leaf_scores, rtol=1e-4, atol=1e-4)


# ---- SID-match metrics count SIDs, not items (many items share a SID) ----

SHARED_CPL = (5, 4, 3)


def shared_sid_data(n_sids: int, per_sid: int, seed: int = 0, n_users: int = 40) -> PreparedData:
    """Every SID holds ``per_sid`` items (``n_sids * per_sid`` items): beams land on shared leaves only."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.cartesian_prod(*(torch.arange(k) for k in SHARED_CPL))
    sids = grid[torch.randperm(len(grid), generator=g)[:n_sids]]
    n_items = n_sids * per_sid
    codes = sids.repeat_interleave(per_sid, dim=0)[torch.randperm(n_items, generator=g)]
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(0, n_items, size=int(rng.integers(3, 12))).astype(np.int64) for _ in range(n_users)]
    item_ids = [str(i) for i in range(n_items)]
    interactions = Interactions(user_ids=[f"u{i}" for i in range(n_users)], item_ids=item_ids,
                                sequences=sequences, source="random")
    split = leave_one_out(interactions, max_history=MAX_HISTORY)
    catalog = Catalog.from_codes(codes, SHARED_CPL, item_ids, collisions="share")
    trie = Trie.build(catalog.codes, SHARED_CPL)
    assert trie.num_leaves == n_sids and trie.max_items_per_leaf == per_sid
    return PreparedData(split=split, catalog=catalog, trie=trie, tokens=SIDTokenMap.from_scratch(SHARED_CPL),
                        popularity=item_popularity(split), item_ids=item_ids, user_ids=interactions.user_ids,
                        stats={"sid_collisions": n_items - n_sids})


def brute_force_sid_scores(policy: SIDPolicy, trie: Trie, history: torch.Tensor, renormalize: bool):
    """Teacher-forced score of every catalogue SID for every user: ``(leaves[S], scores[N, S])``."""
    leaves = torch.arange(trie.level_offsets[trie.num_levels], trie.num_nodes)
    sids = trie.leaf_sid(leaves)  # [S, L]
    N, S = history.shape[0], len(leaves)
    with torch.no_grad():
        h, _, _ = policy.trajectory_hidden(history, sids[None].expand(N, S, -1).contiguous())
        score = torch.zeros(N, S)
        node = torch.zeros(S, dtype=torch.long)
        for level in range(trie.num_levels):
            logits = policy.sid_logits(h[:, :, level], level).float()  # [N, S, K]
            if renormalize:
                logits = logits.masked_fill(~trie.child_mask(node, level)[None], float("-inf"))
            score += torch.log_softmax(logits, -1).gather(-1, sids[None, :, level, None].expand(N, S, 1))[..., 0]
            node = trie.next_node(node, sids[:, level], level=level)
    return leaves, score


def brute_force_sid_metrics(leaf_order: list[list[int]], target_leaf: list[int], ks) -> dict:
    """Python loops: SID Recall@K / NDCG@K of ranked distinct leaves."""
    out = {}
    for k in ks:
        rec = ndcg = 0.0
        for order, t in zip(leaf_order, target_leaf):
            distinct = []
            for leaf in order:
                if leaf >= 0 and leaf not in distinct:
                    distinct.append(leaf)
            top = distinct[:k]
            if t in top:
                rec += 1.0
                ndcg += 1.0 / np.log2(top.index(t) + 2)
        out[f"sid_recall@{k}"] = rec / len(target_leaf)
        out[f"sid_ndcg@{k}"] = ndcg / len(target_leaf)
    return out


@pytest.mark.parametrize("renormalize", [False, True])
def test_sid_metrics_rank_every_sid_like_a_brute_force(renormalize):
    """Beams >= SIDs: the beam search is exhaustive, so the SID metrics must equal ranking all catalogue SIDs by
    their teacher-forced scores. 30 SIDs of 4 items each: the item list cut to 20 items holds about 5 SIDs."""
    data = shared_sid_data(n_sids=30, per_sid=4)
    policy = tiny_policy(data)
    split = data.split.valid
    item_key = data.trie.item_leaf
    metrics = evaluate_policy(policy, data, "valid", beams=32, batch_size=16, item_key=item_key)
    prefix = "renorm/" if renormalize else ""
    leaves, scores = brute_force_sid_scores(policy, data.trie, split.history, renormalize)
    order = [[int(leaves[j]) for j in row] for row in torch.sort(scores, dim=1, descending=True, stable=True).indices]
    target_leaf = [int(x) for x in item_key[split.target]]
    expect = brute_force_sid_metrics(order, target_leaf, EVAL_KS)
    for key, value in expect.items():
        assert metrics[prefix + key] == pytest.approx(value, abs=1e-6), prefix + key
    assert expect["sid_recall@20"] > expect["sid_recall@5"] > 0.0
    # Cutting the expanded item list to 20 before removing repeated SIDs sees ~5 SIDs: a lower SID recall@20.
    items = beam_search(policy, data.trie, split.history, beams=32, topk=20, renormalize=renormalize).items
    cut_first = evaluate_rankings(items, split.target, data.popularity, ks=EVAL_KS, item_key=item_key)
    assert cut_first["sid_recall@20"] < metrics[prefix + "sid_recall@20"] - 0.2


def test_sid_metrics_count_distinct_sids_of_the_beams():
    """Beams < SIDs: SID metrics over the beams' leaves equal a brute force that expands every beam into all its
    items (no cut), walks them best first and keeps each SID's first item."""
    data = shared_sid_data(n_sids=50, per_sid=5, seed=2)
    policy = tiny_policy(data, seed=1)
    split = data.split.test
    item_key = data.trie.item_leaf
    beams = 20
    metrics = evaluate_policy(policy, data, "test", beams=beams, batch_size=8, item_key=item_key)
    for prefix, renormalize in (("", False), ("renorm/", True)):
        full = beam_search(policy, data.trie, split.history, beams=beams, topk=beams * 5, renormalize=renormalize)
        order = [[int(item_key[i]) if i >= 0 else -1 for i in row] for row in full.items]
        assert all(len({x for x in row if x >= 0}) == beams for row in order)  # 20 live beams, 20 SIDs
        expect = brute_force_sid_metrics(order, [int(x) for x in item_key[split.target]], EVAL_KS)
        for key, value in expect.items():
            assert metrics[prefix + key] == pytest.approx(value, abs=1e-6), prefix + key
        # The item metrics still read the item list cut to 20 items.
        cut = evaluate_rankings(full.items[:, :20], split.target, data.popularity, ks=EVAL_KS)
        assert metrics[prefix + "recall@20"] == pytest.approx(cut["recall@20"], abs=1e-12)


def test_leaf_representatives_pads_dead_beams_and_short_beam_lists():
    data = shared_sid_data(n_sids=6, per_sid=3)
    leaves = torch.arange(data.trie.level_offsets[3], data.trie.num_nodes)
    ranked = torch.stack([leaves[:4], torch.cat([leaves[4:6], torch.tensor([-1, -1])])])
    rep = leaf_representatives(data.trie, ranked, width=6)
    assert rep.shape == (2, 6)
    assert torch.equal(rep[:, 4:], torch.full((2, 2), -1)) and torch.equal(rep[1, 2:], torch.full((4,), -1))
    live = rep[rep >= 0]
    assert torch.equal(data.trie.item_leaf[live], ranked[ranked >= 0])
    # The lowest item of each leaf.
    items, valid = data.trie.items_of_leaves(ranked[ranked >= 0])
    assert torch.equal(live, items[:, 0]) and bool(valid[:, 0].all())


def test_evaluate_policy_rejects_an_item_key_that_splits_a_sid():
    data = shared_sid_data(n_sids=6, per_sid=3)
    policy = tiny_policy(data)
    with pytest.raises(ValueError, match="item_key gives item"):
        evaluate_policy(policy, data, "valid", beams=4, item_key=torch.arange(data.trie.num_items))
    with pytest.raises(ValueError, match="item_key must be"):
        evaluate_policy(policy, data, "valid", beams=4, item_key=data.trie.item_leaf[:-1])


def test_evaluate_rankings_sid_ranked_needs_item_key():
    data = shared_sid_data(n_sids=6, per_sid=3)
    ranked = torch.tensor([[0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="sid_ranked is given without item_key"):
        evaluate_rankings(ranked, torch.tensor([0]), data.popularity, ks=(5,), sid_ranked=ranked)
    with pytest.raises(ValueError, match="sid_ranked has 2 rows"):
        evaluate_rankings(ranked, torch.tensor([0]), data.popularity, ks=(5,), item_key=data.trie.item_leaf,
                          sid_ranked=ranked.repeat(2, 1))
