"""Stage classes: the CE anchor of stage gflowgr uses likelihood_support (so the policy_support ablation does not
move it), each stage reports its trajectories per example, and the old key sft_support is still read."""
from __future__ import annotations

import pytest
import torch

from gflowgr_core.data.prepared import prepare
from gflowgr_core.train.checkpoint import save_policy
from gflowgr_core.train.config import ConfigError, load_config, rename_old_keys
from gflowgr_core.train.trainer import Trainer

TINY = ["model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=48",
        "model.flow_hidden=16", "gfn.reward.use_cm=false", "gfn.sampler=random", "pref.sampler=random"]


@pytest.fixture(scope="module")
def beauty(tmp_path_factory, beauty_tiny):
    out = tmp_path_factory.mktemp("beauty_stages")
    data = prepare("letter", beauty_tiny, out, max_users=80)
    start = tmp_path_factory.mktemp("start")
    sft = Trainer(load_config(None, [f"data={out}", f"out={start}", "stage=sft", *TINY]), data)
    save_policy(sft.policy, start / "init", sft.cfg)
    return out, data, start / "init"


def _trainer(beauty, tmp_path, *overrides):
    data_dir, data, init = beauty
    return Trainer(load_config(None, [f"data={data_dir}", f"out={tmp_path}", f"init_checkpoint={init}", *TINY,
                                      *overrides]), data)


@pytest.mark.parametrize("policy_support", ["trie", "level", "vocab"])
def test_gflowgr_ce_anchor_uses_likelihood_support(beauty, tmp_path, policy_support):
    rows = torch.arange(24)
    sft = _trainer(beauty, tmp_path / "sft", "stage=sft_continue", "likelihood_support=trie")
    gfn = _trainer(beauty, tmp_path / "gfn", "stage=gflowgr", "likelihood_support=trie",
                   f"gfn.policy_support={policy_support}")
    _, sft_logs = sft.compute_loss(rows)
    _, gfn_logs = gfn.compute_loss(rows)
    assert gfn_logs["ce"] == pytest.approx(sft_logs["ce"], rel=1e-5)


def test_trajectories_per_example(beauty, tmp_path):
    assert _trainer(beauty, tmp_path / "a", "stage=sft_continue").stage.trajectories == 1
    assert _trainer(beauty, tmp_path / "b", "stage=gflowgr", "gfn.n_aug=5").stage.trajectories == 6
    assert _trainer(beauty, tmp_path / "c", "stage=sdpo", "pref.n_neg=2").stage.trajectories == 3


def test_old_sft_support_key_is_read_as_likelihood_support():
    with pytest.warns(FutureWarning, match="'sft_support' is now 'likelihood_support'"):
        cfg = load_config(None, ["data=x", "sft_support=level"])
    assert cfg.likelihood_support == "level"
    with pytest.raises(ConfigError, match="both 'sft_support' and 'likelihood_support'"):
        load_config(None, ["data=x", "sft_support=level", "likelihood_support=trie"])
    # A run saved under the old key compares under the new one when it resumes.
    with pytest.warns(FutureWarning):
        assert rename_old_keys({"sft_support": "trie", "seed": 1}) == {"likelihood_support": "trie", "seed": 1}
