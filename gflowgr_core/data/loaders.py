"""Interaction loaders: LETTER JSON, P5 ``user_sequence.txt``, CSV/TSV (incl. RecBole ``.inter``), ML-100K;
MiniOneRec's pre-split CSVs are read by :mod:`gflowgr_core.data.minionerec`; :mod:`gflowgr_core.data.formats`
picks the loader of a format name.

Every loader returns an :class:`Interactions`: one chronological sequence of dense item indices per user.
Items are re-indexed ``0..n_items-1`` in the order of their raw ids (numerical order when every raw id is
an integer, string order otherwise), so the same file always yields the same indices and the LETTER
``X.index.json`` keys line up with ``Interactions.item_ids``.

Bad input raises :class:`DataError` naming the file and the offending line or user. Users whose sequence is
empty are kept here; :func:`gflowgr_core.data.split.leave_one_out` drops and counts them.
"""
from __future__ import annotations

import ast
import csv
import importlib.util
import io
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "DataError",
    "Interactions",
    "letter_paths",
    "load_letter",
    "load_p5",
    "load_csv",
    "load_ml100k",
]

logger = logging.getLogger(__name__)


_INTEGER_ID = re.compile(r"-?[0-9]+")
# RecBole atomic-file headers carry a type after a colon: ``user_id:token``, ``rating:float``.
_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_USER_COLUMNS = ("user_id", "userid", "user", "uid", "reviewerid", "customer_id", "visitor_id", "visitorid")
_ITEM_COLUMNS = ("item_id", "itemid", "item", "iid", "asin", "product_id", "productid", "movie_id",
                 "movieid", "business_id", "book_id")
_TIME_COLUMNS = ("timestamp", "time", "ts", "unixreviewtime", "unix_time", "datetime", "date", "event_time")
_SEPARATORS = ("\t", ",", ";", "|")
_WHITESPACE = "whitespace"
_ML100K_RELPATH = ("dataset_example", "ml-100k", "ml-100k.inter")
_ML100K_INSTALL = "pip install --no-deps recbole==1.2.1"


class DataError(ValueError):
    """Malformed or unusable interaction data; the message names the file and the line or user."""


@dataclass
class Interactions:
    """Chronological item sequences, one per user, over dense item indices.

    Attributes:
        user_ids: raw user ids; user ``u`` is ``user_ids[u]``.
        item_ids: raw item ids; internal item ``i`` is ``item_ids[i]``. Sorted by raw id (numerically
            when every raw id is an integer).
        sequences: ``sequences[u]`` is an int64 array ``[n_u]`` of internal item indices in chronological
            order (``n_u`` may be 0).
        source: where the data came from, e.g. ``"letter:/data/Beauty/Beauty.inter.json"``.
    """

    user_ids: list[str]
    item_ids: list[str]
    sequences: list[np.ndarray]
    source: str

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise DataError(f"{self.source}: {len(self.user_ids)} user ids but {len(self.sequences)} sequences")

    @property
    def num_users(self) -> int:
        """Number of users (including users with an empty sequence)."""
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        """Number of distinct items."""
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        """Total number of (user, item) events over all sequences."""
        return int(sum(len(s) for s in self.sequences))

    def lengths(self) -> np.ndarray:
        """Sequence length per user: int64 ``[num_users]``."""
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))

    def __repr__(self) -> str:
        return (f"Interactions(source={self.source!r}, users={self.num_users}, items={self.num_items}, "
                f"interactions={self.num_interactions})")


# ----------------------------------------------------------------------------------------------- helpers


def _sorted_ids(raw_ids: Iterable[str]) -> list[str]:
    """Distinct raw ids in canonical order: numerical when all are integers, else lexicographic."""
    distinct = set(raw_ids)
    if distinct and all(_INTEGER_ID.fullmatch(s) for s in distinct):
        # ``(int, str)`` keeps "7" and "07" apart (they are different raw ids) in a fixed order.
        return sorted(distinct, key=lambda s: (int(s), s))
    return sorted(distinct)


