"""The code blocks of README.md and docs/*.md run as written.

* ``python`` blocks are executed, each page's blocks in order in one namespace (a later block may use what
  an earlier one defined, as a reader copying the page would), in a scratch folder laid out like the
  repository root: ``configs/`` and ``examples/`` are the checkout's, ``../shared/data`` (and
  ``$GFLOWGR_DATA``) hold the bundled fixtures under the shared datasets' names (``letter/Beauty`` is the
  313-user Beauty slice, ``minionerec/Office_Products`` the 16-user MiniOneRec sample).
* ``bash`` blocks are parsed, not run: every ``gflowgr`` command line must parse with the CLI's own argparse
  (``train`` overrides must be config keys), every ``python FILE`` / ``python -m MODULE`` must exist and know
  the ``--options`` it is given, and every path under a repository folder (``configs/``, ``examples/``,
  ``scripts/``, ...) must exist.
* A block that cannot run here (a GPU, several nodes, a download, a long training run) is preceded by
  ``<!-- doc-test: skip (reason) -->``; it is reported as a skipped test with that reason, so the skips are
  counted in pytest's summary. Blocks in other languages (``diff``, untagged drawings) are not code.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!-- doc-test: skip \((?P<reason>[^)]+)\) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
#: Languages whose blocks are code: python runs, bash is parsed.
RUN, PARSE = ("python",), ("bash", "sh", "shell")
#: Top-level folders of the repository: a path under one of them named in a command must exist.
REPO_DIRS = ("configs", "examples", "scripts", "benchmarks", "docs", "tests", "gflowgr_core", "kernels", "csrc",
             "constraints")
#: The shared datasets' names, mapped to the bundled fixtures the blocks run on.
SHARED_FIXTURES = {"letter/Beauty": FIXTURES / "beauty_tiny",
                   "minionerec/Office_Products": FIXTURES / "minionerec"}


@dataclass(frozen=True)
class Block:
    doc: str        # path relative to the repository root
    line: int       # line of the opening fence (1-based)
    lang: str
    code: str
    skip: str | None  # the reason of a preceding skip marker

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with the skip marker on the line before it (blank lines
    between the two are allowed)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    rel = path.relative_to(ROOT).as_posix()
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group("lang").lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"{rel}:{start + 1}: code block never closed")
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = SKIP.match(lines[k].strip()) if k >= 0 else None
        out.append(Block(rel, start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                         marker.group("reason") if marker else None))
        i = j + 1
    return out


ALL = [b for doc in DOCS for b in blocks_of(doc)]
PYTHON = [b for b in ALL if b.lang in RUN]
BASH = [b for b in ALL if b.lang in PARSE]


# ------------------------------------------------------------------------------------------ python blocks
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder laid out like the repository root, beside a ``shared/data`` of fixtures."""
    base = tmp_path_factory.mktemp("docs")
    work = base / "repo"
    work.mkdir()
    for name in ("configs", "examples", "benchmarks", "scripts"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    for name, fixture in SHARED_FIXTURES.items():
        target = base / "shared" / "data" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(fixture, target_is_directory=True)
    return work


_namespaces: dict[str, tuple[dict, int]] = {}


def run_through(block: Block, sandbox: Path, monkeypatch) -> None:
    """Run every python block of ``block``'s page up to and including it (those not run yet), in order."""
    page = [b for b in PYTHON if b.doc == block.doc]
    ns, done = _namespaces.get(block.doc, ({"__name__": f"doc:{block.doc}"}, 0))
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("GFLOWGR_DATA", str(sandbox.parent / "shared" / "data"))
    monkeypatch.setenv("GFLOWGR_CACHE", str(sandbox.parent / "cache"))
    for b in page[done:page.index(block) + 1]:
        if b.skip is None:
            exec(compile(b.code, b.id, "exec"), ns)  # noqa: S102 - the documentation's own code
        done += 1
        _namespaces[block.doc] = (ns, done)


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs(block: Block, sandbox, monkeypatch):
    if block.skip is not None:
        pytest.skip(f"doc-test: skip ({block.skip})")
    run_through(block, sandbox, monkeypatch)


# ------------------------------------------------------------------------------------------ bash blocks
def commands(code: str) -> list[list[str]]:
    """The command lines of a bash block: continuations joined, comments dropped, split at ``&&``, ``||``,
    ``;`` and ``|``; each as its words."""
    text = code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + [";"]:
            if w in ("&&", "||", ";", "|"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _strip_env(cmd: list[str]) -> list[str]:
    """Drop leading ``VAR=value`` assignments and ``nice``/``nohup`` wrappers."""
    while cmd and (re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]) or cmd[0] in ("nohup", "nice")):
        cmd = cmd[1:]
    return cmd


def _check_gflowgr(argv: list[str], where: str) -> None:
    from gflowgr_core.cli import build_parser
    from gflowgr_core.train.config import ConfigError, load_config

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `gflowgr {' '.join(argv)}` does not parse (argparse exit {exc.code})")
    if args.command == "train":
        overrides = [o for o in args.overrides if not o.startswith("device=")]
        if args.config is not None:
            _check_path(args.config, where)
        try:  # every override names a config key of the right type
            load_config(ROOT / args.config if args.config else None, overrides)
        except ConfigError as exc:
            raise AssertionError(f"{where}: `gflowgr {' '.join(argv)}`: {exc}")


