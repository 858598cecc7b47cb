"""The CM-softmax reward (``cm_norm="softmax"``): the collaborative model's catalogue distribution at a
temperature, scaled so each user's best item gets 1, as the reward a balance objective distils."""
from __future__ import annotations

import math

import pytest
import torch

from gflowgr_core.collaborative import CMScorer
from gflowgr_core.reward import Reward, RewardConfig, cm_component
from gflowgr_core.train.config import ConfigError, load_config


def _scorer(rows: int = 7, items: int = 50, seed: int = 0) -> CMScorer:
    g = torch.Generator().manual_seed(seed)
    return CMScorer(torch.randn(rows, 8, generator=g), torch.randn(items, 8, generator=g))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_softmax_norm_is_the_cm_softmax_over_the_catalogue_up_to_a_row_constant(temperature):
    scorer = _scorer()
    rows = torch.tensor([0, 3, 6, 3])
    items = torch.randint(0, scorer.num_items, (4, 9), generator=torch.Generator().manual_seed(1))
    got = scorer.normalized(rows, items, method="softmax", temperature=temperature)
    full = scorer.full_scores(rows)
    softmax = torch.softmax(full / temperature, dim=1)
    want = softmax.gather(1, items) / softmax.max(1, keepdim=True).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert float(got.max()) <= 1.0 and float(got.min()) > 0.0
    best = full.argmax(1, keepdim=True)
    torch.testing.assert_close(scorer.normalized(rows, best, method="softmax", temperature=temperature),
                               torch.ones(4, 1))


def test_pure_teacher_reward_ratios_follow_the_cm():
    """With r_cm alone (beta 1, eps far below the values), R(x)/R(y) is the CM's softmax ratio, so the balance
    objectives' fixed point P_F(x|U) ∝ R(x) is the teacher's distribution."""
    scorer = _scorer()
    config = RewardConfig(use_a=False, use_sim=False, cm_norm="softmax", cm_temperature=2.0, eps=1e-30)
    rows = torch.tensor([1, 2])
    candidates = torch.tensor([[0, 5, 9], [3, 4, 8]])
    cm = cm_component(config, scorer, rows, candidates)
    codes = torch.randint(0, 4, (scorer.num_items, 3), generator=torch.Generator().manual_seed(2))
    log_r, _ = Reward(config, base_levels=3)(candidates[:, 0], candidates, cm, codes)
    scores = scorer.score(rows, candidates)
    torch.testing.assert_close(log_r - log_r[:, :1], (scores - scores[:, :1]) / 2.0, rtol=1e-5, atol=1e-5)


def test_temperature_is_validated_at_load():
    with pytest.raises(ConfigError, match="cm_temperature"):
        load_config(None, ["data=x", "gfn.reward.cm_norm=softmax", "gfn.reward.cm_temperature=0"])
    with pytest.raises(ValueError, match="temperature"):
        _scorer().normalized(torch.tensor([0]), torch.tensor([[1]]), method="softmax", temperature=-1.0)
    cfg = load_config(None, ["data=x", "gfn.reward.cm_norm=softmax", "gfn.reward.cm_temperature=0.5"])
    assert cfg.gfn.reward.cm_norm == "softmax" and math.isclose(cfg.gfn.reward.cm_temperature, 0.5)
