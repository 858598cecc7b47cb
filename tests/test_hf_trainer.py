"""Hugging Face Trainer interop: GFlowGRConfig / GFlowGRTrainer on the bundled Beauty slice (CPU, tiny model)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="transformers' Trainer needs accelerate (pip install accelerate)")

TINY = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
        "model.flow_hidden=16"]


@pytest.fixture(scope="module")
def beauty(tmp_path_factory, beauty_tiny):
    from gflowgr_core.data.prepared import prepare

    out = tmp_path_factory.mktemp("beauty120")
    return out, prepare("letter", beauty_tiny, out, max_users=120)


def _config(beauty, out, **kw):
    from gflowgr_core.hf_trainer import GFlowGRConfig

    data_dir, _ = beauty
    base = dict(output_dir=str(out), data_dir=str(data_dir), stage="sft", max_steps=6, per_device_train_batch_size=16,
                learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                report_to="none", use_cpu=True, eval_max_users=16, eval_beams=5, disable_tqdm=True,
                max_train_examples=16, gflowgr_overrides=list(TINY), seed=7)
    base.update(kw)
    return GFlowGRConfig(**base)


def _train_losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


@pytest.fixture(scope="module")
def sft_run(beauty, tmp_path_factory):
    from gflowgr_core.hf_trainer import GFlowGRTrainer

    out = tmp_path_factory.mktemp("hf_sft")
    trainer = GFlowGRTrainer(_config(beauty, out), beauty[1])
    trainer.train()
    trainer.save_model(str(out / "final"))
    return trainer, out


def test_sft_loss_finite_and_decreasing_on_fixed_batch(sft_run):
    trainer, _ = sft_run
    losses = _train_losses(trainer)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # 16 training rows and batch 16: every step sees the same batch, so the loss must go down.
    assert losses[-1] < losses[0], losses


def test_loss_is_the_library_loss(sft_run):
    trainer, _ = sft_run
    index = torch.arange(8)
    core_loss, core_logs = trainer.core.compute_loss(index)
    hf_loss = trainer.compute_loss(trainer.model, trainer.data_collator([{"index": i} for i in range(8)]))
    assert torch.equal(hf_loss, core_loss)
    assert trainer.last_logs["ce"] == core_logs["ce"]


def test_evaluate_reports_ranking_metrics(sft_run):
    trainer, _ = sft_run
    metrics = trainer.evaluate()
    for key in ("eval_recall@10", "eval_ndcg@10", "eval_coverage@10", "eval_num_examples"):
        assert key in metrics and math.isfinite(metrics[key])
    assert metrics["eval_num_examples"] == 16


def test_saved_model_is_a_policy_checkpoint(sft_run):
    from gflowgr_core.train.checkpoint import load_policy

    trainer, out = sft_run
    policy = load_policy(out / "final")
    for (name, a), b in zip(trainer.policy.state_dict().items(), policy.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu()), name
    assert (out / "final" / "config.yaml").is_file()


def test_gflowgr_stage_with_flow_lr_group_and_resume(beauty, sft_run, tmp_path):
    from gflowgr_core.hf_trainer import STATE_FILE, GFlowGRTrainer

    _, sft_out = sft_run
    kw = dict(stage="gflowgr", init_checkpoint=str(sft_out / "final"), gfn_sampler="random", n_aug=2, flow_lr=5e-2,
              save_strategy="steps", save_steps=3,
              gflowgr_overrides=[*TINY, "gfn.reward.use_cm=false"])
    trainer = GFlowGRTrainer(_config(beauty, tmp_path / "gfn", **kw), beauty[1])
    trainer.train()
    losses = _train_losses(trainer)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert all(math.isfinite(r["gfn"]) and "reward/R/mean" in r for r in rows)
    assert trainer.loss_backend == "torch"
    flow_ids = {id(p) for p in trainer.policy.flow_parameters()}
    flow_groups = [g for g in trainer.optimizer.param_groups if any(id(p) in flow_ids for p in g["params"])]
    # log Z (gfn.log_z_lr, default flow_lr) and log F (flow_lr) have a group each, holding flow heads only.
    assert len(flow_groups) == 2 and all(g["lr"] == pytest.approx(5e-2) for g in flow_groups)
    assert all(id(p) in flow_ids for g in flow_groups for p in g["params"])

    # Resume from the step-3 checkpoint: the exact module state comes back.
    ckpt = tmp_path / "gfn" / "checkpoint-3"
    assert (ckpt / STATE_FILE).is_file() and (ckpt / "policy.json").is_file()
    resumed = GFlowGRTrainer(_config(beauty, tmp_path / "gfn2", **kw), beauty[1])
    resumed._load_from_checkpoint(str(ckpt))
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)["model"]
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 6


def test_config_errors(beauty, tmp_path):
    from gflowgr_core.hf_trainer import GFlowGRConfig, GFlowGRTrainer
    from gflowgr_core.train.config import ConfigError

    with pytest.raises(ConfigError, match="data_dir is not set"):
        GFlowGRConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    bad = _config(beauty, tmp_path, gflowgr_overrides=["gfn.no_such_key=1"])
    with pytest.raises(ConfigError, match="unknown key 'no_such_key'"):
        GFlowGRTrainer(bad, beauty[1])
    with pytest.raises(ConfigError, match="starts from an SFT checkpoint"):
        _config(beauty, tmp_path, stage="gflowgr").to_train_config()
    with pytest.raises(ValueError, match="prompt_template needs a policy with a tokenizer"):
        GFlowGRTrainer(_config(beauty, tmp_path, prompt_template="x {history} y"), beauty[1])


def test_collator_and_dataset_errors():
    from gflowgr_core.hf_trainer import SplitIndexCollator, SplitIndexDataset

    collate = SplitIndexCollator(num_rows=10)
    assert collate([{"index": 3}, {"index": torch.tensor(4)}])["index"].tolist() == [3, 4]
    with pytest.raises(IndexError, match="batch feature 1: split row 10 is outside"):
        collate([{"index": 0}, {"index": 10}])
    with pytest.raises(ValueError, match="batch feature 0 .* expected a dict with key 'index'"):
        collate([{"idx": 0}])
    with pytest.raises(TypeError, match="batch feature 0: index 1.5 is not an integer"):
        collate([{"index": 1.5}])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(IndexError, match="split index entry 2 is -1"):
        SplitIndexDataset(torch.tensor([0, 1, -1]), 5)


def test_flow_warmup_follows_the_hugging_face_step(beauty, sft_run, tmp_path):
    """The stage reads Hugging Face's global step, so gfn.flow_warmup_steps ends under GFlowGRTrainer."""
    from gflowgr_core.hf_trainer import GFlowGRTrainer

    _, sft_out = sft_run
    args = _config(beauty, tmp_path, stage="gflowgr", init_checkpoint=str(sft_out / "final"), max_steps=4,
                   gfn_sampler="random", gflowgr_overrides=[*TINY, "gfn.flow_warmup_steps=2",
                                                           "gfn.reward.use_cm=false"])
    trainer = GFlowGRTrainer(args, beauty[1])
    seen = []
    loss = trainer.core.stage.loss

    def recording(ctx, policy, trajectories, step):
        seen.append(step)
        return loss(ctx, policy, trajectories, step)

    trainer.core.stage.loss = recording
    trainer.train()
    assert seen == [0, 1, 2, 3]


