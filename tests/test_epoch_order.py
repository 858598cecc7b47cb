"""Every method run with one seed sees the same batches at every step of every epoch: the epoch order has its
own generator (``Trainer.epoch_generator``), apart from the one the sampler draws its candidates from."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gflowgr_core.data.prepared import PreparedData, prepare
from gflowgr_core.train.config import load_config
from gflowgr_core.train.trainer import Trainer

# 40 training examples in batches of 8: 5 steps per epoch, 3 epochs.
RUN = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
       "model.flow_hidden=16", "batch_size=8", "max_train_examples=40", "epochs=3", "warmup_steps=1", "lr=1e-3",
       "log_every=5", "valid_max_users=4", "eval_beams=4", "eval_batch_size=64", "save_every_steps=0",
       "patience=10", "handle_signals=false", "evaluate_test=false", "device=cpu", "seed=7"]
METHODS = {
    "sft_continue": ["stage=sft"],
    "gflowgr_n1": ["stage=gflowgr", "gfn.sampler=random", "gfn.n_aug=1", "gfn.reward.use_cm=false"],
    "gflowgr_n3": ["stage=gflowgr", "gfn.sampler=random", "gfn.n_aug=3", "gfn.reward.use_cm=false"],
    "sdpo": ["stage=sdpo", "pref.sampler=random", "pref.n_neg=2"],
}


@pytest.fixture(scope="module")
def beauty(tmp_path_factory, beauty_tiny) -> tuple[Path, PreparedData, Path]:
    """The data and an (untrained) SFT checkpoint every stage-2 method starts from."""
    out = tmp_path_factory.mktemp("beauty_order")
    prepared = prepare("letter", beauty_tiny, out / "data", max_users=40)
    sft = Trainer(load_config(None, [f"data={out / 'data'}", f"out={out / 'sft'}", *RUN, "stage=sft"]), prepared)
    sft.policy.save(out / "sft_ckpt")
    return out / "data", prepared, out / "sft_ckpt"


def _trainer(beauty, out: Path, extra: list[str]) -> Trainer:
    data_dir, prepared, init = beauty
    return Trainer(load_config(None, [f"data={data_dir}", f"out={out}", f"init_checkpoint={init}", *RUN, *extra]),
                   prepared)


def _batches(beauty, out: Path, extra: list[str]) -> list[list[int]]:
    trainer = _trainer(beauty, out, extra)
    seen: list[list[int]] = []
    original = trainer.train_step

    def train_step(index):
        seen.append(index.tolist())
        return original(index)
    trainer.train_step = train_step
    assert trainer.fit()["status"] == "finished"
    return seen


def test_every_method_sees_the_same_batches_in_every_epoch(beauty, tmp_path):
    runs = {name: _batches(beauty, tmp_path / name, extra) for name, extra in METHODS.items()}
    reference = runs["sft_continue"]
    assert len(reference) == 15
    for name, batches in runs.items():
        assert batches == reference, name  # epochs 2 and 3 included, whatever the sampler drew
    epochs = [sorted(sum(reference[e * 5:(e + 1) * 5], [])) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2] and len(set(epochs[0])) == 40  # each epoch: every row once
    orders = [sum(reference[e * 5:(e + 1) * 5], []) for e in range(3)]
    assert orders[0] != orders[1] != orders[2] != orders[0]  # a fresh order per epoch


def test_epoch_generator_is_a_function_of_seed_and_epoch(beauty, tmp_path):
    trainer = _trainer(beauty, tmp_path, METHODS["gflowgr_n1"])
    first = trainer.epoch_order(trainer.epoch_generator(0))
    # Epoch 0 is drawn from the seed itself; drawing candidates in between changes nothing.
    assert torch.equal(first, trainer.epoch_order(torch.Generator().manual_seed(7)))
    trainer.draw_candidates(first[:8])
    assert torch.equal(trainer.epoch_order(trainer.epoch_generator(1)),
                       trainer.epoch_order(trainer.epoch_generator(1)))
    seeds = {trainer.epoch_generator(e).initial_seed() for e in range(50)}
    assert len(seeds) == 50 and all(0 <= s < 2 ** 63 for s in seeds)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        trainer.epoch_generator(-1)
