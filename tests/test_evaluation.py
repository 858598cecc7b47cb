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
from gflowgr_core.evaluation import AGREEMENT_KEY, EVAL_KS, evaluate_policy, top_k_agreement
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
    return SIDPolicy(model, data.tokens, data.catalog.codes, CPL, flow_hidden=16).eval()


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
        ranked = beam_search(policy, data.trie, history, beams=12, topk=k, renormalize=renormalize,
                             sort_by_length=False).items
        expect = evaluate_rankings(ranked, target, data.popularity, ks=EVAL_KS, item_key=item_key)
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
