import json
import os
from pathlib import Path

import pytest
import torch

from gflowgr_core.sid.catalog import Catalog

DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
BEAUTY = DATA / "letter" / "Beauty"


def _write_index(tmp_path, index, name="X.index.json"):
    path = tmp_path / name
    path.write_text(json.dumps(index))
    return path


GOOD = {
    "10": ["<a_1>", "<b_2>", "<c_3>"],
    "2": ["<a_1>", "<b_2>", "<c_3>"],
    "7": ["<a_0>", "<b_255>", "<c_9>"],
    "3": ["<a_1>", "<b_2>", "<c_3>"],
    "5": ["<a_4>", "<b_2>", "<c_3>"],
}
ITEMS = ["2", "3", "5", "7", "10"]


def test_letter_index_parses_codes_in_item_order(tmp_path):
    path = _write_index(tmp_path, GOOD)
    cat = Catalog.from_letter_index(path, ITEMS)
    assert cat.item_ids == ITEMS
    assert cat.codes.dtype == torch.long
    expected = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 2, 3], [0, 255, 9], [1, 2, 3]])
    assert torch.equal(cat.codes, expected)
    assert cat.codes_per_level == (256, 256, 256)
    assert cat.collisions == "share" and cat.base_levels == 3


def test_letter_index_accepts_integer_item_ids(tmp_path):
    cat = Catalog.from_letter_index(_write_index(tmp_path, GOOD), [2, 3, 5, 7, 10])
    assert cat.item_ids == ITEMS


def test_default_codes_per_level_grows_past_256_per_level(tmp_path):
    index = {"1": ["<a_3>", "<b_300>"], "2": ["<a_255>", "<b_4>"]}
    cat = Catalog.from_letter_index(_write_index(tmp_path, index), ["1", "2"])
    assert cat.codes_per_level == (256, 301)


def test_explicit_codes_per_level(tmp_path):
    index = {"1": ["<a_3>", "<b_1>"], "2": ["<a_4>", "<b_0>"]}
    cat = Catalog.from_letter_index(_write_index(tmp_path, index), ["1", "2"], codes_per_level=(5, 2))
    assert cat.codes_per_level == (5, 2)


def test_extra_index_items_are_ignored_with_a_count(tmp_path):
    path = _write_index(tmp_path, GOOD)
    with pytest.warns(UserWarning, match=r"2 item\(s\) in the SID index do not appear"):
        cat = Catalog.from_letter_index(path, ["2", "3", "5"])
    assert cat.num_items == 3


@pytest.mark.parametrize("index, items, pattern", [
    ({"1": ["<a_1>", "<b_1>"]}, ["1", "9"], r"item\(s\) have no SID, first '9'"),
    ({"1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b_1>"], "3": ["<a_1>"]}, ["1", "2", "3"],
     r"item '3': SID .* has 1 token\(s\), expected 2"),
    ({"1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b1>"]}, ["1", "2"], r"item '2': token 1: malformed SID token"),
    ({"1": ["<a_1>", "<B_1>"]}, ["1"], r"item '1': token 1: malformed"),
    ({"1": ["<a_1>", "b_1"]}, ["1"], r"item '1': token 1: malformed"),
    ({"1": ["<a_1>", "<b_-1>"]}, ["1"], r"item '1': token 1: malformed"),
    ({"1": ["<a_1>", "<b_01>"]}, ["1"], r"item '1': token 1: malformed"),
    ({"1": ["<a_1>", "<b_1> "]}, ["1"], r"item '1': token 1: malformed"),
    ({"1": ["<a_1>", 7]}, ["1"], r"item '1': token 1: SID token must be a string"),
    ({"1": "<a_1><b_1>"}, ["1"], r"item '1': SID must be a list"),
    ({"1": {"a": 1}}, ["1"], r"item '1': SID must be a list"),
    ({"1": ["<b_1>", "<a_1>"]}, ["1"], r"item '1': token 0 is '<b_1>', level letter 'b' out of order"),
    ({"1": ["<a_1>", "<c_1>"]}, ["1"], r"item '1': token 1 is '<c_1>', level letter 'c' out of order "
                                         r"\(expected 'b'\)"),
])
def test_letter_index_bad_inputs_name_file_and_item(tmp_path, index, items, pattern):
    path = _write_index(tmp_path, index, name="bad.index.json")
    with pytest.raises(ValueError, match=pattern) as info:
        Catalog.from_letter_index(path, items)
    assert str(path) in str(info.value)


