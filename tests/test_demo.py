"""`gflowgr demo --quick`: the README's main command, end to end on the embedded MovieLens-100K; an
interrupted demo says what finished, and running it again continues to the same numbers."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import signal
import warnings

import pytest

from gflowgr_core.cli import main
from gflowgr_core.data.loaders import load_ml100k
from gflowgr_core.demo import METHODS, TABLE_METRICS, demo_figure, run_demo
from gflowgr_core.train.checkpoint import is_complete
from gflowgr_core.train.trainer import Trainer

try:
    load_ml100k()
    HAS_ML100K = True
except FileNotFoundError:
    HAS_ML100K = False

pytestmark = pytest.mark.skipif(not HAS_ML100K,
                                reason="MovieLens-100K not found (pip install --no-deps recbole==1.2.1)")
ROWS = ["sft", *METHODS]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One uninterrupted ``gflowgr demo --quick`` (its own SASRec cache), with what it printed and warned."""
    root = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setenv("GFLOWGR_CACHE", str(root / "cache"))
        rc = main(["demo", "--out", str(root / "out"), "--quick"])
    root.joinpath("warnings.txt").write_text("\n".join(str(w.message) for w in caught))
    return root, rc, printed.getvalue()


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


def test_demo_quick_writes_table_metrics_and_plot(quick_demo):
    root, rc, printed = quick_demo
    out = root / "out"
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["reused"] == []
    assert [r["method"] for r in metrics["rows"]] == ROWS
    for row in metrics["rows"]:
        for prefix in ("", "renorm/"):
            values = [row[prefix + m] for m in TABLE_METRICS]
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), row
        assert row["epochs"] == 1 and row["steps"] >= 1
    # The control gets exactly GFlowGR's extra steps, on the same subset.
    runs = metrics["budget"]["runs"]
    assert runs["sft_continue"]["train_examples"] == runs["gflowgr_tb"]["train_examples"] == 512
    by_name = {r["method"]: r for r in metrics["rows"]}
    assert by_name["sft_continue"]["steps"] == by_name["gflowgr_tb"]["steps"] == runs["gflowgr_tb"]["steps_per_epoch"]
    assert "seeded random subset" in metrics["data"] and "beam 20" in metrics["eval"]
    assert metrics["budget"]["test_users"] == 200 and metrics["wall_seconds"] > 0
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "budget:" in printed and "seeded random subset" in printed
    assert "HF-style level log-probs (headline)" in printed and "renormalised over trie children" in printed
    assert all(name in printed for name in ROWS) and "recall@10" in printed
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert stats["num_users"] == 200 and stats["num_items"] == 1682
    # The quick runs' warm-up is sized to their few steps: no "warmup_steps=... is longer than the run".
    assert "warmup_steps" not in (root / "warnings.txt").read_text()
    assert all(row["seed"] == 42 for row in metrics["rows"])


def _fake_run(run_dir, steps: int, eval_steps: list[int]) -> None:
    """A run folder whose log.jsonl has a CE per step and a validation NDCG@10 at ``eval_steps``."""
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 5.0 - s / steps, "ce": 5.0 - s / steps}) for s in range(1, steps + 1)]
    lines += [json.dumps({"eval": {"step": s, "valid": {"ndcg@10": 0.01 * s}}}) for s in eval_steps]
    run_dir.joinpath("log.jsonl").write_text("\n".join(lines) + "\n")