def _from_raw_sequences(user_ids: list[str], raw_sequences: list[list[str]], source: str) -> Interactions:
    """Re-index per-user raw item sequences densely and wrap them in an :class:`Interactions`."""
    item_ids = _sorted_ids(itertools.chain.from_iterable(raw_sequences))
    position = {raw: i for i, raw in enumerate(item_ids)}
    flat = itertools.chain.from_iterable(raw_sequences)
    total = sum(len(s) for s in raw_sequences)
    codes = np.fromiter((position[raw] for raw in flat), dtype=np.int64, count=total)
    offsets = np.cumsum([len(s) for s in raw_sequences], dtype=np.int64)[:-1]
    sequences = np.split(codes, offsets) if raw_sequences else []
    return Interactions(user_ids=list(user_ids), item_ids=item_ids, sequences=sequences, source=source)


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (BOM tolerated); DataError with the line number on bad bytes or no content."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _raw_id(value: object, path: Path, user: str, position: int) -> str:
    """A JSON sequence element as a raw item id string (JSON ints and strings are both accepted)."""
    if isinstance(value, (bool, list)) or not isinstance(value, (int, str)):
        raise DataError(f"{path}: user {user!r}: element {position} is {_json_kind(value)}; "
                        f"expected an item id (integer or string)")
    text = str(value)
    if not text.strip():
        raise DataError(f"{path}: user {user!r}: element {position} is an empty item id")
    return text


# ------------------------------------------------------------------------------------------------ LETTER


