"""Exact resume: a run stopped mid-epoch (stop flag or a real SIGTERM) and resumed from ``out/last/`` ends
with bitwise the same weights, optimiser state, logs and validation history as an uninterrupted run; an
interrupted checkpoint save never loses the previous ``last/``; runs are repeatable for a seed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gflowgr_core.data.prepared import PreparedData, prepare
from gflowgr_core.train import checkpoint as ckpt
from gflowgr_core.train.checkpoint import (TRAINER_STATE_FILE, CheckpointError, is_complete, load_extra,
                                           load_policy, recover_checkpoint)
from gflowgr_core.train.config import ConfigError, load_config
from gflowgr_core.train.signals import StopRequest
from gflowgr_core.train.trainer import LoopState, Trainer

REPO = Path(__file__).resolve().parents[1]

# 48 training examples in batches of 8: 6 steps per epoch, 2 epochs.
RUN = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
       "model.flow_hidden=32", "batch_size=8", "max_train_examples=48", "epochs=2", "warmup_steps=2", "lr=3e-3",
       "log_every=1", "valid_max_users=8", "eval_beams=4", "eval_batch_size=64", "save_every_steps=0",
       "patience=5", "handle_signals=false"]
CM = ["cm.dim=16", "cm.num_blocks=1", "cm.max_epochs=1", "cm.progress=false", "cm.verbose=false",
      "gfn.sampler=cm_curriculum", "gfn.curriculum_pool=10", "gfn.curriculum_random=5", "gfn.n_aug=2"]


@pytest.fixture(scope="module")
def beauty(tmp_path_factory, beauty_tiny) -> tuple[Path, PreparedData]:
    out = tmp_path_factory.mktemp("beauty40")
    return out, prepare("letter", beauty_tiny, out, max_users=40)


def _config(data_dir: Path, out: Path, *extra: str):
    return load_config(None, [f"data={data_dir}", f"out={out}", *RUN, *extra])


def _stop_at(trainer: Trainer, step: int) -> Trainer:
    """Raise the trainer's stop flag once optimisation step ``step`` has run (as a SIGTERM handler would)."""
    original = trainer.train_step

    def train_step(index):
        logs = original(index)
        if trainer.step == step:
            trainer.request_stop("test stop")
        return logs
    trainer.train_step = train_step
    return trainer


def _step_losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _eval_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r["eval"].items() if k != "epoch_seconds"} for r in records if "eval" in r]


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    differing = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differing, f"parameters differ after resume: {differing[:5]}"
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert oa.keys() == ob.keys()
    for k in oa:
        for name in oa[k]:
            assert torch.equal(oa[k][name], ob[k][name]), f"optimizer state {k}/{name} differs"
    assert a.step == b.step
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def _interrupted_then_resumed(cfg_args: tuple, data, stop_step: int, out: Path) -> tuple[Trainer, dict]:
    data_dir, prepared = data
    first = _stop_at(Trainer(_config(data_dir, out, *cfg_args), prepared), stop_step)
    summary = first.fit()
    assert summary["status"] == "interrupted" and summary["steps"] == stop_step, summary
    assert is_complete(out / "last") and not (out / "result.json").exists()
    state = load_extra(out / "last", TRAINER_STATE_FILE)
    assert state["step"] == stop_step
    resumed = Trainer(_config(data_dir, out, *cfg_args, "resume=true"), prepared)
    result = resumed.fit()
    assert result["status"] == "finished"
    return resumed, result


@pytest.fixture(scope="module")
def sft_reference(beauty, tmp_path_factory) -> tuple[Trainer, dict, Path]:
    data_dir, prepared = beauty
    out = tmp_path_factory.mktemp("sft_full")
    trainer = Trainer(_config(data_dir, out, "stage=sft"), prepared)
    result = trainer.fit()
    assert result["status"] == "finished" and result["steps"] == 12
    return trainer, result, out


def test_sft_resume_mid_epoch_is_exact(beauty, sft_reference, tmp_path):
    reference, ref_result, ref_out = sft_reference
    # Step 8 is batch 2 of epoch 2: the resumed run needs the epoch's permutation, the position in it and
    # the validation/early-stopping state of epoch 1.
    resumed, result = _interrupted_then_resumed(("stage=sft",), beauty, 8, tmp_path)
    _assert_same_state(reference, resumed)
    assert _step_losses(tmp_path) == _step_losses(ref_out)  # the log continues without gaps or repeats
    assert [s for s, _ in _step_losses(tmp_path)] == list(range(1, 13))
    assert _eval_records(tmp_path) == _eval_records(ref_out)
    assert result["best_epoch"] == ref_result["best_epoch"] and result["test"] == ref_result["test"]


