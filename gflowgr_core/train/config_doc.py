"""The configuration reference (``docs/config.md``), generated from the config dataclasses.

A key's meaning is the comment beside its field (lines of comment right above it, then the comment at the
end of its line) or, for classes documented that way, its entry in the class docstring's ``Attributes:``
section. A field with neither is an error, so the reference cannot miss a key; the test suite compares
``docs/config.md`` with :func:`config_reference` so it cannot go stale either.

Run ``python -m gflowgr_core.train.config_doc`` to rewrite ``docs/config.md`` (``--check`` only compares).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union, get_args, get_origin, get_type_hints

from gflowgr_core.train.config import BOUNDS, CHOICES, TrainConfig

__all__ = ["ConfigRow", "config_rows", "config_reference", "field_docs", "main", "DEFAULT_PATH"]

#: Where the reference lives in a checkout.
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"

_HEADER = """# Configuration reference

Every key of a `gflowgr train` config, with its default and meaning. Generated from the config dataclasses
(`gflowgr_core/train/config.py` and the classes it nests) by `python -m gflowgr_core.train.config_doc`: edit
the comment beside a field there, not this file (a test fails when this file is stale).

Set keys in a YAML file (`gflowgr train --config FILE`) or as `key=value` overrides after it
(`gflowgr train --config FILE epochs=5 gfn.n_aug=5`); nested keys use a dot. `gflowgr train --config FILE
... --print-config` prints the merged config and exits. Unknown keys and values that cannot work are refused
when the config is loaded, naming the key and whether the file or an override set it.
"""


class ConfigRow(NamedTuple):
    """One documented key: dotted name, type, default (as YAML text) and meaning."""

    key: str
    type: str
    default: str
    meaning: str


def _attributes_section(doc: Optional[str]) -> dict[str, str]:
    """``{name: text}`` from the ``Attributes:`` section of a Google-style docstring (``a, b: text`` gives
    both names the text)."""
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        entry = re.match(r"([\w, ]+):\s*(.*)$", line.strip()) if width == indent else None
        if entry:
            names = [n.strip() for n in entry.group(1).split(",") if n.strip()]
            for name in names:
                out[name] = entry.group(2).strip()
        else:
            for name in names:
                out[name] = f"{out[name]} {line.strip()}".strip()
    return out


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text per line of ``source`` and the set of lines that hold only a comment."""
    text: dict[int, str] = {}
    whole: set[int] = set()
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            text[row] = token.string.lstrip("#").strip()
            if lines[row - 1].strip().startswith("#"):
                whole.add(row)
    return text, whole


def field_docs(cls: type) -> dict[str, str]:
    """The meaning of each field of dataclass ``cls``, from its comments or its docstring's Attributes.

    Raises:
        ValueError: naming the class and the field when a field has neither.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    text, whole = _comments(source)
    attributes = _attributes_section(cls.__doc__)
    body = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        row = node.lineno - 1
        while row in whole:
            above.insert(0, text[row])
            row -= 1
        trailing = [text[r] for r in range(node.lineno, node.end_lineno + 1) if r in text and r not in whole]
        meaning = " ".join(above + trailing).strip() or attributes.get(node.target.id, "")
        docs[node.target.id] = meaning
    hints = get_type_hints(cls)
    missing = [f.name for f in dataclasses.fields(cls)
               if not docs.get(f.name) and not dataclasses.is_dataclass(hints[f.name])]  # a section has its own
    if missing:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: field(s) {missing} have no documentation: add a "
                         f"comment beside the field (or an Attributes: entry in the class docstring)")
    return docs


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Union:
        inner = [a for a in get_args(hint) if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + (" | null" if type(None) in get_args(hint) else "")
    if get_origin(hint) is tuple:
        return "list"
    return getattr(hint, "__name__", str(hint))


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def config_rows(cls: type = TrainConfig, section: str = "") -> list[tuple[str, str, list[ConfigRow]]]:
    """``[(section title, section summary, rows)]`` for ``cls`` and, after it, every dataclass nested in it, in
    field order."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    instance = cls()
    rows: list[ConfigRow] = []
    nested: list[tuple[str, str, list[ConfigRow]]] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested.extend(config_rows(hint, f"{section}{f.name}."))
            continue
        key = f"{section}{f.name}"
        meaning = docs[f.name]
        if key in CHOICES and not all(str(c) in meaning for c in CHOICES[key]):
            meaning = _sentence(meaning) + f" One of: {', '.join(str(c) for c in CHOICES[key])}."
        if key in _LIMITS and ">" not in meaning:
            meaning = _sentence(meaning) + f" Must be {_LIMITS[key]}."
        rows.append(ConfigRow(key, _type_name(hint), _yaml_text(getattr(instance, f.name)), meaning))
    title = f"`{section.rstrip('.')}` ({cls.__name__})" if section else f"Top level ({cls.__name__})"
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    return [(title, summary, rows)] + nested


#: ``key -> ">= 1"`` from the bounds :meth:`TrainConfig.validate` enforces.
_LIMITS = {key: f"{'>' if strict else '>='} {low}" for key, low, strict, _ in BOUNDS}


def _sentence(text: str) -> str:
    text = text.rstrip()
    return text if text.endswith(".") else f"{text}."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    """The whole of ``docs/config.md``: one table per config section, every key with its type, default and
    meaning."""
    parts = [_HEADER]
    for title, summary, rows in config_rows():
        parts.append(f"\n## {title}\n\n{summary}\n\n| key | type | default | meaning |\n|---|---|---|---|\n")
        parts.extend(f"| `{r.key}` | {_cell(r.type)} | `{_cell(r.default)}` | {_cell(r.meaning)} |\n" for r in rows)
    return "".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m gflowgr_core.train.config_doc [--out FILE] [--check]``: write (or compare) the reference."""
    parser = argparse.ArgumentParser(prog="python -m gflowgr_core.train.config_doc", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_PATH), help="where the reference goes (default: docs/config.md)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    text = config_reference()
    out = Path(args.out)
    if args.check:
        current = out.read_text() if out.is_file() else None
        if current != text:
            print(f"{out} is stale: run `python -m gflowgr_core.train.config_doc`", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
