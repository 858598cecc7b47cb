"""Batch jobs are not silent: ``gflowgr train`` under a pipe (no terminal, as under nohup or tee) prints a start
banner, one line every ``log_every`` steps and a short end table with the files it wrote, without transformers'
per-save bars; the epoch's progress bar counts only the steps the run will take; ``gflowgr eval --out`` writes
metrics that name what they measure; the collaborative model (SASRec) logs one line per epoch by default."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from gflowgr_core.cli import main
from gflowgr_core.collaborative import SASRecConfig, train_sasrec
from gflowgr_core.data.prepared import prepare
from gflowgr_core.train import trainer as trainer_module
from gflowgr_core.train.checkpoint import load_policy, save_policy
from gflowgr_core.train.config import load_config
from gflowgr_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

# 48 training examples in batches of 8: 6 steps per epoch.
RUN = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
       "model.flow_hidden=32", "batch_size=8", "max_train_examples=48", "warmup_steps=2", "lr=3e-3",
       "log_every=2", "valid_max_users=8", "eval_beams=4", "eval_batch_size=64", "save_every_steps=0",
       "handle_signals=false", "stage=sft"]
TRANSFORMERS_BARS = ("Writing model shards", "Loading weights")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, beauty_tiny) -> Path:
    out = tmp_path_factory.mktemp("beauty16")
    prepare("letter", beauty_tiny, out, max_users=16)
    return out


@pytest.fixture(scope="module")
def piped_run(data_dir, tmp_path_factory):
    """``python -m gflowgr_core.cli train`` with stdout and stderr pipes (no terminal): 2 epochs of 6 steps."""
    out = tmp_path_factory.mktemp("run")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gflowgr_core.cli", "train", f"data={data_dir}", f"out={out}",
                           *RUN, "epochs=2"], cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout, proc.stderr


def test_piped_train_prints_banner_periodic_lines_and_end_table(piped_run, data_dir):
    out, stdout, stderr = piped_run
    printed = stderr + stdout
    # The banner: what the run is about to do.
    assert "gflowgr train: stage sft, new run" in stderr
    assert "48 training examples" in stderr and "6 steps per epoch of 8 examples" in stderr
    assert "2 epoch(s) = 12 steps" in stderr
    assert re.search(r"model: [\d,]+ parameters \([\d,]+ trained\), from scratch", stderr)
    assert "device cpu" in stderr and re.search(r"backend auto \(available: torch", stderr)
    # One line every log_every=2 steps (and at each epoch's end, here the same steps), each with its numbers.
    lines = re.findall(r"sft step (\d+)/12 \(epoch (\d), batch \d/6\): loss [\d.]+, lr [\d.e+-]+, "
                       r"[\d,.]+ examples/s, ETA \w+", stderr)
    assert [int(step) for step, _ in lines] == [2, 4, 6, 8, 10, 12]
    assert [int(epoch) for _, epoch in lines] == [1, 1, 1, 2, 2, 2]
    # The end: a short table and the files written, not the JSON summary (that is result.json).
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "finished"
    assert not stdout.lstrip().startswith("{") and len(stdout.splitlines()) < 15
    assert f"sft: finished, 2 epoch(s), 12 steps" in stdout
    assert f"best validation epoch {result['best_epoch']}" in stdout
    test_line = next(line for line in stdout.splitlines() if line.startswith("test "))
    assert f"{result['test']['recall@10']:.4f}" in test_line and f"{result['test']['ndcg@10']:.4f}" in test_line
    assert re.search(rf"valid \(epoch {result['best_epoch']}\)", stdout)
    for name in ("result.json", "log.jsonl", "config.yaml", "best/", "last/", "test_ranks.pt"):
        assert f"{out}/{name}" in stdout, name
    assert set(result["files"]) == {f"{out}/{n}" for n in ("result.json", "log.jsonl", "config.yaml", "best/",
                                                           "last/", "test_ranks.pt")}
    # No progress bars in a pipe: neither ours nor transformers' per-save/per-load ones.
    for bar in TRANSFORMERS_BARS:
        assert bar not in printed
    assert "\r" not in printed and "it/s]" not in printed


def test_eval_out_writes_metrics_naming_split_checkpoint_and_data(piped_run, data_dir, tmp_path, capsys):
    out = piped_run[0]
    target = tmp_path / "metrics" / "valid.json"
    assert main(["eval", "--checkpoint", str(out / "best"), "--split", "valid", "--beams", "4",
                 "--out", str(target)]) == 0
    report = json.loads(target.read_text())
    assert report["split"] == "valid" and report["beams"] == 4
    assert report["checkpoint"] == str((out / "best").resolve())
    assert report["data"] == str(data_dir.resolve())  # read from the checkpoint's config.yaml
    assert report["checkpoint_epoch"] == json.loads((out / "result.json").read_text())["best_epoch"]
    assert report["users"] == 16 and report["metrics"]["num_examples"] == 16
    assert {"recall@10", "ndcg@10", "renorm/recall@10", "coverage@10"} <= set(report["metrics"])
    printed = capsys.readouterr()
    assert f"metrics written to {target}" in printed.out and "headline" in printed.out
    assert f"{report['metrics']['recall@10']:.4f}" in printed.out
    for bar in TRANSFORMERS_BARS:
        assert bar not in printed.err


def test_progress_bar_total_is_the_steps_the_run_takes(data_dir, tmp_path, monkeypatch, caplog):
    """max_steps=7 with 6 steps per epoch: bars of 6 and 1 steps; log lines at steps 2, 4, 6 and 7."""
    totals = []
    real_tqdm = trainer_module.tqdm

    def recording_tqdm(*args, **kwargs):
        totals.append(kwargs["total"])
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "tqdm", recording_tqdm)
    caplog.set_level(logging.INFO, logger="gflowgr")
    config = load_config(None, [f"data={data_dir}", f"out={tmp_path}", *RUN, "max_steps=7", "evaluate_test=false"])
    result = Trainer(config).fit()
    assert result["steps"] == 7 and totals == [6, 1]
    steps = [int(m) for m in re.findall(r"sft step (\d+)/7 ", caplog.text)]
    assert steps == [2, 4, 6, 7]  # every 2 steps, the epoch's end, and the run's last step
    assert "max_steps = 7 steps" in caplog.text
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert logged == [2, 4, 6, 7]


def test_checkpoint_save_and_load_are_quiet_and_restore_transformers_settings(piped_run, tmp_path, capfd):
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_info()
    try:
        policy = load_policy(piped_run[0] / "best")
        save_policy(policy, tmp_path / "copy")
        err = capfd.readouterr().err
        for bar in TRANSFORMERS_BARS:
            assert bar not in err
        # The user's own settings hold again outside the checkpoint code.
        assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity_warning()


def test_sasrec_logs_one_line_per_epoch_even_when_not_verbose(data_dir, caplog, capsys):
    from gflowgr_core.data.prepared import PreparedData

    split = PreparedData.load(data_dir).split
    caplog.set_level(logging.INFO, logger="gflowgr")
    config = SASRecConfig(dim=16, num_blocks=1, max_epochs=2, patience=5, progress=False, verbose=False)
    train_sasrec(split, config)
    epochs = re.findall(r"SASRec epoch (\d)/2: loss [\d.]+, valid ndcg@10 [\d.]+ \(best [\d.]+ at epoch \d\), "
                        r"[\d.]+s", caplog.text)
    assert epochs == ["1", "2"] and "SASRec best epoch" in caplog.text
    assert capsys.readouterr().out == ""  # logged, not printed


def test_sasrec_verbose_prints_when_logging_would_not_show_it(data_dir, caplog, capsys):
    from gflowgr_core.data.prepared import PreparedData

    split = PreparedData.load(data_dir).split
    caplog.set_level(logging.WARNING, logger="gflowgr")  # as in a notebook without logging set up
    train_sasrec(split, SASRecConfig(dim=16, num_blocks=1, max_epochs=1, progress=False, verbose=True))
    printed = capsys.readouterr().out
    assert "SASRec epoch 1/1: loss" in printed and "SASRec best epoch 1" in printed
    assert "SASRec epoch" not in caplog.text