def test_code_out_of_range_names_file_item_and_level(tmp_path):
    path = _write_index(tmp_path, {"1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b_8>"]})
    with pytest.raises(ValueError, match=r"item '2': code 8 at level 'b' is outside \[0, 8\)") as info:
        Catalog.from_letter_index(path, ["1", "2"], codes_per_level=(4, 8))
    assert str(path) in str(info.value)


def test_length_differs_from_codes_per_level(tmp_path):
    path = _write_index(tmp_path, {"1": ["<a_1>", "<b_1>"]})
    with pytest.raises(ValueError, match=r"item '1'.*expected 3") as info:
        Catalog.from_letter_index(path, ["1"], codes_per_level=(4, 4, 4))
    assert str(path) in str(info.value)


def test_duplicate_item_key_and_bad_json(tmp_path):
    dup = tmp_path / "dup.index.json"
    dup.write_text('{"1": ["<a_1>"], "1": ["<a_2>"]}')
    with pytest.raises(ValueError, match=r"dup.index.json: item '1' appears more than once"):
        Catalog.from_letter_index(dup, ["1"])
    broken = tmp_path / "broken.index.json"
    broken.write_text('{"1": ["<a_1>"')
    with pytest.raises(ValueError, match=r"broken.index.json: not valid JSON"):
        Catalog.from_letter_index(broken, ["1"])
    array = _write_index(tmp_path, [["<a_1>"]], name="array.index.json")
    with pytest.raises(ValueError, match=r"array.index.json: expected a JSON object"):
        Catalog.from_letter_index(array, ["1"])


def test_share_stats_on_hand_example(tmp_path):
    cat = Catalog.from_letter_index(_write_index(tmp_path, GOOD), ITEMS, codes_per_level=(5, 256, 10))
    s = cat.stats()
    assert s["sid_levels"] == 3 and s["sid_codes_per_level"] == [5, 256, 10]
    assert s["sid_collisions"] == 2          # 5 items, 3 distinct SIDs
    assert s["shared_sids"] == 1             # (1, 2, 3) held by items 2, 3, 10
    assert s["items_in_shared_sids"] == 3
    assert s["max_items_per_base_sid"] == 3 and s["max_items_per_sid"] == 3
    assert s["distinct_sids"] == 3
    assert s["codes_used"] == [3, 2, 2]
    assert s["codebook_usage"] == pytest.approx([3 / 5, 2 / 256, 2 / 10])
    assert s["distinct_prefixes"] == [3, 3, 3]


def test_suffix_makes_sids_unique_and_keeps_base_codes():
    base = torch.tensor([[1, 2], [0, 0], [1, 2], [1, 2], [0, 0], [3, 1]])
    cat = Catalog.from_codes(base, (4, 3), [f"i{k}" for k in range(6)], collisions="suffix")
    assert cat.codes.shape == (6, 3)
    assert torch.equal(cat.base_codes, base)
    # Items sharing a base SID are numbered in item order; the suffix codebook is the largest group.
    assert cat.codes[:, 2].tolist() == [0, 0, 1, 2, 1, 0]
    assert cat.codes_per_level == (4, 3, 3)
    assert torch.unique(cat.codes, dim=0).shape[0] == 6
    s = cat.stats()
    assert s["sid_levels"] == 3 and s["base_levels"] == 2
    assert s["sid_collisions"] == 3 and s["shared_sids"] == 2 and s["items_in_shared_sids"] == 5
    assert s["distinct_sids"] == 6 and s["max_items_per_sid"] == 1
    assert s["distinct_prefixes"] == [3, 3, 6]


def test_suffix_without_collisions_adds_a_single_code_level():
    base = torch.tensor([[0, 1], [1, 0]])
    cat = Catalog.from_codes(base, (2, 2), ["a", "b"], collisions="suffix")
    assert cat.codes_per_level == (2, 2, 1)
    assert cat.codes[:, 2].tolist() == [0, 0]


