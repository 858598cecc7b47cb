"""Ranking and exposure metrics on hand-made rankings with hand-computed values."""
import dataclasses
import math
import numpy as np
import pytest
import torch

from gflowgr_core import metrics as M
from gflowgr_core.data.loaders import Interactions
from gflowgr_core.data.split import leave_one_out

# Four examples over a 6-item catalogue.
RANKED = torch.tensor([[3, 1, 4, -1],    # target 1 at rank 1
                       [2, -1, 0, 5],    # target 0 at rank 1: the empty slot does not count
                       [5, 4, 3, 2],     # target 0 absent
                       [0, 2, 1, 3]])    # target 0 at rank 0
TARGET = torch.tensor([1, 0, 0, 0])
# Popularity order: 0 (10), 5 (7), 2 (5), 3 (3), 4 (1), 1 (0); the 20% head of 6 items is {0, 5}.
POP = torch.tensor([10, 0, 5, 3, 1, 7])
G2 = 1 / math.log2(3)   # NDCG gain at rank 1


def test_hit_rank_skips_empty_slots():
    assert M.hit_rank(RANKED, TARGET).tolist() == [1, 1, -1, 0]


def test_recall_and_ndcg_hand_values():
    assert M.recall_at_k(RANKED, TARGET, 1).item() == pytest.approx(0.25)
    assert M.recall_at_k(RANKED, TARGET, 2).item() == pytest.approx(0.75)
    assert M.recall_at_k(RANKED, TARGET, 4).item() == pytest.approx(0.75)
    assert M.ndcg_at_k(RANKED, TARGET, 1).item() == pytest.approx(0.25)
    assert M.ndcg_at_k(RANKED, TARGET, 2).item() == pytest.approx((2 * G2 + 1) / 4)
    per = M.ndcg_at_k(RANKED, TARGET, 2, reduction="none")
    assert per.shape == (4,)
    assert per.tolist() == pytest.approx([G2, G2, 0.0, 1.0])
    assert M.recall_at_k(RANKED, TARGET, 2, reduction="none").tolist() == [1.0, 1.0, 0.0, 1.0]


def test_exposure_hand_values():
    # Top-2 slots: {3,1} {2,0} {5,4} {0,2}: all 6 items; top-1: {3,2,5,0}.
    assert M.coverage_at_k(RANKED, 2, 6) == pytest.approx(1.0)
    assert M.coverage_at_k(RANKED, 1, 6) == pytest.approx(4 / 6)
    # Tail items are {1,2,3,4}: slots 3,1,2,0,5,4,0,2 -> 5 of 8 in the tail.
    assert M.tail_share_at_k(RANKED, 2, POP) == pytest.approx(5 / 8)
    assert M.mean_popularity_at_k(RANKED, 2, POP) == pytest.approx((3 + 0 + 5 + 10 + 7 + 1 + 10 + 5) / 8)
    # Rows 0 and 1 hold only 3 items each (empty slots): 14 slots in total.
    assert M.mean_popularity_at_k(RANKED, 4, POP) == pytest.approx(
        (3 + 0 + 1 + 5 + 10 + 7 + 7 + 1 + 3 + 5 + 10 + 5 + 0 + 3) / 14)


def test_long_tail_mask_definitions():
    assert M.long_tail_mask(POP).tolist() == [False, True, True, True, True, False]
    # 26 interactions: 20% = 5.2 is covered by item 0 alone; 50% = 13 needs items 0 and 5.
    assert M.long_tail_mask(POP, 0.2, "interactions").tolist() == [False, True, True, True, True, True]
    assert M.long_tail_mask(POP, 0.5, "interactions").tolist() == [False, True, True, True, True, False]
    assert M.long_tail_mask(POP, 0.0).all()
    assert not M.long_tail_mask(POP, 1.0).any()
    # ceil(0.2 * 15) must be 3, not 4 from 3.0000000000000004; ties go to the lower index.
    assert (~M.long_tail_mask(torch.ones(15))).nonzero().flatten().tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="head_by"):
        M.long_tail_mask(POP, 0.2, "users")
    with pytest.raises(ValueError, match="head_fraction"):
        M.long_tail_mask(POP, 1.5)