def test_demo_figure_panels_labels_and_finished_seeds(tmp_path):
    """Stage 2 on its own axis from step 1, coverage on its own panel, every bar labelled with its value, and a
    title naming the seeds of the rows (the finished runs)."""
    _fake_run(tmp_path / "sft", 60, [30, 60])
    _fake_run(tmp_path / "sft_continue", 8, [8])
    _fake_run(tmp_path / "gflowgr_tb", 8, [8])
    values = {"recall@5": 0.031, "recall@10": 0.052, "ndcg@5": 0.021, "ndcg@10": 0.027, "coverage@10": 0.412}
    rows = [{"method": name, "seed": 7 if name == "gflowgr_tb" else 42,
             **{m: v + 0.001 * i for m, v in values.items()}} for i, name in enumerate(ROWS)]
    fig = demo_figure(tmp_path, rows, quick=True)
    ax_sft, ax_stage2, ax_bar, ax_cov, ax_valid = fig.axes
    stage2 = [line for line in ax_stage2.get_lines() if line.get_label().startswith(("continued", "GFlowGR"))]
    assert len(stage2) == 2 and all(min(line.get_xdata()) == 1 for line in stage2)  # their own steps
    assert all("valid NDCG@10 0.0800" in line.get_label() for line in stage2)
    assert max(max(line.get_xdata()) for line in ax_sft.get_lines()) == 60
    assert list(ax_valid.get_lines()[0].get_ydata()) == [0.3, 0.6]
    bar_texts = {t.get_text() for t in ax_bar.texts}
    assert {"0.0310", "0.0520", "0.0210", "0.0270", "0.0320", "0.0540"} <= bar_texts
    assert {t.get_text() for t in ax_cov.texts} == {"0.4120", "0.4130", "0.4140"}
    assert [t.get_text() for t in ax_cov.get_xticklabels()] == ["coverage@10"]
    assert "coverage@10" not in [t.get_text() for t in ax_bar.get_xticklabels()]
    title = fig._suptitle.get_text()
    assert "seeds 7, 42 finished" in title and "sft_continue" in title
    # A demo stopped after SFT would plot one row: its seed only.
    one = demo_figure(tmp_path, rows[:1])
    assert "seed 42 finished for sft" in one._suptitle.get_text()


def _copy_prepared_and_sft(quick_demo, dest):
    """A demo folder in which data and SFT are already done (as after an earlier call)."""
    root = quick_demo[0]
    shutil.copytree(root / "out" / "data", dest / "data")
    shutil.copytree(root / "out" / "sft", dest / "sft")


def test_sigterm_during_a_run_then_rerun_resumes_to_the_same_numbers(quick_demo, tmp_path, monkeypatch, capsys):
    root = quick_demo[0]
    monkeypatch.setenv("GFLOWGR_CACHE", str(root / "cache"))
    _copy_prepared_and_sft(quick_demo, tmp_path)
    original = Trainer.train_step

    def train_step(self, index):
        logs = original(self, index)
        if self.cfg.stage == "sft_continue" and self.step == 2:
            signal.raise_signal(signal.SIGTERM)  # a real signal, handled by the trainer at the step boundary
        return logs

    monkeypatch.setattr(Trainer, "train_step", train_step)
    handler_before = signal.getsignal(signal.SIGTERM)
    result = run_demo(tmp_path, device="cpu", quick=True)
    assert result["status"] == "interrupted" and result["finished"] == ["sft"]
    assert result["interrupted_run"] == "sft_continue" and result["reason"] == "SIGTERM"
    message = result["message"]
    assert "\n" not in message and "during sft_continue" in message and "finished: sft" in message
    assert f"gflowgr demo --out {tmp_path} --quick --device cpu" in message
    assert message in capsys.readouterr().err
    assert is_complete(tmp_path / "sft_continue" / "last") and not (tmp_path / "metrics.json").exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before

    monkeypatch.setattr(Trainer, "train_step", original)
    again = run_demo(tmp_path, device="cpu", quick=True)
    printed = capsys.readouterr().out
    assert again["status"] == "finished" and again["reused"] == ["sft"]
    assert "sft: finished earlier" in printed and "sft_continue: resuming from" in printed
    # An exact resume: every row as in the uninterrupted demo.
    reference = json.loads((root / "out" / "metrics.json").read_text())
    assert _without_timing(again["rows"]) == _without_timing(reference["rows"])


def test_signal_between_runs_stops_before_the_next_one(quick_demo, tmp_path, monkeypatch, capsys):
    """SIGTERM outside training (here during SFT's test evaluation): that run finishes, the next never starts."""
    root = quick_demo[0]
    monkeypatch.setenv("GFLOWGR_CACHE", str(root / "cache"))
    _copy_prepared_and_sft(quick_demo, tmp_path)
    (tmp_path / "sft" / "result.json").unlink()  # SFT trained but not yet tested: the call resumes it
    original = Trainer.evaluate

    def evaluate(self, split_name="valid", max_users=None, **kwargs):
        if split_name == "test":
            signal.raise_signal(signal.SIGTERM)
        return original(self, split_name, max_users, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    result = run_demo(tmp_path, device="cpu", quick=True)
    assert result["status"] == "interrupted" and result["finished"] == ["sft"]
    assert "before sft_continue started" in result["message"]
    assert (tmp_path / "sft" / "result.json").is_file() and not (tmp_path / "sft_continue").exists()
    assert result["message"] in capsys.readouterr().err