def _check_path(word: str, where: str) -> None:
    path = word.split("=", 1)[-1]
    first = Path(path).parts[0] if Path(path).parts else ""
    if first in REPO_DIRS and not any(c in path for c in "*<>{}$"):
        assert (ROOT / path).exists(), f"{where}: names {path}, which is not in the repository"


def _check_script(script: str, options: list[str], where: str) -> None:
    text = Path(script).read_text(encoding="utf-8")
    for opt in options:
        name = opt.split("=", 1)[0]
        if name.startswith("--") and name not in ("--help",):
            assert f'"{name}"' in text or f"'{name}'" in text, f"{where}: {script} takes no option {name}"


def check_command(cmd: list[str], where: str) -> None:
    cmd = _strip_env(cmd)
    if not cmd:
        return
    for word in cmd:
        _check_path(word, where)
    prog, rest = cmd[0], cmd[1:]
    if prog == "gflowgr":
        _check_gflowgr(rest, where)
    elif prog in ("python", "python3", "torchrun"):
        if prog == "torchrun":  # torchrun [its options] -m MODULE args | torchrun [its options] FILE args
            i = next((k for k, w in enumerate(rest) if w == "-m" or w.endswith(".py")), None)
            assert i is not None, f"{where}: torchrun without a module or script"
            rest = rest[i:]
        if rest[:1] == ["-m"]:
            module, args = rest[1], rest[2:]
            if module == "gflowgr_core.cli":
                _check_gflowgr(args, where)
                return
            if module in ("pip", "pytest"):
                return
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.origin, f"{where}: no module {module}"
            _check_script(spec.origin, args, where)
        elif rest and rest[0].endswith(".py"):
            assert (ROOT / rest[0]).is_file(), f"{where}: no script {rest[0]}"
            _check_script(str(ROOT / rest[0]), rest[1:], where)
    elif prog == "bash" and rest and rest[0].endswith(".sh"):
        assert (ROOT / rest[0]).is_file(), f"{where}: no script {rest[0]}"


@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_bash_block_parses(block: Block):
    if block.skip is not None:
        pytest.skip(f"doc-test: skip ({block.skip})")
    for cmd in commands(block.code):
        check_command(cmd, block.id)


# ------------------------------------------------------------------------------------------ bookkeeping
def test_every_skip_marker_precedes_a_code_block():
    """A marker that does not sit right before a python or bash block would skip nothing (or something
    unintended)."""
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if not line.strip().startswith("<!-- doc-test"):
                continue  # a marker is a line of its own (prose may quote one in backticks)
            rel = f"{doc.relative_to(ROOT).as_posix()}:{n + 1}"
            assert SKIP.match(line.strip()), f"{rel}: malformed marker (expected <!-- doc-test: skip (reason) -->)"
            nxt = next((x for x in lines[n + 1:] if x.strip()), "")
            m = FENCE.match(nxt)
            assert m and m.group("lang").lower() in RUN + PARSE, f"{rel}: the marker is not followed by a code block"


def test_the_docs_have_runnable_code(capsys):
    """The counts, printed with ``-s``: blocks run, parsed and skipped per language."""
    run = [b for b in PYTHON if b.skip is None]
    parsed = [b for b in BASH if b.skip is None]
    skipped = [b for b in PYTHON + BASH if b.skip is not None]
    with capsys.disabled():
        print(f"\ndoc blocks: {len(run)} python run, {len(parsed)} bash parsed, {len(skipped)} skipped "
              f"({', '.join(f'{b.id}: {b.skip}' for b in skipped) or 'none'}), "
              f"{len(ALL) - len(PYTHON) - len(BASH)} not code")
    assert len(run) >= 7 and len(parsed) >= 15


def test_the_shared_data_path_is_one_folder():
    """README and docs prepare the datasets into the folders the configs read (``runs/data/NAME``)."""
    read = {re.search(r"^data: (\S+)", p.read_text(), re.M).group(1) for p in ROOT.glob("configs/*/*.yaml")
            if re.search(r"^data: (\S+)", p.read_text(), re.M)}
    for b in BASH:
        for cmd in commands(b.code):
            cmd = _strip_env(cmd)
            if cmd[:2] == ["gflowgr", "prepare"] and "--format" in cmd and cmd[cmd.index("--format") + 1] in (
                    "letter", "p5"):
                out = cmd[cmd.index("--out") + 1]
                assert out.startswith("runs/data/"), f"{b.id}: prepares into {out}; the configs read {sorted(read)}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-``/``_`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def test_links_between_the_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, with ``#anchor``, a
    heading of that file."""
    bad = []
    for doc in DOCS:
        text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            rel = doc.relative_to(ROOT).as_posix()
            if not path.exists():
                bad.append(f"{rel}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                bad.append(f"{rel}: {target} (no such heading)")
    assert not bad, bad


def test_inline_gflowgr_commands_parse():
    """A `gflowgr SUBCOMMAND ARGS` command line written inline in the prose names a subcommand and options the
    CLI has, with every required option (placeholders such as FILE or DIR stand for values)."""
    from gflowgr_core.cli import build_parser

    bad = []
    for doc in DOCS:
        text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text(encoding="utf-8"))
        for span in re.findall(r"`(gflowgr [^`]+)`", text.replace("\n", " ")):
            if len(span.split()) < 3:
                continue  # the subcommand named in a sentence (`gflowgr eval`), not a command line
            try:
                build_parser().parse_args(shlex.split(span)[1:])
            except SystemExit as exc:
                if exc.code:
                    bad.append(f"{doc.relative_to(ROOT).as_posix()}: `{span}`")
    assert not bad, bad