def test_sid_match_dedups_repeated_keys():
    key = torch.tensor([0, 0, 1, 1, 2, 2])   # items (0,1), (2,3), (4,5) share a SID
    ranked = torch.tensor([[3, 2, 1, 5],      # keys 1,1,0,2 -> distinct 1,0,2: target key 0 at rank 1
                           [4, 5, 1, -1],     # keys 2,2,0 -> target 5 (key 2) at rank 0
                           [1, 3, 2, 0]])     # keys 0,1,1,0 -> key 2 absent
    target = torch.tensor([0, 5, 4])
    assert M.hit_rank(ranked, target, key).tolist() == [1, 0, -1]
    assert M.hit_rank(ranked, target).tolist() == [-1, 1, -1]
    assert M.sid_recall_at_k(ranked, target, key, 1).item() == pytest.approx(1 / 3)
    assert M.sid_recall_at_k(ranked, target, key, 2).item() == pytest.approx(2 / 3)
    assert M.sid_ndcg_at_k(ranked, target, key, 2).item() == pytest.approx((G2 + 1) / 3)
    assert M.recall_at_k(ranked, target, 2).item() == pytest.approx(1 / 3)


def _reference_rank(row, tgt, key):
    """Plain-Python rank of the target among distinct keys (items when key is None)."""
    seen, rank = [], -1
    for item in row:
        if item < 0:
            continue
        k = item if key is None else key[item]
        if k in seen:
            continue
        if k == (tgt if key is None else key[tgt]):
            rank = len(seen)
            break
        seen.append(k)
    return rank


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hit_rank_matches_reference_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_items, n, width = 40, 200, 12
    rows = []
    for _ in range(n):
        row = rng.permutation(n_items)[:width].tolist()
        for j in rng.choice(width, size=rng.integers(0, 4), replace=False):
            row[j] = -1
        rows.append(row)
    ranked = torch.tensor(rows)
    target = torch.from_numpy(rng.integers(0, n_items, size=n))
    key = torch.from_numpy(rng.integers(0, 9, size=n_items))
    got = M.hit_rank(ranked, target).tolist()
    got_key = M.hit_rank(ranked, target, key).tolist()
    key_l = key.tolist()
    for i in range(n):
        assert got[i] == _reference_rank(rows[i], int(target[i]), None), i
        assert got_key[i] == _reference_rank(rows[i], int(target[i]), key_l), i
    # Sanity: the random data exercises hits, misses and key hits beyond item hits.
    assert min(got) == -1 and max(got) >= 1
    assert sum(r >= 0 for r in got_key) > sum(r >= 0 for r in got)


