"""k-core filtering and the leave-one-out split: hand-checked tensors, a per-user reference, Beauty sizes."""
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gflowgr_core.data.loaders import DataError, Interactions, load_letter
from gflowgr_core.data.split import KCoreReport, Split, kcore_filter, leave_one_out

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
P = -1  # padding


def make(sequences, n_items=None, user_ids=None):
    arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
    if n_items is None:
        n_items = max((int(a.max()) for a in arrays if a.size), default=-1) + 1
    return Interactions(user_ids=user_ids or [f"u{i}" for i in range(len(arrays))],
                        item_ids=[str(i) for i in range(n_items)], sequences=arrays, source="test")


def rows(split: Split):
    return split.history.tolist(), split.target.tolist(), split.user.tolist()


# ---------------------------------------------------------------------------------------- leave-one-out


def test_hand_checked_split_of_letter_fixture(caplog):
    # sequences: user 0 [2,0,1,0,3], user 1 [0,2] (too short), user 2 [3,1,2,0], user 3 [] (too short)
    data = load_letter(FIXTURES / "letter")
    with caplog.at_level(logging.WARNING, logger="gflowgr_core.data.split"):
        split = leave_one_out(data, max_history=2)
    assert split.dropped_users == 2
    assert any("dropped 2 of 4 users" in r.getMessage() for r in caplog.records)
    assert rows(split.train) == ([[P, 2], [2, 0], [P, 3]], [0, 1, 1], [0, 0, 2])
    assert rows(split.valid) == ([[0, 1], [3, 1]], [0, 2], [0, 2])
    assert rows(split.test) == ([[1, 0], [1, 2]], [3, 0], [0, 2])
    assert (split.num_users, split.num_items, split.max_history) == (4, 4, 2)
    assert split.stats() == {"num_train_examples": 3, "num_valid": 2, "num_test": 2, "num_users": 4,
                             "num_items": 4, "max_history": 2, "dropped_users": 2}


def test_wider_history_is_left_padded():
    split = leave_one_out(make([[2, 0, 1, 0, 3]]), max_history=4)
    assert rows(split.train) == ([[P, P, P, 2], [P, P, 2, 0]], [0, 1], [0, 0])
    assert rows(split.valid) == ([[P, 2, 0, 1]], [0], [0])
    assert rows(split.test) == ([[2, 0, 1, 0]], [3], [0])
    assert split.train.history.dtype == torch.long and split.train.history.shape == (2, 4)


def test_truncation_keeps_most_recent_items():
    seq = list(range(10))
    split = leave_one_out(make([seq]), max_history=3)
    assert split.train.target.tolist() == list(range(1, 8))
    assert split.train.history.tolist()[-1] == [4, 5, 6]     # target 7
    assert split.train.history.tolist()[2] == [0, 1, 2]      # target 3: exactly full
    assert split.train.history.tolist()[1] == [P, 0, 1]      # target 2
    assert rows(split.valid) == ([[5, 6, 7]], [8], [0])
    assert rows(split.test) == ([[6, 7, 8]], [9], [0])


def test_three_item_user_has_no_training_rows_but_valid_and_test():
    split = leave_one_out(make([[4, 5, 6], [1, 2, 3, 0]]), max_history=2)
    assert rows(split.train) == ([[P, 1]], [2], [1])
    assert rows(split.valid) == ([[P, 4], [1, 2]], [5, 3], [0, 1])
    assert rows(split.test) == ([[4, 5], [2, 3]], [6, 0], [0, 1])
    assert split.dropped_users == 0


def test_no_warning_when_nothing_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger="gflowgr_core.data.split"):
        leave_one_out(make([[0, 1, 2]]))
    assert not caplog.records


def test_nothing_splittable_raises():
    with pytest.raises(DataError, match="no user has 3 or more items"):
        leave_one_out(make([[0, 1], [], [1]]))


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "20"])
def test_invalid_max_history(bad):
    with pytest.raises(ValueError, match="max_history must be an integer >= 1"):
        leave_one_out(make([[0, 1, 2]]), max_history=bad)