def test_suffix_on_random_codes_is_always_unique():
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(0, 3, (500, 3), generator=gen)  # 27 SIDs for 500 items: heavy sharing
    cat = Catalog.from_codes(base, (3, 3, 3), [str(i) for i in range(500)], collisions="suffix")
    assert torch.unique(cat.codes, dim=0).shape[0] == 500
    assert torch.equal(cat.base_codes, base)
    _, counts = torch.unique(base, dim=0, return_counts=True)
    assert cat.codes_per_level[-1] == int(counts.max())


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(codes=torch.tensor([[0, 5]]), codes_per_level=(2, 5), item_ids=["x"]),
     r"item 'x' \(index 0\) has code 5 at level 1, outside \[0, 5\)"),
    (dict(codes=torch.tensor([[0, -1]]), codes_per_level=(2, 5), item_ids=["x"]), r"item 'x'.*code -1"),
    (dict(codes=torch.tensor([[0, 1]]), codes_per_level=(2,), item_ids=["x"]), r"2 levels but codes_per_level"),
    (dict(codes=torch.tensor([[0, 1]]), codes_per_level=(2, 2), item_ids=["x", "y"]), r"1 SID rows but 2 item"),
    (dict(codes=torch.tensor([[0], [1]]), codes_per_level=(2,), item_ids=["x", "x"]), r"'x' appears more"),
    (dict(codes=torch.tensor([[0.5]]), codes_per_level=(2,), item_ids=["x"]), r"must be integers"),
    (dict(codes=torch.tensor([0, 1]), codes_per_level=(2,), item_ids=["x", "y"]), r"must be \[n_items, L\]"),
    (dict(codes=torch.tensor([[0]]), codes_per_level=(2,), item_ids=["x"], collisions="merge"),
     r"collisions must be one of"),
])
def test_from_codes_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Catalog.from_codes(**kwargs)


def test_constructor_rejects_non_unique_suffix_codes():
    with pytest.raises(ValueError, match="still share a SID"):
        Catalog(codes=torch.tensor([[0, 0], [0, 0]]), codes_per_level=(1, 1), item_ids=["a", "b"],
                collisions="suffix")


@pytest.mark.parametrize("policy", ["share", "suffix"])
def test_save_load_round_trip(tmp_path, policy):
    base = torch.tensor([[1, 2], [0, 0], [1, 2]])
    cat = Catalog.from_codes(base, (4, 3), ["a", "b", "c"], collisions=policy, provenance={"note": "x"})
    cat.save(tmp_path / "cat")
    back = Catalog.load(tmp_path / "cat")
    assert torch.equal(back.codes, cat.codes)
    assert back.codes_per_level == cat.codes_per_level
    assert back.item_ids == cat.item_ids
    assert back.collisions == policy and back.base_levels == cat.base_levels
    assert back.provenance == {"note": "x"}
    assert back.stats() == cat.stats()


def test_load_reports_missing_and_inconsistent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalog.json"):
        Catalog.load(tmp_path)
    cat = Catalog.from_codes(torch.tensor([[1], [0]]), (2,), ["a", "b"])
    cat.save(tmp_path)
    meta = json.loads((tmp_path / "catalog.json").read_text())
    meta["num_items"] = 3
    (tmp_path / "catalog.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="2 rows but .* says 3 items"):
        Catalog.load(tmp_path)


@pytest.mark.skipif(not (BEAUTY / "Beauty.index.json").is_file(), reason=f"LETTER Beauty data absent at {BEAUTY}")
def test_beauty_letter_sids():
    from gflowgr_core.data.loaders import load_letter

    interactions = load_letter(BEAUTY)
    cat = Catalog.from_letter_index(BEAUTY / "Beauty.index.json", interactions.item_ids)
    s = cat.stats()
    assert s["num_items"] == 12101 and s["sid_levels"] == 4
    assert s["sid_codes_per_level"] == [256, 256, 256, 256]
    assert s["sid_collisions"] == 13 and s["shared_sids"] == 11 and s["items_in_shared_sids"] == 24
    assert s["distinct_sids"] == 12088
    assert s["distinct_prefixes"][-1] == 12088
    assert all(0 < u <= 1 for u in s["codebook_usage"])
    # Raw item "0" is LETTER's <a_183><b_70><c_232><d_6>.
    assert cat.codes[cat.item_ids.index("0")].tolist() == [183, 70, 232, 6]

    suffixed = Catalog.from_codes(cat.codes, cat.codes_per_level, cat.item_ids, collisions="suffix")
    t = suffixed.stats()
    assert t["sid_levels"] == 5 and t["distinct_sids"] == 12101 and t["sid_collisions"] == 13
    assert torch.equal(suffixed.base_codes, cat.codes)
    assert suffixed.codes_per_level[-1] == s["max_items_per_base_sid"]