def test_evaluate_rankings_keys_and_values():
    ranked = torch.cat([RANKED, torch.full((4, 1), -1)], 1)
    out = M.evaluate_rankings(ranked, TARGET, POP, ks=(1, 2), item_key=torch.tensor([0, 0, 1, 1, 2, 2]))
    assert set(out) == {"num_examples"} | {f"{m}@{k}" for k in (1, 2) for m in
                                           ("recall", "ndcg", "sid_recall", "sid_ndcg", "coverage",
                                            "tail_share", "mean_pop")}
    assert out["num_examples"] == 4
    assert out["recall@2"] == pytest.approx(0.75)
    assert out["ndcg@2"] == pytest.approx((2 * G2 + 1) / 4)
    assert out["coverage@1"] == pytest.approx(4 / 6)
    assert out["tail_share@2"] == pytest.approx(5 / 8)
    assert out["mean_pop@2"] == pytest.approx(41 / 8)
    # Keys: row0 3,1 -> 1,0 (target key 0 at 1); row1 2,0 -> 1,0 (key 0 at 1); row2 5,4 -> 2 only,
    # then 3 -> 1, 2 -> 1 (target key 0 absent); row3 0 -> key 0 at 0.
    assert out["sid_recall@1"] == pytest.approx(0.25)
    assert out["sid_recall@2"] == pytest.approx(0.75)
    plain = M.evaluate_rankings(ranked, TARGET, POP, ks=(2,))
    assert "sid_recall@2" not in plain and plain["recall@2"] == out["recall@2"]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="row 1 recommends item 2 more than once"):
        M.recall_at_k(torch.tensor([[0, 1], [2, 2]]), torch.tensor([0, 0]), 2)
    with pytest.raises(ValueError, match="row 1 holds item 9 but the catalogue has 6"):
        M.evaluate_rankings(torch.tensor([[0, 1], [9, 2]]), torch.tensor([0, 0]), POP, ks=(2,))
    with pytest.raises(ValueError, match="row 0 holds -3"):
        M.recall_at_k(torch.tensor([[-3, 1]]), torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="target row 1 is -1"):
        M.recall_at_k(torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, -1]), 1)
    with pytest.raises(ValueError, match="one per ranked row"):
        M.recall_at_k(torch.tensor([[0, 1]]), torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="fewer than the largest cut-off 20"):
        M.evaluate_rankings(RANKED, TARGET, POP)
    with pytest.raises(ValueError, match="every slot of ranked is empty"):
        M.coverage_at_k(torch.full((2, 3), -1), 2, 6)
    with pytest.raises(ValueError, match="positive int"):
        M.recall_at_k(RANKED, TARGET, 0)


def test_item_popularity_counts_training_part_once():
    rng = np.random.default_rng(5)
    num_items = 15
    # Lengths 2 (dropped by the split), 3 (one-item training part), 4 and some beyond max_history.
    seqs = [rng.integers(0, num_items, size=n).tolist() for n in (3, 4, 2, 3, 9, 30, 12, 5)]
    inter = Interactions(user_ids=[str(u) for u in range(len(seqs))], item_ids=[str(i) for i in range(num_items)],
                         sequences=[np.asarray(q, dtype=np.int64) for q in seqs], source="synthetic")
    split = leave_one_out(inter, max_history=5)
    expected = np.bincount(np.concatenate([np.asarray(s[:-2], dtype=np.int64) for s in seqs]), minlength=num_items)
    assert M.item_popularity(split).tolist() == expected.tolist()


@pytest.mark.parametrize("max_history", [1, 2, 20])
def test_item_popularity_is_a_direct_count_at_any_history_length(max_history):
    """Hand-built sequences: with max_history=1 every history has one item, so the first item of a user must
    come from the user's first example only (it used to be counted once per training row)."""
    seqs = [[0, 1, 2],            # training part [0]: no training row, v_1 from the validation row
            [3, 3, 4, 5],         # [3, 3]
            [1, 2, 3, 4, 5, 6],   # [1, 2, 3, 4]
            [6],                  # dropped (too short)
            [5, 0, 5, 0, 5, 1, 2]]  # [5, 0, 5, 0, 5]
    num_items = 7
    inter = Interactions(user_ids=[f"u{i}" for i in range(len(seqs))], item_ids=[str(i) for i in range(num_items)],
                         sequences=[np.asarray(q, dtype=np.int64) for q in seqs], source="hand-built")
    split = leave_one_out(inter, max_history=max_history)
    expected = [0] * num_items
    for q in seqs:
        for item in q[:-2]:
            expected[item] += 1
    assert expected == [3, 1, 1, 3, 1, 3, 0]
    assert M.item_popularity(split).tolist() == expected


def test_item_popularity_needs_rows_grouped_by_user():
    seqs = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]
    inter = Interactions(user_ids=["a", "b"], item_ids=[str(i) for i in range(5)],
                         sequences=[np.asarray(q, dtype=np.int64) for q in seqs], source="hand-built")
    split = leave_one_out(inter, max_history=1)
    reversed_rows = torch.arange(len(split.train) - 1, -1, -1)
    shuffled = dataclasses.replace(split, train=split.train.subset(reversed_rows))
    with pytest.raises(ValueError, match="grouped by user in ascending order"):
        M.item_popularity(shuffled)