def test_item_index_outside_catalogue_names_the_user():
    with pytest.raises(DataError, match=r"user 'u1': item index 7 outside 0\.\.4"):
        leave_one_out(make([[0, 1, 2], [3, 7, 1]], n_items=5))


def reference_split(sequences, max_history):
    """Per-example definition of the protocol, written independently of the vectorised code."""
    def pad(items):
        items = list(items)[-max_history:]
        return [P] * (max_history - len(items)) + items

    out = {"train": [], "valid": [], "test": []}
    for u, seq in enumerate(sequences):
        seq = list(seq)
        if len(seq) < 3:
            continue
        training = seq[:-2]
        for t in range(1, len(training)):
            out["train"].append((pad(training[:t]), training[t], u))
        out["valid"].append((pad(seq[:-2]), seq[-2], u))
        out["test"].append((pad(seq[:-1]), seq[-1], u))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_per_user_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 30, size=int(rng.integers(1, 60)))
    sequences = [rng.integers(0, 17, size=n) for n in lengths]
    if not any(n >= 3 for n in lengths):
        sequences.append(rng.integers(0, 17, size=5))
    max_history = int(rng.integers(1, 25))
    split = leave_one_out(make(sequences, n_items=17), max_history=max_history)
    expected = reference_split(sequences, max_history)
    for name in ("train", "valid", "test"):
        got = getattr(split, name)
        want = expected[name]
        assert got.history.tolist() == [h for h, _, _ in want]
        assert got.target.tolist() == [t for _, t, _ in want]
        assert got.user.tolist() == [u for _, _, u in want]
    assert split.dropped_users == sum(1 for s in sequences if len(s) < 3)


# ------------------------------------------------------------------------------------------ Split helpers


def test_split_len_subset_to():
    split = leave_one_out(make([list(range(8)), [3, 2, 1, 0]]), max_history=3).train
    assert len(split) == 6 and split.max_history == 3
    assert split.history_lengths().tolist() == [1, 2, 3, 3, 3, 1]
    assert rows(split.subset([5, 0])) == ([[P, P, 3], [P, P, 0]], [2, 1], [1, 0])
    assert rows(split.subset(torch.tensor([5]))) == ([[P, P, 3]], [2], [1])
    assert rows(split.subset(np.array([1], dtype=np.int32))) == ([[P, 0, 1]], [2], [0])
    mask = split.target >= 4
    assert split.subset(mask).target.tolist() == [4, 5]
    assert split.subset(slice(1, 3)).target.tolist() == [2, 3]
    moved = split.to("cpu")
    assert moved.history.device.type == "cpu" and torch.equal(moved.history, split.history)
    with pytest.raises(ValueError, match="bool mask must have shape"):
        split.subset(torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="integer indices"):
        split.subset(torch.tensor([0.0]))


