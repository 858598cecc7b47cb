"""The whole method on the bundled Amazon Beauty slice (LETTER SIDs): SFT, GFlowGR with every sampler and
objective, the preference baselines, checkpoints and evaluation. CPU, a couple of minutes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gflowgr_core.data.prepared import PreparedData, prepare
from gflowgr_core.train.config import load_config
from gflowgr_core.evaluation import evaluate_checkpoint
from gflowgr_core.train.trainer import Trainer

TINY_MODEL = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
              "model.flow_hidden=32"]
FAST = ["batch_size=64", "eval_beams=10", "warmup_steps=1", "lr=3e-3", "log_every=1",
        "cm.dim=16", "cm.num_blocks=1", "cm.max_epochs=1", "cm.progress=false", "cm.verbose=false",
        "gfn.curriculum_pool=20", "gfn.curriculum_random=10"]


@pytest.fixture(scope="module")
def beauty_slice(tmp_path_factory, beauty_tiny) -> tuple[Path, PreparedData]:
    out = tmp_path_factory.mktemp("beauty300")
    data = prepare("letter", beauty_tiny, out, max_users=300)
    return out, data


@pytest.fixture(scope="module")
def sft_checkpoint(beauty_slice, tmp_path_factory) -> Path:
    data_dir, data = beauty_slice
    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(None, [f"data={data_dir}", f"out={out}", "stage=sft", "epochs=1",
                             "valid_max_users=40", *TINY_MODEL, *FAST])
    result = Trainer(cfg, data).fit()
    assert all(math.isfinite(v) for v in result["test"].values())
    return Path(result["checkpoint"])


def _losses_on_fixed_batch(trainer: Trainer, steps: int) -> list[float]:
    """Training steps on one fixed batch: the loss must go down as the model fits it."""
    index = torch.arange(48)
    return [trainer.train_step(index)["loss"] for _ in range(steps)]


def _assert_decreases(losses: list[float], what: str) -> None:
    assert all(math.isfinite(x) for x in losses), f"{what}: non-finite loss {losses}"
    assert losses[-1] < losses[0], f"{what}: loss did not decrease: {losses}"


def test_prepared_slice_counts(beauty_slice):
    _, data = beauty_slice
    seqs = 300
    assert data.stats["num_users"] == seqs
    assert data.stats["num_valid"] == data.stats["num_test"] == seqs
    assert data.stats["num_items"] == 2987  # the catalogue stays whole: the items of all 313 users
    reloaded = PreparedData.load(beauty_slice[0])
    assert torch.equal(reloaded.split.train.history, data.split.train.history)
    assert torch.equal(reloaded.trie.child_node, data.trie.child_node)


def test_sft_steps_decrease_loss(beauty_slice, tmp_path):
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=sft", *TINY_MODEL, *FAST])
    _assert_decreases(_losses_on_fixed_batch(Trainer(cfg, data), 6), "sft")


@pytest.mark.parametrize("sampler", ["logs", "random", "cm_curriculum", "onpolicy", "mixture"])
def test_gflowgr_each_sampler(beauty_slice, sft_checkpoint, tmp_path, sampler):
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=gflowgr",
                             f"init_checkpoint={sft_checkpoint}", f"gfn.sampler={sampler}", "gfn.objective=tb",
                             *TINY_MODEL, *FAST])
    trainer = Trainer(cfg, data)
    losses = _losses_on_fixed_batch(trainer, 6)
    _assert_decreases(losses, f"gflowgr/{sampler}")


@pytest.mark.parametrize("objective", ["tb", "db", "subtb"])
def test_gflowgr_each_objective(beauty_slice, sft_checkpoint, tmp_path, objective):
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=gflowgr",
                             f"init_checkpoint={sft_checkpoint}", "gfn.sampler=random",
                             f"gfn.objective={objective}", *TINY_MODEL, *FAST])
    _assert_decreases(_losses_on_fixed_batch(Trainer(cfg, data), 6), f"gflowgr/{objective}")


@pytest.mark.parametrize("stage,sampler", [("sft_continue", "random"), ("dpo", "random"), ("sdpo", "random"),
                                           ("dpo", "cm_curriculum"), ("sdpo", "cm_curriculum")])
def test_baselines_train(beauty_slice, sft_checkpoint, tmp_path, stage, sampler):
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", f"stage={stage}", f"pref.sampler={sampler}",
                             f"init_checkpoint={sft_checkpoint}", *TINY_MODEL, *FAST])
    _assert_decreases(_losses_on_fixed_batch(Trainer(cfg, data), 6), f"{stage}/{sampler}")


@pytest.mark.parametrize("mode", ["beam", "sample"])
def test_onpolicy_modes_draw_catalogue_items(beauty_slice, sft_checkpoint, tmp_path, mode):
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=gflowgr", "gfn.sampler=onpolicy",
                             f"gfn.onpolicy_mode={mode}", "gfn.onpolicy_temperature=1.5",
                             f"init_checkpoint={sft_checkpoint}", *TINY_MODEL, *FAST])
    trainer = Trainer(cfg, data)
    index = torch.arange(16)
    cands = trainer.draw_candidates(index)
    assert cands.shape == (16, trainer.cfg.gfn.n_aug)
    assert bool(((cands >= 0) & (cands < data.num_items)).all())
    positive_sid = trainer.item_codes[data.split.train.target[index]]
    assert not bool((trainer.item_codes[cands] == positive_sid[:, None]).all(-1).any())


def test_gflowgr_fit_and_evaluate(beauty_slice, sft_checkpoint, tmp_path):
    """A short full run: logs, a checkpoint, finite test metrics, and only catalogue items recommended."""
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=gflowgr",
                             f"init_checkpoint={sft_checkpoint}", "gfn.sampler=random", "max_steps=3",
                             "valid_max_users=30", *TINY_MODEL, *FAST])
    trainer = Trainer(cfg, data)
    result = trainer.fit()
    assert result["steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r and "loss" in r]
    assert steps and all({"ce", "gfn", "log_z", "lr", "reward/R/mean"} <= set(r) for r in steps)
    assert all(math.isfinite(v) for v in result["test"].values())

    from gflowgr_core.decoding.search import beam_search

    history = data.split.test.history[:40]
    items = beam_search(trainer.policy, data.trie, history, beams=10, topk=10).items
    valid = items[items >= 0]
    assert valid.numel() > 0 and int(valid.max()) < data.num_items
    assert bool(data.trie.contains(data.catalog.codes[valid]).all()), "an item outside the catalogue"

    metrics = evaluate_checkpoint(result["checkpoint"], split="valid", beams=10)
    assert all(math.isfinite(v) for v in metrics.values())


def test_training_step_out_of_memory_names_batch_size(beauty_slice, sft_checkpoint, tmp_path, monkeypatch):
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=gflowgr", "gfn.sampler=random",
                             f"init_checkpoint={sft_checkpoint}", *TINY_MODEL, *FAST])
    trainer = Trainer(cfg, data)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(trainer, "compute_loss", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r"batch size 48 \(4 trajectories per example\); try "
                                                     r"batch_size=24"):
        trainer.train_step(torch.arange(48))


def test_flow_warmup_keeps_balance_gradients_out_of_the_lm(beauty_slice, sft_checkpoint, tmp_path):
    """During gfn.flow_warmup_steps the LM's gradient is the CE gradient alone; the flow heads still learn."""
    data_dir, data = beauty_slice

    def grads(overrides):
        cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=gflowgr", "gfn.sampler=random",
                                 f"init_checkpoint={sft_checkpoint}", *TINY_MODEL, *FAST, *overrides])
        trainer = Trainer(cfg, data)
        index = torch.arange(16)
        cands = trainer.draw_candidates(index)
        loss, _ = trainer.compute_loss(index, candidates=cands)
        loss.backward()
        lm = {n: p.grad.clone() for n, p in trainer.policy.model.named_parameters() if p.grad is not None}
        head = trainer.policy.log_z_head.net[2].bias.grad  # the output layer starts at zero weight
        return lm, head

    ce_only, _ = grads(["gfn.lambda_gfn=0"])
    warm, warm_head = grads(["gfn.lambda_gfn=100", "gfn.flow_warmup_steps=5"])
    full, _ = grads(["gfn.lambda_gfn=100"])
    assert set(warm) == set(ce_only)
    for name in ce_only:
        torch.testing.assert_close(warm[name], ce_only[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.allclose(full[n], ce_only[n]) for n in ce_only), "the balance loss never reached the LM"
    assert warm_head is not None and warm_head.abs().sum() > 0, "log Z head got no gradient during warm-up"


def test_evaluate_test_false_never_reads_the_test_split(beauty_slice, sft_checkpoint, tmp_path, monkeypatch):
    """Tuning runs select on validation: with ``evaluate_test=false`` the test split is not decoded at all."""
    data_dir, data = beauty_slice
    cfg = load_config(None, [f"data={data_dir}", f"out={tmp_path}", "stage=sft_continue",
                             f"init_checkpoint={sft_checkpoint}", "max_steps=2", "valid_max_users=20",
                             "evaluate_test=false", *TINY_MODEL, *FAST])
    splits = []
    original = Trainer.evaluate

    def spy(self, split_name="valid", max_users=None, **kwargs):
        splits.append(split_name)
        return original(self, split_name, max_users, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    result = Trainer(cfg, data).fit()
    assert result["status"] == "finished" and result["test"] is None
    assert splits and set(splits) == {"valid"}
    assert json.loads((tmp_path / "result.json").read_text())["test"] is None