def test_gflowgr_curriculum_resume_is_exact(beauty, sft_reference, tmp_path):
    data_dir, prepared = beauty
    args = ("stage=gflowgr", f"init_checkpoint={sft_reference[1]['checkpoint']}", *CM)
    reference = Trainer(_config(data_dir, tmp_path / "full", *args), prepared)
    reference.fit()
    # Step 3 is mid epoch 1; the curriculum sampler's progress and the generator drive the augmentations.
    resumed, _ = _interrupted_then_resumed(args, beauty, 3, tmp_path / "split")
    _assert_same_state(reference, resumed)
    assert resumed.sampler.state_dict() == reference.sampler.state_dict()
    assert _step_losses(tmp_path / "split") == _step_losses(tmp_path / "full")
    assert _eval_records(tmp_path / "split") == _eval_records(tmp_path / "full")


def test_sigterm_subprocess_then_resume(beauty, sft_reference, tmp_path):
    """A real SIGTERM to ``gflowgr train``: clean exit 0, a resumable ``last/``, then an exact resume."""
    reference, _, ref_out = sft_reference
    data_dir, prepared = beauty
    args = [f"data={data_dir}", f"out={tmp_path}", *RUN, "stage=sft", "handle_signals=true"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "gflowgr_core.cli", "train", "--json", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    log_file = tmp_path / "log.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log_file.exists() and any('"loss"' in line for line in log_file.read_text().splitlines()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be signalled: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "interrupted" and summary["reason"] == "SIGTERM", summary
    assert "resume=true" in stderr
    assert is_complete(tmp_path / "last")
    stopped_at = summary["steps"]
    assert 1 <= stopped_at <= 12
    resumed = Trainer(load_config(None, [*args, "resume=true", "handle_signals=false"]), prepared)
    assert resumed.fit()["status"] == "finished"
    _assert_same_state(reference, resumed)
    assert _step_losses(tmp_path) == _step_losses(ref_out)


def test_periodic_save_and_crash_during_save(beauty, tmp_path, monkeypatch):
    """``save_every_steps`` keeps ``last/`` current; a save that dies part-way leaves the previous one."""
    data_dir, prepared = beauty
    trainer = _stop_at(Trainer(_config(data_dir, tmp_path, "stage=sft", "save_every_steps=2"), prepared), 5)
    assert trainer.fit()["status"] == "interrupted"
    saved_weights = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    last = tmp_path / "last"
    assert load_extra(last, TRAINER_STATE_FILE)["step"] == 5

    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        if Path(f).name == TRAINER_STATE_FILE:
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    trainer.train_step(torch.arange(8))
    with pytest.raises(OSError, match="simulated"):
        trainer.save_last(LoopState(), last)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert (tmp_path / "last.tmp").exists() and not is_complete(tmp_path / "last.tmp")
    assert load_extra(last, TRAINER_STATE_FILE)["step"] == 5   # the previous checkpoint is intact
    policy = load_policy(last)                                  # ... and the leftover is cleaned up
    assert not (tmp_path / "last.tmp").exists()
    assert all(torch.equal(policy.state_dict()[k], saved_weights[k]) for k in saved_weights)

    # Killed between the two renames: last/ moved to last.old, the complete new copy still last.tmp.
    last.rename(tmp_path / "last.old")
    trainer.save_last(LoopState(), tmp_path / "newer")
    (tmp_path / "newer").rename(tmp_path / "last.tmp")
    message = recover_checkpoint(last)
    assert message and "promoted" in message
    assert load_extra(last, TRAINER_STATE_FILE)["step"] == 6
    assert not (tmp_path / "last.old").exists() and not (tmp_path / "last.tmp").exists()

    # Killed between the renames with no complete .tmp: the .old copy is restored.
    last.rename(tmp_path / "last.old")
    (tmp_path / "last.tmp").mkdir()
    assert "restored" in recover_checkpoint(last)
    assert load_extra(last, TRAINER_STATE_FILE)["step"] == 6


def test_resume_errors_are_explicit(beauty, tmp_path):
    data_dir, prepared = beauty
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(_config(data_dir, tmp_path, "stage=sft", "resume=true"), prepared).fit()
    trainer = _stop_at(Trainer(_config(data_dir, tmp_path, "stage=sft"), prepared), 2)
    assert trainer.fit()["status"] == "interrupted"
    with pytest.raises(ConfigError, match=r"lr: 0\.003 -> 0\.01"):
        Trainer(_config(data_dir, tmp_path, "stage=sft", "resume=true", "lr=0.01"), prepared).fit()


def test_same_seed_same_losses_other_seed_differs(beauty, tmp_path):
    data_dir, prepared = beauty
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        Trainer(_config(data_dir, tmp_path / name, "stage=sft", "max_steps=4", f"seed={seed}"), prepared).fit()
    a, b, c = (_step_losses(tmp_path / name) for name in "abc")
    assert len(a) == 4 and a == b
    assert [loss for _, loss in c] != [loss for _, loss in a]


def test_stop_request_defers_the_first_signal_only():
    # A process started in the background inherits SIGINT ignored: start from Python's own handler so the
    # second signal has a handler that raises.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_deferral()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _check_deferral():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert stop.reason == "SIGINT"  # deferred: training goes on to the step boundary
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second one is not deferred
    assert signal.getsignal(signal.SIGINT) is before
    with StopRequest(install=False) as stop:
        assert signal.getsignal(signal.SIGINT) is before
        stop.request("by hand")
        stop.request("later")
        assert stop.reason == "by hand"


def test_resume_of_a_run_stopped_before_its_first_log_line(beauty, tmp_path):
    """A stop before log_every steps leaves no log.jsonl: resuming must not need one."""
    resumed, result = _interrupted_then_resumed(("stage=sft", "log_every=1000"), beauty, 1, tmp_path / "run")
    assert result["steps"] == resumed.step and resumed.step > 1


def test_resume_of_a_run_saved_before_a_config_key_existed(beauty, tmp_path):
    """A key added to the config later reads as its default in an older checkpoint: such a run resumes, and
    a real change of that key is still refused."""
    data_dir, prepared = beauty
    trainer = _stop_at(Trainer(_config(data_dir, tmp_path, "stage=sft"), prepared), 2)
    assert trainer.fit()["status"] == "interrupted"
    state_file = tmp_path / "last" / TRAINER_STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["config"]["gfn"]["reward"]["cm_temperature"]  # as written before the key existed
    torch.save(state, state_file)
    with pytest.raises(ConfigError, match=r"gfn\.reward\.cm_temperature: 1\.0 -> 0\.5"):
        Trainer(_config(data_dir, tmp_path, "stage=sft", "resume=true", "gfn.reward.cm_temperature=0.5"),
                prepared).fit()
    assert Trainer(_config(data_dir, tmp_path, "stage=sft", "resume=true"), prepared).fit()["status"] == "finished"


def test_sft_with_hidden_dropout_trains_differently_and_resumes_exactly(beauty, sft_reference, tmp_path):
    # Dropout draws from the global RNG: the resumed run must restore it to reproduce the masks.
    _, _, plain_out = sft_reference
    data_dir, prepared = beauty
    full = Trainer(_config(data_dir, tmp_path / "full", "stage=sft", "model.hidden_dropout=0.2"), prepared)
    full.fit()
    resumed, _ = _interrupted_then_resumed(("stage=sft", "model.hidden_dropout=0.2"), beauty, 8, tmp_path / "cut")
    _assert_same_state(full, resumed)
    assert _step_losses(tmp_path / "cut") == _step_losses(tmp_path / "full")
    # Step 1 has the same weights and batch as the run without dropout: only the masks change its loss.
    assert _step_losses(tmp_path / "full")[0] != _step_losses(plain_out)[0]


def test_best_checkpoint_keeps_the_per_user_validation_ranks_of_its_epoch(sft_reference):
    _, result, out = sft_reference
    saved = torch.load(out / "best" / "valid_ranks.pt")
    assert saved["split"] == "valid" and saved["max_users"] == 8
    best = next(r["valid"] for r in result["history"] if r["epoch"] == result["best_epoch"])
    for key, prefix in (("headline", ""), ("renorm/", "renorm/")):
        rank = saved["ranks"][key].long()
        assert rank.dtype == torch.long and rank.shape == (8,)
        hit = (rank >= 0) & (rank < 10)
        ndcg = torch.where(hit, 1 / torch.log2(rank.clamp(min=0).double() + 2), torch.zeros((), dtype=torch.double))
        assert float(hit.double().mean()) == pytest.approx(best[prefix + "recall@10"], abs=1e-6)
        assert float(ndcg.mean()) == pytest.approx(best[prefix + "ndcg@10"], abs=1e-6)


def test_a_finished_run_that_never_read_test_reads_it_once_when_resumed(beauty, sft_reference, tmp_path):
    """A tuning run (``evaluate_test=false``) resumed with ``evaluate_test=true`` trains nothing more and
    decodes test from its best checkpoint: the same result as a run that read test from the start."""
    import shutil

    data_dir, prepared = beauty
    _, ref_result, ref_out = sft_reference
    tuned = tmp_path / "tuned"
    result = Trainer(_config(data_dir, tuned, "stage=sft", "evaluate_test=false"), prepared).fit()
    assert result["test"] is None and not (tuned / "test_ranks.pt").exists()
    grid = tmp_path / "grid"
    shutil.copytree(tuned, grid, ignore=shutil.ignore_patterns("result.json"))
    resumed = Trainer(_config(data_dir, grid, "stage=sft", "resume=true"), prepared)
    again = resumed.fit()
    assert again["steps"] == ref_result["steps"] and again["history"] == result["history"]
    assert again["test"] == ref_result["test"]
    assert torch.equal(torch.load(grid / "test_ranks.pt")["ranks"]["headline"],
                       torch.load(ref_out / "test_ranks.pt")["ranks"]["headline"])
    assert _step_losses(grid) == _step_losses(ref_out)  # no step ran again
