"""The trajectory type between sampler, reward, policy and losses: the positive first, flat views in the
objectives' layout, shape checks, and a sampler's and the reward's Trajectories entry points."""
from __future__ import annotations

import pytest
import torch

from gflowgr_core.reward import Reward, RewardConfig
from gflowgr_core.samplers import RandomSampler
from gflowgr_core.trajectories import ExampleBatch, Trajectories

CODES = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])


def _trajectories():
    history = torch.tensor([[-1, 0], [1, 2]])
    return Trajectories.from_items(torch.tensor([7, 9]), history, torch.tensor([3, 5]),
                                   torch.tensor([[1, 2], [0, 4]]), CODES, window=torch.tensor([0, 0]))


def test_positive_first_and_flat_views():
    traj = _trajectories()
    assert (traj.num_examples, traj.per_example, traj.num_levels) == (2, 3, 2)
    assert traj.items.tolist() == [[3, 1, 2], [5, 0, 4]]
    assert traj.positive.tolist() == [3, 5] and traj.candidates.tolist() == [[1, 2], [0, 4]]
    assert torch.equal(traj.codes, CODES[traj.items])
    assert traj.is_positive.tolist() == [[True, False, False], [True, False, False]]
    assert traj.trajectory_example.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(traj.flat_codes, CODES[torch.tensor([3, 1, 2, 5, 0, 4])])
    per_traj = torch.arange(6.0).view(2, 3)
    assert traj.flat(per_traj).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert traj.per_trajectory(torch.tensor([10.0, 20.0])).tolist() == [10.0] * 3 + [20.0] * 3


def test_positive_alone_without_candidates():
    traj = Trajectories.from_items(torch.tensor([0]), torch.tensor([[1]]), torch.tensor([2]), None, CODES)
    assert traj.items.tolist() == [[2]] and traj.candidates.shape == (1, 0) and traj.window is None


def test_shapes_are_checked():
    traj = _trajectories()
    with pytest.raises(ValueError, match="codes must be"):
        Trajectories(traj.example, traj.history, traj.items, traj.codes[:, :2])
    with pytest.raises(ValueError, match="example must be"):
        Trajectories(traj.example[:1], traj.history, traj.items, traj.codes)
    with pytest.raises(ValueError, match="history must be"):
        Trajectories(traj.example, traj.history[:1], traj.items, traj.codes)
    with pytest.raises(ValueError, match="window must be"):
        Trajectories(traj.example, traj.history, traj.items, traj.codes, window=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 1"):
        Trajectories(traj.example, traj.history, traj.items[:, :0], traj.codes[:, :0])


def test_sampler_returns_trajectories_of_its_sample():
    batch = ExampleBatch(torch.tensor([0, 1]), torch.tensor([[-1, 0], [1, 2]]), torch.tensor([3, 5]),
                         window=torch.tensor([4, 4]))
    sampler = RandomSampler(6)
    expected = sampler.sample(batch, 2, torch.Generator().manual_seed(0))
    traj = sampler.trajectories(batch, 2, torch.Generator().manual_seed(0), CODES)
    assert torch.equal(traj.candidates, expected) and traj.positive.tolist() == [3, 5]
    assert traj.window.tolist() == [4, 4] and torch.equal(traj.example, batch.example)


def test_reward_scores_trajectories_as_its_forward():
    traj = _trajectories()
    reward = Reward(RewardConfig(use_cm=False))
    log_r, comps = reward.score_trajectories(traj, None, CODES)
    ref_log_r, ref = reward(traj.positive, traj.items, None, CODES)
    assert torch.equal(log_r, ref_log_r) and all(torch.equal(comps[k], ref[k]) for k in ref)