def _as_rank(config, rank: int):
    """The config as rank ``rank`` of a Hugging Face DDP run would see it (``process_index``)."""
    config.__class__ = type(f"Rank{rank}Config", (type(config),), {"process_index": property(lambda self: rank)})
    return config


def test_ddp_ranks_draw_their_own_augmentations(beauty, sft_run, tmp_path):
    """Every rank seeds its sampler's generator per rank: rank 0 keeps ``seed`` (a single process is unchanged),
    the others draw other augmentations for the same rows, also after resuming from a checkpoint."""
    from gflowgr_core.hf_trainer import GFlowGRTrainer

    _, sft_out = sft_run
    kw = dict(stage="gflowgr", init_checkpoint=str(sft_out / "final"), gfn_sampler="random", n_aug=3,
              gflowgr_overrides=[*TINY, "gfn.reward.use_cm=false"])
    rows = torch.arange(16)

    def draws(trainer):
        return torch.stack([trainer.core.draw_candidates(rows) for _ in range(3)])

    single = GFlowGRTrainer(_config(beauty, tmp_path / "single", **kw), beauty[1])
    ranks = [GFlowGRTrainer(_as_rank(_config(beauty, tmp_path / f"rank{r}", **kw), r), beauty[1]) for r in range(3)]
    assert [t.sampler_rank for t in ranks] == [0, 1, 2] and single.sampler_rank == 0
    got = [draws(t) for t in ranks]
    assert torch.equal(got[0], draws(single))
    for a in range(3):
        for b in range(a + 1, 3):
            same = (got[a] == got[b]).float().mean()
            assert same < 0.2, (a, b, float(same))  # random items of ~300: rare coincidences only

    # Resuming: the checkpoint holds rank 0's generator; rank 0 continues it exactly, the others draw apart.
    single._save(str(tmp_path / "ckpt"))  # rank 0 (the one that saves)
    expect = draws(single)
    for t in ranks:
        t._load_from_checkpoint(str(tmp_path / "ckpt"))
    resumed = [draws(t) for t in ranks]
    assert torch.equal(resumed[0], expect)
    assert (resumed[0] == resumed[1]).float().mean() < 0.2 and (resumed[1] == resumed[2]).float().mean() < 0.2
