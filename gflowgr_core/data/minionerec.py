"""MiniOneRec-format data: pre-split sequence CSVs plus an ``X.index.json`` of given semantic IDs.

A MiniOneRec split file has one training/evaluation example per row: ``user_id``, ``history_item_id`` (a
Python-literal list of the item ids before the target, at most the last ``N``), ``item_id`` (the target),
and usually ``history_item_sid`` / ``item_sid`` (the same items as SID strings such as
``<a_130><b_122><c_86>``) and title columns. The SIDs of every item are in ``X.index.json``
(``{"item_id": ["<a_60>", "<b_159>", "<c_203>"]}``).

How the rows become a split this library trains on (:func:`load_minionerec`):

1. The files present among ``train.csv``, ``valid.csv``, ``test.csv`` are read in that order (a sample may
   hold only ``valid.csv`` and ``test.csv``). Title columns are not used.
2. Every row is a window of its user's chronological sequence, so each user's rows (files in that order,
   rows in file order) are chained back into one sequence: the first row gives ``history + [target]``;
   each later row must continue it, that is its history must end with the sequence so far (or, for a
   longer history, the sequence so far must be the end of the history, which then replaces it); its
   target is appended. A row that does not continue its user's sequence is an error naming the file, the
   line, the user and both values: nothing is merged by guesswork and no row is skipped.
3. The rebuilt sequences are split like every other format (:func:`~gflowgr_core.data.split.leave_one_out`):
   last item test, second-to-last validation, every earlier prefix a training example. History items of
   the first row of a user (items from before the files' time window, e.g. the missing train period) are
   training targets then. This is the library's protocol, not MiniOneRec's time-window one: MiniOneRec
   scores every row of ``test.csv``, here each user's last item is its one test example, so the numbers are
   not comparable with metrics reported on MiniOneRec's splits.
4. The catalogue is every item of the index (items that appear in no row included, so they can still be
   recommended), with the SIDs kept exactly as given. An item in a row with no SID in the index, or a
   row's ``item_sid``/``history_item_sid`` that differs from the index, is an error naming file, line and
   value.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gflowgr_core.sid.tokens import format_sid, parse_sid

from .loaders import DataError, Interactions, JSONPairs, _read_text, _sorted_ids

__all__ = ["MINIONEREC_SPLITS", "MiniOneRecFiles", "minionerec_files", "read_sid_index", "load_minionerec"]

log = logging.getLogger(__name__)

#: The split files read from a MiniOneRec folder, in chronological order.
MINIONEREC_SPLITS = ("train", "valid", "test")
_REQUIRED = ("user_id", "history_item_id", "item_id")


@dataclass
class MiniOneRecFiles:
    """The files of one MiniOneRec dataset: split CSVs in chronological order and the SID index."""

    csvs: list[Path]
    index: Path
    rows: dict = field(default_factory=dict)  # filled by load_minionerec: rows read per file name


def minionerec_files(path: str | Path) -> MiniOneRecFiles:
    """Locate a MiniOneRec dataset.

    Args:
        path: a folder holding some of ``train.csv``, ``valid.csv``, ``test.csv`` and exactly one
            ``*.index.json``; or one CSV file, whose folder holds the index.

    Raises:
        FileNotFoundError: the path does not exist.
        DataError: no split CSV, no ``*.index.json`` or several of them.
    """
    path = Path(path)
    if path.is_dir():
        folder = path
        csvs = [path / f"{name}.csv" for name in MINIONEREC_SPLITS if (path / f"{name}.csv").is_file()]
        if not csvs:
            found = sorted(p.name for p in path.glob("*.csv"))
            raise DataError(f"{path}: no train.csv, valid.csv or test.csv (MiniOneRec split files)"
                            + (f"; found {found}: pass one of them as --path" if found else ""))
    elif path.is_file():
        folder, csvs = path.parent, [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    indexes = sorted(folder.glob("*.index.json"))
    if not indexes:
        raise DataError(f"{folder}: no '*.index.json' beside the MiniOneRec CSVs; --format minionerec keeps the "
                        f"given SIDs of X.index.json (a one-event-per-row file without SIDs: --format csv)")
    if len(indexes) > 1:
        raise DataError(f"{folder}: several '*.index.json' files ({', '.join(p.name for p in indexes)}); keep one")
    return MiniOneRecFiles(csvs=csvs, index=indexes[0])


def read_sid_index(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Read ``X.index.json`` (``{"item_id": ["<a_60>", "<b_159>", ...]}``) into ``{item_id: codes}``.

    Raises:
        DataError: naming the file and the item: malformed JSON, an item listed twice, a SID that is not a
            list of tokens or not a valid SID.
    """
    path = Path(path)
    try:
        parsed = json.loads(_read_text(path), object_pairs_hook=JSONPairs)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg})") from None
    if not isinstance(parsed, JSONPairs) or not parsed:
        raise DataError(f"{path}: expected a non-empty JSON object {{\"item_id\": [\"<a_1>\", \"<b_2>\", ...]}}")
    index: dict[str, tuple[int, ...]] = {}
    for item, tokens in parsed:
        if item in index:
            raise DataError(f"{path}: item {item!r} appears more than once")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{path}: item {item!r}: SID {tokens!r} is not a list of token strings")
        try:
            index[item] = parse_sid("".join(tokens))
        except ValueError as exc:
            raise DataError(f"{path}: item {item!r}: {exc}") from None
    return index


def _literal_list(text: str, where: str, column: str) -> list:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise DataError(f"{where}: column {column!r}: {text[:80]!r} is not a list literal like [12, 34]") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: column {column!r}: {text[:80]!r} is not a list")
    return list(value)


