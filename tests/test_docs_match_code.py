"""Statements of docs/*.md that name files, settings or folders of the code agree with the code."""
import re
from pathlib import Path

import pytest
import yaml

from gflowgr_core import collaborative

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))


def test_every_config_file_named_in_the_docs_exists():
    named = {(doc.name, m) for doc in DOCS for m in re.findall(r"configs/[\w./-]+\.yaml", doc.read_text())}
    assert named, "the docs name config files"
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (REPO / path).is_file())
    assert not missing, missing


def test_reproduce_table_quotes_the_shipped_lambda_gfn():
    text = (REPO / "docs" / "reproduce.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `gflowgr_tb.yaml` |"))
    quoted = float(re.search(r"CE \+ ([\d.]+) · TB", row).group(1))
    # The table describes configs/<dataset>/; the Beauty CPU protocol's YAMLs hold their own setting, tuned on
    # Beauty's validation split (tests/test_configs.py checks it against benchmarks/results/tune_beauty_cpu.json).
    shipped = {yaml.safe_load(p.read_text())["gfn"]["lambda_gfn"] for p in REPO.glob("configs/*/gflowgr_*.yaml")
               if p.parent.name != "beauty_cpu"}
    assert shipped == {quoted}, (quoted, shipped)
    assert f"λ_gfn = {quoted:g}" in row


@pytest.mark.parametrize("doc", ["reproduce.md", "training.md"])
def test_the_cm_cache_folder_in_the_docs_is_the_code_s(doc, monkeypatch, tmp_path):
    text = (REPO / "docs" / doc).read_text()
    assert "<data>/cm" not in text and "beside the\n  prepared data" not in text
    assert f"${collaborative.CACHE_ENV}/cm/" in text and "~/.cache/gflowgr/cm/" in text
    monkeypatch.setenv(collaborative.CACHE_ENV, str(tmp_path))
    assert collaborative.default_cache_dir() == tmp_path / "cm"
    monkeypatch.delenv(collaborative.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert collaborative.default_cache_dir() == Path.home() / ".cache" / "gflowgr" / "cm"