def letter_paths(path: str | Path) -> tuple[Path, Path | None]:
    """Locate a LETTER dataset: ``(X.inter.json, X.index.json or None when absent)``.

    Args:
        path: a folder holding exactly one ``*.inter.json`` (and normally its ``*.index.json``), or the
            ``.inter.json`` file itself.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.inter.json"))
        if not found:
            raise DataError(f"{path}: no '*.inter.json' file; expected a LETTER folder holding "
                            f"X.inter.json and X.index.json")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: several '*.inter.json' files ({names}); pass the one to load")
        inter = found[0]
    elif path.is_file():
        inter = path
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    stem = inter.name[: -len(".inter.json")] if inter.name.endswith(".inter.json") else inter.stem
    index = inter.with_name(f"{stem}.index.json")
    return inter, (index if index.is_file() else None)


class JSONPairs(list):
    """A parsed JSON object as its ``(key, value)`` pairs in file order: the ``object_pairs_hook`` of readers
    that report duplicated keys, which ``json`` would otherwise resolve silently by keeping the last."""


def _json_kind(value: object) -> str:
    if isinstance(value, JSONPairs):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return f"a string ({value!r})"


def load_letter(path: str | Path) -> Interactions:
    """Load LETTER interactions: ``{"user_id": [item_id, ...], ...}`` with chronological sequences.

    Args:
        path: a folder holding ``X.inter.json`` (+ ``X.index.json``) or the ``.inter.json`` file.

    Returns:
        :class:`Interactions` with users in file order and items re-indexed by sorted raw id.

    Raises:
        DataError: malformed JSON (with line and column), a top level that is not an object, a user
            listed twice, a value that is not a list, an element that is not an int or string id, an
            empty file.
    """
    inter, _ = letter_paths(path)
    text = _read_text(inter)
    try:
        parsed = json.loads(text, object_pairs_hook=JSONPairs)
    except json.JSONDecodeError as exc:
        raise DataError(f"{inter}: line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg})") from None
    if not isinstance(parsed, JSONPairs):
        raise DataError(f"{inter}: top level is {_json_kind(parsed)}; expected a JSON object "
                        f'{{"user_id": [item_id, ...]}}')
    if not parsed:
        raise DataError(f"{inter}: no users (empty JSON object)")
    user_ids: list[str] = []
    raw_sequences: list[list[str]] = []
    seen: set[str] = set()
    for user, value in parsed:
        if user in seen:
            raise DataError(f"{inter}: user {user!r} appears more than once")
        seen.add(user)
        if isinstance(value, JSONPairs) or not isinstance(value, list):
            raise DataError(f"{inter}: user {user!r}: value is {_json_kind(value)}; expected a list of item ids")
        user_ids.append(user)
        raw_sequences.append([_raw_id(v, inter, user, k) for k, v in enumerate(value)])
    return _from_raw_sequences(user_ids, raw_sequences, f"letter:{inter}")


# ---------------------------------------------------------------------------------------------------- P5


def load_p5(path: str | Path) -> Interactions:
    """Load a P5 ``user_sequence.txt``: one user per line, ``user item item ...`` separated by whitespace.

    Args:
        path: the text file, or a folder holding ``user_sequence.txt``.

    Returns:
        :class:`Interactions` with users in file order. Blank lines carry no data and are skipped; a line
        with a user and no items gives that user an empty sequence.

    Raises:
        DataError: a user listed on two lines, a token holding a CSV separator or quote (a CSV file given
            to the P5 loader), invalid UTF-8, an empty file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "user_sequence.txt"
    text = _read_text(path)
    user_ids: list[str] = []
    raw_sequences: list[list[str]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        for token in tokens:
            bad = next((c for c in ',;"\'' if c in token), None)
            if bad is not None:
                raise DataError(f"{path}: line {number}: malformed line, token {token!r} contains {bad!r}; "
                                f"expected 'user item item ...' separated by whitespace (use load_csv for "
                                f"CSV files)")
        user = tokens[0]
        if user in first_line:
            raise DataError(f"{path}: line {number}: user {user!r} already listed on line {first_line[user]}")
        first_line[user] = number
        user_ids.append(user)
        raw_sequences.append(tokens[1:])
    return _from_raw_sequences(user_ids, raw_sequences, f"p5:{path}")


# --------------------------------------------------------------------------------------------------- CSV


def _column_key(name: str) -> str:
    """Header cell normalised for matching: trimmed, unquoted, lower-case, RecBole ``:type`` removed."""
    key = name.strip().strip('"').strip("'").strip().lower()
    base, colon, kind = key.rpartition(":")
    if colon and kind in _RECBOLE_TYPES:
        key = base
    return key


def _detect_separator(header: str) -> str:
    for sep in _SEPARATORS:
        if sep in header:
            return sep
    return _WHITESPACE


def _split_rows(text: str, sep: str) -> Iterable[tuple[int, list[str]]]:
    """``(line number, fields)`` per non-blank line; quoted fields are honoured for real separators."""
    if sep == _WHITESPACE:
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if fields:
                yield number, fields
        return
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    for fields in reader:
        if not fields or all(not f.strip() for f in fields):
            continue
        yield reader.line_num, fields


def _find_column(header: Sequence[str], wanted: str | None, candidates: tuple[str, ...], role: str,
                 path: Path, required: bool) -> int | None:
    keys = [_column_key(h) for h in header]
    if wanted is not None:
        target = _column_key(wanted)
        for i, (raw, key) in enumerate(zip(header, keys)):
            if key == target or raw.strip() == wanted:
                return i
        raise DataError(f"{path}: line 1: no {role} column {wanted!r}; header columns are {list(header)}")
    for candidate in candidates:
        if candidate in keys:
            return keys.index(candidate)
    if required:
        raise DataError(f"{path}: line 1: no {role} column in header {list(header)}; expected one of "
                        f"{list(candidates)} (or pass {role}_col=...)")
    return None


def _parse_time(value: str, path: Path, line: int) -> float:
    text = value.strip()
    try:
        stamp = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise DataError(f"{path}: line {line}: timestamp {value!r} is neither a number nor an ISO date") \
                from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        stamp = moment.timestamp()
    if not math.isfinite(stamp):
        raise DataError(f"{path}: line {line}: timestamp {value!r} is not finite")
    return stamp


_LIST_CHECK_ROWS = 50  # data rows of a CSV whose unused columns are checked for list values


def _is_list_literal(value: str) -> bool:
    """True for a field such as ``[2122, 243]`` or ``['<a_1><b_2>', ...]``: a Python/JSON list literal."""
    text = value.strip()
    if len(text) < 2 or text[0] != "[" or text[-1] != "]":
        return False
    try:
        return isinstance(ast.literal_eval(text), list)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False


def _refuse_list_columns(header: Sequence[str], fields: Sequence[str], used: set, path: Path, line: int) -> None:
    """A column of item lists that load_csv would ignore means a sequence file: refuse it, naming the format.

    Reading only the one-item column of such a file keeps one event per row and silently loses the
    histories (on MiniOneRec's Office_Products test.csv: 1,348 of 2,024 users).
    """
    lists = [i for i, value in enumerate(fields[:len(header)]) if i not in used and _is_list_literal(value)]
    if not lists:
        return
    names = [_column_key(header[i]) for i in lists]
    if "history_item_id" in names:
        hint = ("use --format minionerec (prepare(\"minionerec\", ...)), which chains the history_item_id + "
                "item_id rows of each user into one sequence")
    else:
        hint = "convert it to one (user, item, time) event per row, or to a P5 user_sequence.txt (--format p5)"
    first = lists[names.index("history_item_id")] if "history_item_id" in names else lists[0]
    raise DataError(f"{path}: line {line}: list-valued column(s) {[header[i].strip() for i in lists]} (e.g. "
                    f"{header[first].strip()} = {fields[first][:40]!r}) would be ignored by --format csv, which "
                    f"reads one item per row and would drop the histories; {hint}")


def _refuse_sequence_header(header: Sequence[str], used: set, path: Path) -> None:
    """RecBole's sequential files declare their item lists (``item_id_list:token_seq``): refuse them too."""
    for i, cell in enumerate(header):
        name = cell.strip().strip('"').strip("'").strip().lower()
        if i not in used and name.endswith(":token_seq") and "item" in name:
            raise DataError(f"{path}: line 1: column {cell.strip()!r} is a list of items (RecBole token_seq) that "
                            f"--format csv would ignore, reading one item per row and dropping the histories; "
                            f"give the atomic .inter file (one user_id, item_id, timestamp event per row) instead")


def load_csv(path: str | Path, user_col: str | None = None, item_col: str | None = None,
             time_col: str | None = None, sep: str | None = None) -> Interactions:
    """Load one-event-per-row interactions from a CSV/TSV file with a header line.

    RecBole atomic headers (``user_id:token item_id:token rating:float timestamp:float``) are understood:
    the ``:type`` suffix is ignored when matching column names. Extra columns are ignored, except a column
    of list values such as ``[12, 34]`` in the first rows: that is a sequence file, refused (DataError naming
    the column and the format to use) rather than read as one item per row.

    Args:
        path: the file.
        user_col, item_col, time_col: column names; by default the first of the usual names found
            (``user_id``/``user``/``uid``..., ``item_id``/``item``/``asin``..., ``timestamp``/``time``...).
            With no time column the rows keep file order.
        sep: field separator; by default the first of tab, comma, semicolon, pipe found in the header
            line, else runs of whitespace. ``" "`` also means runs of whitespace.

    Returns:
        :class:`Interactions`; users sorted by raw id like items; each sequence sorted by timestamp
        (stable: rows with equal timestamps keep file order). Repeated (user, item) events are kept.

    Raises:
        DataError: empty file, no data rows, a missing user/item/time column, a row with too few
            fields, an empty user or item, an unparsable timestamp, a list-valued column.
    """
    path = Path(path)
    text = _read_text(path)
    header_line = next(line for line in text.splitlines() if line.strip())
    if sep is None:
        sep = _detect_separator(header_line)
    elif sep == " ":
        sep = _WHITESPACE
    rows = _split_rows(text, sep)
    _, header = next(rows)
    user_at = _find_column(header, user_col, _USER_COLUMNS, "user", path, required=True)
    item_at = _find_column(header, item_col, _ITEM_COLUMNS, "item", path, required=True)
    time_at = _find_column(header, time_col, _TIME_COLUMNS, "time", path, required=False)
    if len({user_at, item_at, time_at} - {None}) < 2 + (time_at is not None):
        raise DataError(f"{path}: line 1: user, item and time must be different columns, got "
                        f"{[header[i] for i in (user_at, item_at, time_at) if i is not None]}")
    needed = max(i for i in (user_at, item_at, time_at) if i is not None) + 1
    used = {user_at, item_at, time_at}
    _refuse_sequence_header(header, used, path)
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    for line, fields in rows:
        if len(fields) < needed:
            raise DataError(f"{path}: line {line}: malformed row, {len(fields)} field(s) {fields}; expected at "
                            f"least {needed} separated by {sep!r}")
        if len(users) < _LIST_CHECK_ROWS:
            _refuse_list_columns(header, fields, used, path, line)
        user, item = fields[user_at].strip(), fields[item_at].strip()
        if not user or not item:
            role = "user" if not user else "item"
            raise DataError(f"{path}: line {line}: empty {role} id")
        users.append(user)
        items.append(item)
        if time_at is not None:
            times.append(_parse_time(fields[time_at], path, line))
    if not users:
        raise DataError(f"{path}: header only, no interaction rows")
    if time_at is None:
        logger.info("%s: no time column in %s; sequences keep file order", path, list(header))

    user_ids = _sorted_ids(users)
    user_pos = {raw: u for u, raw in enumerate(user_ids)}
    item_ids = _sorted_ids(items)
    item_pos = {raw: i for i, raw in enumerate(item_ids)}
    n = len(users)
    user_code = np.fromiter((user_pos[u] for u in users), dtype=np.int64, count=n)
    item_code = np.fromiter((item_pos[i] for i in items), dtype=np.int64, count=n)
    row = np.arange(n, dtype=np.int64)
    # np.lexsort sorts by the last key first; the row index as the final key makes ties keep file order.
    keys = (row, np.asarray(times, dtype=np.float64), user_code) if time_at is not None else (row, user_code)
    order = np.lexsort(keys)
    counts = np.bincount(user_code, minlength=len(user_ids))
    sequences = np.split(item_code[order], np.cumsum(counts)[:-1])
    return Interactions(user_ids=user_ids, item_ids=item_ids, sequences=sequences, source=f"csv:{path}")


# ------------------------------------------------------------------------------------------------ ML-100K


def _ml100k_path() -> Path:
    # find_spec on a top-level name locates the package without executing it; importing recbole itself
    # would fail when it was installed with --no-deps.
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MovieLens-100K is read from the recbole wheel, which is not installed; "
                                f"run `{_ML100K_INSTALL}`")
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*_ML100K_RELPATH)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recbole is installed at {list(spec.submodule_search_locations)} but has no "
                            f"{'/'.join(_ML100K_RELPATH)}; run `{_ML100K_INSTALL}`")


def load_ml100k() -> Interactions:
    """MovieLens-100K (943 users, 1,682 items, 100,000 ratings) from the ``recbole==1.2.1`` wheel.

    Every rating counts as an interaction; sequences are ordered by timestamp.

    Raises:
        FileNotFoundError: recbole (or its bundled ``ml-100k.inter``) is absent; the message gives the
            install command.
    """
    data = load_csv(_ml100k_path(), user_col="user_id", item_col="item_id", time_col="timestamp", sep="\t")
    data.source = f"ml100k:{data.source.split(':', 1)[1]}"
    return data