def _item_id(value: object, where: str, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: column {column!r}: item id {value!r} is neither an integer nor a string")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: column {column!r}: empty item id")
    return text


def _check_sid(sid_text: object, item: str, index: dict, where: str, column: str, index_path: Path) -> None:
    """The row's SID of ``item`` must be the index's (the index is the catalogue; rows only repeat it)."""
    try:
        codes = parse_sid(sid_text) if isinstance(sid_text, str) else None
    except ValueError as exc:
        raise DataError(f"{where}: column {column!r}: {exc}") from None
    if codes is None:
        raise DataError(f"{where}: column {column!r}: SID {sid_text!r} of item {item!r} is not a string")
    if codes != index[item]:
        raise DataError(f"{where}: column {column!r}: item {item!r} has SID {sid_text!r} here but "
                        f"{format_sid(index[item])!r} in "
                        f"{index_path.name}")


def _chain(sequence: list[str] | None, history: list[str], target: str, where: str, user: str) -> list[str]:
    """The user's sequence continued by one row; a row that does not continue it is an error."""
    if sequence is None:
        return history + [target]
    n, h = len(sequence), len(history)
    if 0 < h <= n and sequence[n - h:] == history:
        sequence.append(target)
        return sequence
    if h > n and history[h - n:] == sequence:
        return history + [target]
    raise DataError(f"{where}: user {user!r}: history {history} does not continue the user's earlier rows, "
                    f"whose sequence ends with {sequence[-max(h, 1):]}; rows of a user must follow each other "
                    f"in time (files train, valid, test; rows in file order)")


def _read_rows(csv_path: Path, index: dict, index_path: Path, sequences: dict[str, list[str]]) -> int:
    """Chain the rows of one CSV into ``sequences`` (user -> raw item ids); returns the number of rows."""
    text = _read_text(csv_path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{csv_path}: empty file")
    columns = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in _REQUIRED if name not in columns]
    if missing:
        raise DataError(f"{csv_path}: line 1: no column {missing[0]!r}; a MiniOneRec file has columns "
                        f"{list(_REQUIRED)} (+ history_item_sid, item_sid, titles); header is {header}")
    sid_h, sid_t = columns.get("history_item_sid"), columns.get("item_sid")
    at_user, at_hist, at_item = (columns[name] for name in _REQUIRED)
    rows = 0
    for fields in reader:
        if not fields or all(not f.strip() for f in fields):
            continue
        where = f"{csv_path}: line {reader.line_num}"
        if len(fields) != len(header):
            raise DataError(f"{where}: {len(fields)} field(s), the header has {len(header)}")
        user = fields[at_user].strip()
        if not user:
            raise DataError(f"{where}: empty user_id")
        at = f"{where} (user {user!r})"
        history = [_item_id(v, at, "history_item_id") for v in _literal_list(fields[at_hist], at, "history_item_id")]
        target = _item_id(fields[at_item], at, "item_id")
        for column, item in [("history_item_id", x) for x in history] + [("item_id", target)]:
            if item not in index:
                raise DataError(f"{at}: column {column!r}: item {item!r} has no SID in {index_path}")
        if sid_t is not None:
            _check_sid(fields[sid_t].strip(), target, index, at, "item_sid", index_path)
        if sid_h is not None:
            sids = _literal_list(fields[sid_h], at, "history_item_sid")
            if len(sids) != len(history):
                raise DataError(f"{at}: history_item_sid has {len(sids)} SID(s) but history_item_id has "
                                f"{len(history)} item(s)")
            for item, sid in zip(history, sids):
                _check_sid(sid, item, index, at, "history_item_sid", index_path)
        sequences[user] = _chain(sequences.get(user), history, target, where, user)
        rows += 1
    if rows == 0:
        raise DataError(f"{csv_path}: header only, no rows")
    return rows


def load_minionerec(path: str | Path, files: MiniOneRecFiles | None = None) -> Interactions:
    """Load a MiniOneRec dataset as chronological per-user sequences (see the module docstring for exactly
    how rows are chained).

    Args:
        path: a folder (``train.csv``/``valid.csv``/``test.csv`` + ``X.index.json``) or one of its CSVs.
        files: the result of :func:`minionerec_files` when already located (its ``rows`` are filled in).

    Returns:
        :class:`Interactions` with users in order of first appearance and ``item_ids`` every item of the
        index (sorted like the other loaders), so that ``X.index.json`` gives every catalogue item a SID.

    Raises:
        DataError: naming file, line and value for a missing column, a malformed list or SID, an item with
            no SID in the index, a SID that differs from the index, a row that does not continue its user's
            earlier rows.
    """
    files = files or minionerec_files(path)
    index = read_sid_index(files.index)
    sequences: dict[str, list[str]] = {}
    for csv_path in files.csvs:
        files.rows[csv_path.name] = _read_rows(csv_path, index, files.index, sequences)
    item_ids = _sorted_ids(index)
    position = {raw: i for i, raw in enumerate(item_ids)}
    arrays = [np.fromiter((position[x] for x in seq), dtype=np.int64, count=len(seq)) for seq in sequences.values()]
    unused = len(item_ids) - len({x for seq in sequences.values() for x in seq})
    log.info("%s: %s rows from %s -> %d user sequences (%d interactions); %d of %d index items appear in no "
             "row and stay in the catalogue", path, sum(files.rows.values()), ", ".join(files.rows),
             len(sequences), sum(len(s) for s in sequences.values()), unused, len(item_ids))
    return Interactions(user_ids=list(sequences), item_ids=item_ids, sequences=arrays,
                        source=f"minionerec:{Path(path)}")
