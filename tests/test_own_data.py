"""Own data: csv column choices, the MiniOneRec format (rows chained into sequences, SIDs kept as given),
refusal of list-valued csv columns, parse_sid, and prepare's early option checks and stage logs."""
from __future__ import annotations

import ast
import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from gflowgr_core.cli import main
from gflowgr_core.data.formats import load_interactions
from gflowgr_core.data.loaders import DataError, load_csv
from gflowgr_core.data.minionerec import load_minionerec, minionerec_files
from gflowgr_core.data.prepared import PreparedData, prepare
from gflowgr_core.sid.tokens import format_sid, parse_sid

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "minionerec"
DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
OFFICE = DATA / "minionerec" / "Office_Products"
needs_office = pytest.mark.skipif(not (OFFICE / "test.csv").is_file(),
                                  reason=f"shared MiniOneRec Office_Products sample not found at {OFFICE}")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _copy_fixture(tmp_path: Path) -> Path:
    folder = tmp_path / "mor"
    shutil.copytree(FIXTURE, folder)
    return folder


def _rewrite(path: Path, row_number: int, column: str, value: str) -> None:
    """Set ``column`` of data row ``row_number`` (0-based) of a CSV file."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    rows[row_number + 1][rows[0].index(column)] = value
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


# ------------------------------------------------------------------------------------------------ parse_sid
def test_parse_sid_and_format_sid_round_trip():
    assert parse_sid("<a_130><b_122><c_86>") == (130, 122, 86)
    assert parse_sid("  <a_0>\n") == (0,)
    assert format_sid((130, 122, 86)) == "<a_130><b_122><c_86>"
    assert parse_sid(format_sid(range(26))) == tuple(range(26))


@pytest.mark.parametrize("text, fragment", [
    ("", "empty SID"),
    ("<a_1><c_2>", "'c' out of order (expected 'b')"),
    ("<b_1>", "expected 'a'"),
    ("<a_1> <b_2>", "at character 5"),
    ("<a_1><b_2>x", "found 'x'"),
    ("<a_01>", "at character 0"),
    ("a_1", "at character 0"),
])
def test_parse_sid_names_the_bad_string(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_sid(text)
    assert fragment in str(info.value) and repr(text) in str(info.value)


# ------------------------------------------------------------------------------------------------ MiniOneRec
def _expected_sequences(folder: Path) -> dict[str, list[str]]:
    """Per user: the first row's history, then every row's target (the fixture's rows chain exactly)."""
    seqs: dict[str, list[str]] = {}
    for name in ("train", "valid", "test"):
        if not (folder / f"{name}.csv").is_file():
            continue
        for row in _rows(folder / f"{name}.csv"):
            history = [str(x) for x in ast.literal_eval(row["history_item_id"])]
            seqs.setdefault(row["user_id"], history).append(row["item_id"])
    return seqs


def test_minionerec_rows_are_chained_into_sequences():
    data = load_minionerec(FIXTURE)
    expected = _expected_sequences(FIXTURE)
    index = json.loads((FIXTURE / "Office_Products.index.json").read_text())
    assert data.user_ids == list(expected)
    assert len(data.user_ids) == 16
    assert sorted(data.item_ids, key=int) == sorted(index, key=int), "the catalogue is the whole index"
    for user, seq in zip(data.user_ids, data.sequences):
        assert [data.item_ids[i] for i in seq.tolist()] == expected[user], user
    # a user of both files: its test rows continue its valid rows
    both = {r["user_id"] for r in _rows(FIXTURE / "valid.csv")} & {r["user_id"] for r in _rows(FIXTURE / "test.csv")}
    assert len(both) == 8
    n_rows = len(_rows(FIXTURE / "valid.csv")) + len(_rows(FIXTURE / "test.csv"))
    first_histories = sum(len(ast.literal_eval(next(r for r in _rows(FIXTURE / f) if r["user_id"] == u)
                                               ["history_item_id"]))
                          for u in expected for f in ("valid.csv", "test.csv")
                          if any(r["user_id"] == u for r in _rows(FIXTURE / f))
                          and (f == "valid.csv" or u not in both))
    assert data.num_interactions == n_rows + first_histories


def test_prepare_minionerec_keeps_the_given_sids(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--format", "minionerec", "--path", str(FIXTURE), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["format"] == "minionerec" and stats["num_users"] == 16 and stats["dropped_users"] == 0
    assert stats["rows_per_file"] == {"valid.csv": len(_rows(FIXTURE / "valid.csv")),
                                      "test.csv": len(_rows(FIXTURE / "test.csv"))}
    assert stats["num_valid"] == stats["num_test"] == 16
    assert stats["items_without_interactions"] == 5
    assert stats["sid_levels"] == 3 and stats["sid_collision_policy"] == "share"
    assert '"items_without_interactions": 5' in printed
    data = PreparedData.load(out)
    index = json.loads((FIXTURE / "Office_Products.index.json").read_text())
    for item, codes in zip(data.item_ids, data.catalog.codes.tolist()):
        assert format_sid(codes) == "".join(index[item]), item
    # the test target of every user is the last target of its last row
    last_target = {}
    for name in ("valid.csv", "test.csv"):
        for row in _rows(FIXTURE / name):
            last_target[row["user_id"]] = row["item_id"]
    got = {data.user_ids[u]: data.item_ids[t] for u, t in zip(data.split.test.user.tolist(),
                                                               data.split.test.target.tolist())}
    assert got == last_target


def test_minionerec_single_file_path(tmp_path):
    data = load_interactions("minionerec", FIXTURE / "valid.csv")
    assert set(data.user_ids) == {r["user_id"] for r in _rows(FIXTURE / "valid.csv")}
    files = minionerec_files(FIXTURE / "valid.csv")
    assert files.index.name == "Office_Products.index.json"


def test_minionerec_item_without_sid_is_refused(tmp_path):
    folder = _copy_fixture(tmp_path)
    rows = _rows(folder / "valid.csv")
    user = rows[0]["user_id"]
    second = next(i for i, r in enumerate(rows) if i > 0 and r["user_id"] == user)
    _rewrite(folder / "valid.csv", second, "history_item_id", "[999999]")
    _rewrite(folder / "valid.csv", second, "history_item_sid", "[]")
    with pytest.raises(DataError) as info:
        load_minionerec(folder)
    message = str(info.value)
    assert "valid.csv" in message and f"line {second + 2}" in message and repr(user) in message
    assert "'999999' has no SID" in message and "Office_Products.index.json" in message


def test_minionerec_history_gap_is_refused(tmp_path):
    folder = _copy_fixture(tmp_path)
    rows = _rows(folder / "valid.csv")
    user = rows[0]["user_id"]
    second = next(i for i, r in enumerate(rows) if i > 0 and r["user_id"] == user)
    history = ast.literal_eval(rows[second]["history_item_id"])
    sids = ast.literal_eval(rows[second]["history_item_sid"])
    _rewrite(folder / "valid.csv", second, "history_item_id", str(history[1:] + history[:1]))
    _rewrite(folder / "valid.csv", second, "history_item_sid", str(sids[1:] + sids[:1]))
    with pytest.raises(DataError, match=rf"valid.csv: line {second + 2}: user '{user}': history .* does not "
                                        rf"continue"):
        load_minionerec(folder)


def test_minionerec_empty_history_after_earlier_rows_is_refused(tmp_path):
    folder = _copy_fixture(tmp_path)
    in_valid = {r["user_id"] for r in _rows(folder / "valid.csv")}
    at, row = next((i, r) for i, r in enumerate(_rows(folder / "test.csv")) if r["user_id"] in in_valid)
    _rewrite(folder / "test.csv", at, "history_item_id", "[]")  # after the user's valid.csv rows
    _rewrite(folder / "test.csv", at, "history_item_sid", "[]")
    with pytest.raises(DataError, match=rf"test.csv: line {at + 2}: user '{row['user_id']}': history \[\] does "
                                        rf"not continue"):
        load_minionerec(folder)


def test_minionerec_sid_that_differs_from_the_index_is_refused(tmp_path):
    folder = _copy_fixture(tmp_path)
    row = _rows(folder / "test.csv")[3]
    _rewrite(folder / "test.csv", 3, "item_sid", "<a_1><b_2><c_3>")
    with pytest.raises(DataError) as info:
        load_minionerec(folder)
    message = str(info.value)
    assert f"test.csv: line 5 (user {row['user_id']!r})" in message and "'item_sid'" in message and "<a_1><b_2><c_3>" in message
    assert repr(row["item_sid"]) in message and "Office_Products.index.json" in message


def test_minionerec_needs_its_index_and_columns(tmp_path):
    folder = _copy_fixture(tmp_path)
    (folder / "Office_Products.index.json").unlink()
    with pytest.raises(DataError, match=r"no '\*\.index\.json'"):
        load_minionerec(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(FIXTURE / "Office_Products.index.json", bad)
    (bad / "test.csv").write_text("user_id,item_id\nu1,3\n")
    with pytest.raises(DataError, match=r"test.csv: line 1: no column 'history_item_id'"):
        load_minionerec(bad)
    (bad / "test.csv").write_text('user_id,history_item_id,item_id\nu1,"[1, 2",3\n')
    with pytest.raises(DataError, match=r"test.csv: line 2 \(user 'u1'\): column 'history_item_id': '\[1, 2' is not a list"):
        load_minionerec(bad)


# ---------------------------------------------------------------------------------------- csv refusal, columns
def test_csv_with_list_columns_is_refused_naming_minionerec(tmp_path, capsys):
    with pytest.raises(DataError) as info:
        load_csv(FIXTURE / "test.csv")
    message = str(info.value)
    assert "test.csv: line 2" in message and "history_item_id" in message and "--format minionerec" in message
    code = main(["prepare", "--format", "csv", "--path", str(FIXTURE / "test.csv"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--format minionerec" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_csv_with_a_list_column_of_another_kind_names_the_column(tmp_path):
    path = tmp_path / "seq.csv"
    path.write_text('user,item,tags,previous\nu1,i1,"x, y","[\'i0\', \'i2\']"\n')
    with pytest.raises(DataError, match=r"line 2: list-valued column\(s\) \['previous'\].*--format p5"):
        load_csv(path)
    # text that merely starts with a bracket is a plain value
    path.write_text('user,item,title\nu1,i1,[Pack of 2] pens\nu1,i2,[Blue]\nu1,i3,"[1, 2"\n')
    assert load_csv(path).num_interactions == 3


def test_csv_refuses_a_recbole_sequence_file(tmp_path):
    path = tmp_path / "seq.inter"
    path.write_text("session_id:token\titem_id_list:token_seq\titem_id:token\n1\t10 11 12\t13\n")
    with pytest.raises(DataError, match=r"line 1: column 'item_id_list:token_seq' is a list of items"):
        load_csv(path, user_col="session_id")
    # an atomic file with a token_seq column about something else still loads
    path.write_text("user_id:token\titem_id:token\tgenres:token_seq\nu1\ti1\tdrama comedy\n")
    assert load_csv(path).num_interactions == 1


@needs_office
def test_csv_on_the_shared_minionerec_file_is_refused():
    with pytest.raises(DataError, match="--format minionerec"):
        load_csv(OFFICE / "test.csv")


def _odd_columns(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    lines = ["who,what,when,score"]
    for u in range(6):
        for t in range(5):
            lines.append(f"person{u},thing{(u * 3 + t * 7) % 11},{100 - t},{t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prepare_csv_column_options(tmp_path, capsys):
    path = _odd_columns(tmp_path)
    with pytest.raises(DataError, match=r"no user column .* \(or pass user_col=\.\.\.\)"):
        prepare("csv", path, levels=1, codes=4)
    data = prepare("csv", path, levels=1, codes=4, user_col="who", item_col="what", time_col="when")
    assert data.stats["num_users"] == 6 and data.stats["num_interactions"] == 30
    # ``when`` counts down: the time column, not file order, orders each sequence
    first = data.split.test.target[0].item()
    assert data.item_ids[first] == "thing0"  # person0's earliest event (when=96) is the last of the file rows
    out = tmp_path / "cli"
    assert main(["prepare", "--format", "csv", "--path", str(path), "--out", str(out), "--levels", "1",
                 "--codes", "4", "--user-col", "who", "--item-col", "what", "--time-col", "when"]) == 0
    assert json.loads((out / "stats.json").read_text())["num_users"] == 6
    capsys.readouterr()
    assert main(["prepare", "--format", "csv", "--path", str(path), "--out", str(out), "--item-col", "nope",
                 "--user-col", "who"]) == 2
    assert "no item column 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="column names are only for --format csv"):
        prepare("minionerec", FIXTURE, user_col="who")


# ------------------------------------------------------------------------------- early checks, stage logs
@pytest.mark.parametrize("kwargs, fragment", [
    ({"levels": 0}, "levels=0: expected an integer >= 1"),
    ({"levels": 30}, "levels=30: at most 25"),
    ({"codes": 1}, "codes=1: expected an integer >= 2"),
    ({"codes": 2.5}, "codes=2.5"),
    ({"max_history": 0}, "max_history=0"),
    ({"collisions": "merge"}, "unknown collision policy 'merge'"),
])
def test_prepare_checks_options_before_reading(tmp_path, kwargs, fragment):
    missing = tmp_path / "does-not-exist.csv"  # never read: the option check comes first
    with pytest.raises(ValueError) as info:
        prepare("csv", missing, **kwargs)
    assert fragment in str(info.value)


def test_prepare_cli_rejects_bad_levels_without_loading(tmp_path, capsys):
    code = main(["prepare", "--format", "p5", "--path", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o"),
                 "--levels", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "levels=0" in err and "absent.txt" not in err


def test_prepare_logs_its_stages(tmp_path, caplog):
    p5 = Path(__file__).resolve().parent / "fixtures" / "data" / "p5" / "user_sequence.txt"
    with caplog.at_level(logging.INFO):
        prepare("p5", p5, tmp_path / "p", levels=2, codes=2)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for fragment in ("[1/4] loading p5", "[2/4] leave-one-out", "item embeddings: collaborative",
                     "RQ-KMeans level 1 of 2", "RQ-KMeans level 2 of 2", "[4/4] trie", "wrote"):
        assert fragment in text, fragment


def test_given_sid_formats_warn_that_levels_are_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        data = prepare("minionerec", FIXTURE, levels=5, codes=8)
    assert "levels=5, codes=8 ignored" in caplog.text
    assert data.stats["sid_levels"] == 3


@needs_office
def test_shared_minionerec_sample_loses_no_user(tmp_path):
    data = prepare("minionerec", OFFICE, tmp_path / "office")
    users = {r["user_id"] for name in ("valid.csv", "test.csv") for r in _rows(OFFICE / name)}
    assert data.stats["num_users"] == len(users) == 3231
    assert data.stats["dropped_users"] == 0 and data.stats["num_test"] == 3231
    assert data.stats["num_items"] == 3459 and data.stats["num_interactions"] == 22447
    assert torch.equal(data.catalog.codes[:1], torch.tensor([[60, 159, 203]]))  # item "0" of the index