def test_split_rejects_inconsistent_tensors():
    h = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="target must be"):
        Split(h, torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="history must be"):
        Split(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        Split(h.int(), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_splitdata_to_keeps_metadata():
    split = leave_one_out(make([[0, 1, 2, 3]]), max_history=2)
    moved = split.to("cpu")
    assert moved.stats() == split.stats() and torch.equal(moved.test.history, split.test.history)


# ------------------------------------------------------------------------------------------------ k-core


def test_kcore_hand_checked():
    # items a=0 b=1 c=2 d=3; users A [a,b,c], B [a,b], C [c,d], D [a]
    data = make([[0, 1, 2], [0, 1], [2, 3], [0]], user_ids=["A", "B", "C", "D"])
    data.item_ids = ["a", "b", "c", "d"]
    filtered, report = kcore_filter(data, 2)
    # round 1 drops D and d; round 2 drops C (only c left); round 3 drops c from A
    assert filtered.user_ids == ["A", "B"] and filtered.item_ids == ["a", "b"]
    assert [s.tolist() for s in filtered.sequences] == [[0, 1], [0, 1]]
    assert report == KCoreReport(k=2, iterations=3, users_before=4, users_after=2, items_before=4,
                                 items_after=2, interactions_before=8, interactions_after=4)
    assert (report.removed_users, report.removed_items, report.removed_interactions) == (2, 2, 4)
    assert "removed 2 users, 2 items, 4 interactions" in str(report)
    assert [s.tolist() for s in data.sequences] == [[0, 1, 2], [0, 1], [2, 3], [0]]   # input untouched


def test_kcore_reindexes_items_and_keeps_chronology():
    data = make([[3, 1, 3, 1], [1, 3, 0], [3, 1]])
    filtered, report = kcore_filter(data, 2)
    # item 0 (once) goes, 1 -> 0, 3 -> 1; item 2 never occurred
    assert filtered.item_ids == ["1", "3"]
    assert [s.tolist() for s in filtered.sequences] == [[1, 0, 1, 0], [0, 1], [1, 0]]
    assert (report.items_before, report.items_after, report.removed_interactions) == (4, 2, 1)


def test_kcore_small_k_is_noop_and_empty_users_go_for_k2():
    data = make([[0, 1], [], [1, 0]])
    same, report = kcore_filter(data, 1)
    assert same is data and report.iterations == 0 and report.removed_users == 0
    assert kcore_filter(data, 0)[0] is data
    filtered, report = kcore_filter(data, 2)
    assert filtered.user_ids == ["u0", "u2"] and report.removed_users == 1 and report.removed_interactions == 0


def test_kcore_can_empty_everything():
    filtered, report = kcore_filter(make([[0, 1], [2]]), 3)
    assert filtered.num_users == 0 and filtered.num_items == 0 and report.interactions_after == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcore_result_is_a_kcore_and_maximal(seed):
    rng = np.random.default_rng(seed)
    data = make([rng.integers(0, 40, size=n) for n in rng.integers(0, 12, size=80)], n_items=40)
    k = 3
    filtered, _ = kcore_filter(data, k)
    flat = np.concatenate(filtered.sequences) if filtered.sequences else np.zeros(0, dtype=np.int64)
    assert all(len(s) >= k for s in filtered.sequences)
    assert flat.size == 0 or np.bincount(flat).min() >= k
    # maximal: a k-core is a fixed point, filtering again changes nothing
    again, report = kcore_filter(filtered, k)
    assert report.iterations == 0 and [s.tolist() for s in again.sequences] == [s.tolist() for s in filtered.sequences]


# ------------------------------------------------------------------------------------------------ Beauty

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


@needs_data
def test_beauty_split_sizes_and_invariants():
    data = load_letter(DATA / "letter" / "Beauty")
    split = leave_one_out(data, max_history=20)
    assert split.stats() == {"num_train_examples": 131413, "num_valid": 22363, "num_test": 22363,
                             "num_users": 22363, "num_items": 12101, "max_history": 20, "dropped_users": 0}
    for part in (split.train, split.valid, split.test):
        h = part.history
        assert h.shape[1] == 20 and int(h.max()) < 12101 and int(part.target.min()) >= 0
        # left padding: once a real item appears, no padding follows
        real = (h != P).long()
        assert torch.equal(real, real.cummax(dim=1).values)
        assert bool((h[:, -1] != P).all())
    # the test history ends with the validation target; both rows belong to the same user
    assert torch.equal(split.test.history[:, -1], split.valid.target)
    assert torch.equal(split.test.user, torch.arange(22363))
    first = data.sequences[0].tolist()   # [0, 1, 2, 3, 4]
    assert split.train.target[:2].tolist() == first[1:3]
    assert split.test.history[0, -4:].tolist() == first[:4] and split.test.target[0].item() == first[4]
    filtered, report = kcore_filter(data, 5)
    assert report.iterations == 0 and filtered.num_interactions == 198502
