"""Loaders: every format on tiny hand-made files, every bad-input error, and the shared real datasets."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from gflowgr_core.data import loaders
from gflowgr_core.data.formats import load_interactions
from gflowgr_core.data.loaders import (DataError, Interactions, letter_paths, load_csv, load_letter, load_ml100k,
                                       load_p5)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def seqs(data: Interactions) -> list[list[int]]:
    return [s.tolist() for s in data.sequences]


def write(tmp_path: Path, name: str, content, binary: bool = False) -> Path:
    path = tmp_path / name
    if binary:
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_names_the_problem(load, path: Path, where: str, what: str) -> None:
    """``load()`` raises a :class:`DataError` whose message names the file, the place in it and the problem."""
    with pytest.raises(DataError) as err:
        load()
    message = str(err.value)
    assert str(path) in message and where in message and what in message


# ------------------------------------------------------------------------------------------- good inputs


def test_letter_folder_and_file_give_same_result():
    from_folder = load_letter(FIXTURES / "letter")
    from_file = load_letter(FIXTURES / "letter" / "Tiny.inter.json")
    assert from_folder.user_ids == ["7", "3", "12", "5"]          # file order
    assert from_folder.item_ids == ["2", "3", "10", "11"]          # numeric, not string, order
    assert seqs(from_folder) == [[2, 0, 1, 0, 3], [0, 2], [3, 1, 2, 0], []]
    assert all(s.dtype == np.int64 for s in from_folder.sequences)
    assert (from_folder.num_users, from_folder.num_items, from_folder.num_interactions) == (4, 4, 11)
    assert from_folder.lengths().tolist() == [5, 2, 4, 0]
    assert from_folder.source.startswith("letter:") and from_folder.source.endswith("Tiny.inter.json")
    assert seqs(from_file) == seqs(from_folder) and from_file.item_ids == from_folder.item_ids


def test_letter_paths_finds_index_file(tmp_path):
    inter, index = letter_paths(FIXTURES / "letter")
    assert inter.name == "Tiny.inter.json" and index is not None and index.name == "Tiny.index.json"
    lone = write(tmp_path, "Solo.inter.json", '{"1": [1]}')
    assert letter_paths(lone) == (lone, None)


def test_p5_file_order_blank_lines_and_empty_users():
    data = load_p5(FIXTURES / "p5")
    assert data.user_ids == ["A1", "A0", "A2", "A3"]
    assert data.item_ids == ["B10", "B9", "C1"]                     # not all integers: string order
    assert seqs(data) == [[1, 0, 1, 2], [2, 0], [1], []]
    assert load_p5(FIXTURES / "p5" / "user_sequence.txt").item_ids == data.item_ids


def test_p5_integer_items_sort_numerically(tmp_path):
    data = load_p5(write(tmp_path, "user_sequence.txt", "u 100 9 20\nv 9\n"))
    assert data.item_ids == ["9", "20", "100"]
    assert seqs(data) == [[2, 0, 1], [0]]


def test_recbole_inter_header_sorts_by_time_with_stable_ties():
    data = load_csv(FIXTURES / "csv" / "tiny.inter")
    assert data.user_ids == ["1", "2", "3"] and data.item_ids == ["10", "20", "30"]
    # user 1: item 10 at t=50, then 30 and 20 both at t=200 in file order
    assert seqs(data) == [[0, 2, 1], [0, 2], [1]]


def test_csv_with_quotes_other_column_names_and_ties():
    data = load_csv(FIXTURES / "csv" / "tiny.csv")
    assert data.user_ids == ["u1", "u2"] and data.item_ids == ["i1", "i2", "i3"]
    assert seqs(data) == [[1, 2, 0], [2]]


def test_tsv_without_timestamp_keeps_file_order_and_repeats():
    data = load_csv(FIXTURES / "csv" / "notime.tsv")
    assert data.user_ids == ["a", "b"] and data.item_ids == ["x", "y"]
    assert seqs(data) == [[1], [0, 1, 0]]


def test_csv_explicit_columns_whitespace_and_iso_dates(tmp_path):
    path = write(tmp_path, "events.txt", "who what when\nz p 2024-01-03\nz q 2024-01-01T10:00:00\ny p 2023-12-31\n")
    data = load_csv(path, user_col="who", item_col="what", time_col="when", sep=" ")
    assert data.user_ids == ["y", "z"] and seqs(data) == [[0], [1, 0]]
    semi = write(tmp_path, "s.csv", "user_id;item_id;timestamp\n1;5;2\n1;6;1\n")
    assert seqs(load_csv(semi)) == [[1, 0]]
    pipe = write(tmp_path, "p.csv", "user_id|item_id\n1|5\n1|6\n")
    assert seqs(load_csv(pipe, sep="|")) == [[0, 1]]


def test_load_interactions_dispatch(tmp_path):
    assert seqs(load_interactions("letter", FIXTURES / "letter")) == seqs(load_letter(FIXTURES / "letter"))
    assert seqs(load_interactions("P5", FIXTURES / "p5")) == seqs(load_p5(FIXTURES / "p5"))
    assert seqs(load_interactions("csv", FIXTURES / "csv" / "notime.tsv", sep="\t")) == [[1], [0, 1, 0]]
    with pytest.raises(ValueError, match="unknown interaction format 'parquet'"):
        load_interactions("parquet", tmp_path)
    with pytest.raises(ValueError, match="takes no options"):
        load_interactions("p5", FIXTURES / "p5", sep=",")
    with pytest.raises(ValueError, match="needs a path"):
        load_interactions("letter")
    with pytest.raises(ValueError, match="takes no path"):
        load_interactions("ml100k", tmp_path)


# -------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("content, where, what", [
    ('{"1": [1, 2],\n "2": [3\n}', "line 3", "malformed JSON"),
    ('{"1": [1, 2], "2": 5}', "user '2'", "value is a number"),
    ('{"1": [1], "9": {"a": 1}}', "user '9'", "value is an object"),
    ('{"1": [1, null]}', "user '1'", "element 1 is null"),
    ('{"1": [1, 2.5]}', "user '1'", "element 1 is a number"),
    ('{"1": [[1]]}', "user '1'", "element 0 is an array"),
    ('{"1": [1, ""]}', "user '1'", "empty item id"),
    ('{"4": [1], "5": [2], "4": [3]}', "user '4'", "more than once"),
    ('[[1, 2]]', "top level", "expected a JSON object"),
    ("{}", "no users", ""),
    ("  \n", "empty file", ""),
])
def test_letter_bad_input(tmp_path, content, where, what):
    path = write(tmp_path, "Bad.inter.json", content)
    assert_names_the_problem(lambda: load_letter(tmp_path), path, where, what)


def test_letter_folder_problems(tmp_path):
    with pytest.raises(DataError, match=r"no '\*\.inter\.json' file"):
        load_letter(tmp_path)
    write(tmp_path, "A.inter.json", '{"1": [1]}')
    write(tmp_path, "B.inter.json", '{"1": [1]}')
    with pytest.raises(DataError, match="several.*A.inter.json, B.inter.json"):
        load_letter(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_letter(tmp_path / "nothing-here")


@pytest.mark.parametrize("content, where, what", [
    ("u1 1 2\nu2 3\nu1 4\n", "line 3", "user 'u1' already listed on line 1"),
    ("u1 1 2\nu2,3,4\n", "line 2", "malformed line"),
    ("u1 1 2\nu2 \"3\"\n", "line 2", "malformed line"),
    ("\n \n", "empty file", ""),
])
def test_p5_bad_input(tmp_path, content, where, what):
    path = write(tmp_path, "user_sequence.txt", content)
    assert_names_the_problem(lambda: load_p5(path), path, where, what)


def test_p5_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "user_sequence.txt", b"u1 1\nu2 2\nu3 \xff\xfe\n", binary=True)
    with pytest.raises(DataError, match=r"line 3: not valid UTF-8"):
        load_p5(path)


@pytest.mark.parametrize("content, kwargs, where, what", [
    ("user_id,rating\n1,5\n", {}, "line 1", "no item column"),
    ("rating,item_id\n1,5\n", {}, "line 1", "no user column"),
    ("user_id,item_id\n1,5\n", {"time_col": "ts"}, "line 1", "no time column 'ts'"),
    ("user_id,item_id,timestamp\n1,5,3\n2,6\n", {}, "line 3", "malformed row"),
    ("user_id,item_id,timestamp\n1,5,3\n2,6,soon\n", {}, "line 3", "'soon' is neither a number"),
    ("user_id,item_id,timestamp\n1,5,nan\n", {}, "line 2", "not finite"),
    ("user_id,item_id\n1,5\n,6\n", {}, "line 3", "empty user id"),
    ("user_id,item_id\n1, \n", {}, "line 2", "empty item id"),
    ("user_id,item_id,timestamp\n", {}, "header only", ""),
    ("user_id,user_id:token\n1,5\n", {"item_col": "user_id"}, "line 1", "different columns"),
    ("", {}, "empty file", ""),
])
def test_csv_bad_input(tmp_path, content, kwargs, where, what):
    path = write(tmp_path, "bad.csv", content)
    assert_names_the_problem(lambda: load_csv(path, **kwargs), path, where, what)


def test_csv_multiline_quoted_field_keeps_physical_line_numbers(tmp_path):
    path = write(tmp_path, "q.csv", 'user_id,item_id,note\n1,5,"two\nlines"\n2\n')
    with pytest.raises(DataError, match=r"line 4: malformed row"):
        load_csv(path)


def test_ml100k_missing_recbole_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps recbole==1\.2\.1"):
        load_ml100k()

    class FakeSpec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: FakeSpec())
    with pytest.raises(FileNotFoundError, match=r"ml-100k\.inter.*pip install --no-deps recbole==1\.2\.1"):
        load_ml100k()


# ---------------------------------------------------------------------------------------- shared datasets

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")


@needs_data
def test_beauty_letter_counts():
    data = load_letter(DATA / "letter" / "Beauty")
    assert (data.num_users, data.num_items, data.num_interactions) == (22363, 12101, 198502)
    assert data.lengths().min() >= 5
    assert data.item_ids[:3] == ["0", "1", "2"] and data.item_ids[-1] == "12100"
    assert data.sequences[0].tolist() == [0, 1, 2, 3, 4]


@needs_data
@pytest.mark.parametrize("name, users", [("Sports", 35598), ("Toys", 19412)])
def test_amazon_p5_counts(name, users):
    data = load_p5(DATA / "amazon14" / name)
    assert data.num_users == users
    assert len(set(data.user_ids)) == users
    assert data.item_ids == sorted(data.item_ids)
    flat = np.concatenate(data.sequences)
    assert flat.min() == 0 and flat.max() == data.num_items - 1
    assert len(np.unique(flat)) == data.num_items


@needs_data
def test_bundled_beauty_slice_is_the_scripted_slice_of_the_shared_files(beauty_tiny, tmp_path):
    """The committed fixture is byte for byte what its script cuts from the full files."""
    spec = importlib.util.spec_from_file_location("make_beauty_tiny", beauty_tiny / "make_beauty_tiny.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(DATA / "letter" / "Beauty", tmp_path)
    for name in ("Beauty.inter.json", "Beauty.index.json"):
        assert (tmp_path / name).read_bytes() == (beauty_tiny / name).read_bytes(), name
    full, tiny = load_letter(DATA / "letter" / "Beauty"), load_letter(beauty_tiny)
    assert tiny.user_ids[:300] == full.user_ids[:300]
    assert [[full.item_ids[i] for i in s] for s in full.sequences[:300]] == \
        [[tiny.item_ids[i] for i in s] for s in tiny.sequences[:300]]


def test_ml100k_counts():
    try:
        path = loaders._ml100k_path()
    except FileNotFoundError as exc:
        pytest.skip(f"recbole's ml-100k.inter is absent: {exc}")
    data = load_ml100k()
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100000)
    assert data.user_ids[:2] == ["1", "2"] and data.item_ids[-1] == "1682"
    assert data.source == f"ml100k:{path}"
    assert seqs(load_interactions("ml100k")) == seqs(data)
