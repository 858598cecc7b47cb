"""Tests of gflowgr_core.reward (METHOD.md §5)."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gflowgr_core.reward import (Reward, RewardConfig, RewardError, cm_component, lm_generation_prob,
                                 summary)

DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

# 5 items, L = 3.
CODES = torch.tensor([
    [0, 1, 2],
    [0, 1, 3],
    [1, 1, 2],
    [2, 0, 0],
    [0, 1, 2],  # same SID as item 0 (a collision)
])


def _inputs():
    positive = torch.tensor([0, 3])
    candidates = torch.tensor([[0, 1, 2, 4], [3, 0, 2, 1]])
    cm = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.2, 1.0, 0.3, 0.4]])
    return positive, candidates, cm


def test_sum_fusion_matches_hand_computation():
    positive, candidates, cm = _inputs()
    log_r, comp = Reward(RewardConfig(r_pos=10.0))(positive, candidates, cm, CODES)
    r_a = torch.tensor([[10.0, 0, 0, 0], [10.0, 0, 0, 0]])
    r_sim = torch.tensor([[3.0, 2, 2, 3], [3.0, 0, 0, 0]])
    assert torch.equal(comp["r_a"], r_a)
    assert torch.equal(comp["r_sim"], r_sim)
    assert torch.allclose(comp["r_cm"], cm)
    expected = r_a + cm + r_sim
    # Row 1, candidate 3: 0 + 0.4 + 0 stays above eps; nothing is clamped here.
    assert torch.allclose(comp["R"], expected)
    assert torch.allclose(log_r, expected.log())
    assert log_r.shape == (2, 4) and log_r.dtype == torch.float32


def test_r_a_uses_item_identity_not_position_and_r_aug():
    positive = torch.tensor([2])
    candidates = torch.tensor([[1, 2, 3]])
    _, comp = Reward(RewardConfig(r_pos=5.0, r_aug=0.25, use_cm=False))(positive, candidates, None, CODES)
    assert comp["r_a"].tolist() == [[0.25, 5.0, 0.25]]


def test_sim_normalize_divides_by_levels():
    positive, candidates, cm = _inputs()
    _, comp = Reward(RewardConfig(sim_normalize=True))(positive, candidates, cm, CODES)
    assert torch.allclose(comp["r_sim"], torch.tensor([[1.0, 2 / 3, 2 / 3, 1.0], [1.0, 0, 0, 0]]))


def test_catalog_like_object_is_accepted_for_codes():
    class Cat:
        codes = CODES

    positive, candidates, cm = _inputs()
    a, _ = Reward()(positive, candidates, cm, Cat())
    b, _ = Reward()(positive, candidates, cm, CODES)
    assert torch.equal(a, b)


@pytest.mark.parametrize("flags", [(False, True, True), (True, False, True), (True, True, False),
                                   (True, False, False)])
def test_component_switches_remove_the_component(flags):
    use_a, use_cm, use_sim = flags
    positive, candidates, cm = _inputs()
    cfg = RewardConfig(r_pos=3.0, use_a=use_a, use_cm=use_cm, use_sim=use_sim)
    _, comp = Reward(cfg)(positive, candidates, cm if use_cm else None, CODES)
    _, full = Reward(RewardConfig(r_pos=3.0))(positive, candidates, cm, CODES)
    expected = sum(full[n] for n, on in zip(("r_a", "r_cm", "r_sim"), flags) if on)
    for n, on in zip(("r_a", "r_cm", "r_sim"), flags):
        if not on:
            assert torch.count_nonzero(comp[n]) == 0
    assert torch.allclose(comp["R_raw"], expected)


def test_cm_required_when_enabled_and_shape_checked():
    positive, candidates, cm = _inputs()
    with pytest.raises(RewardError, match="cm_norm"):
        Reward()(positive, candidates, None, CODES)
    with pytest.raises(RewardError, match="shape"):
        Reward()(positive, candidates, cm[:, :2], CODES)


def test_weighted_fixed_weights():
    positive, candidates, cm = _inputs()
    cfg = RewardConfig(fusion="weighted", weights=(2.0, 0.5, 0.1), r_pos=1.0)
    reward = Reward(cfg)
    assert list(reward.parameters()) == []
    _, comp = reward(positive, candidates, cm, CODES)
    expected = 2.0 * comp["r_a"] + 0.5 * comp["r_cm"] + 0.1 * comp["r_sim"]
    assert torch.allclose(comp["R_raw"], expected)


@pytest.mark.parametrize("kw, match", [
    (dict(fusion="weighted", learnable_weights=True), "learnable_weights=True is not supported.*collapse"),
    (dict(fusion="mlp"), "fusion='mlp' is not supported.*collapses"),
])
def test_learned_fusion_is_rejected_with_the_reason(kw, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kw)


def test_old_config_asking_for_learnable_weights_gets_a_config_error():
    from gflowgr_core.train.config import ConfigError, TrainConfig, from_dict

    with pytest.raises(ConfigError, match=r"gfn\.reward: RewardConfig\.learnable_weights=True is not supported"):
        from_dict(TrainConfig, {"gfn": {"reward": {"fusion": "weighted", "learnable_weights": True}}})


@pytest.mark.parametrize("fusion", ["sum", "weighted"])
def test_reward_has_no_parameters_and_log_r_carries_no_gradient(fusion):
    positive, candidates, cm = _inputs()
    reward = Reward(RewardConfig(fusion=fusion, weights=(2.0, 0.5, 0.1)))
    assert list(reward.parameters()) == []
    log_r, comp = reward(positive, candidates, cm.clone().requires_grad_(True), CODES)
    assert not log_r.requires_grad and log_r.grad_fn is None
    assert not any(t.requires_grad for t in comp.values())


def test_reward_inputs_are_detached():
    positive, candidates, cm = _inputs()
    cm = cm.clone().requires_grad_(True)
    log_r, _ = Reward()(positive, candidates, cm, CODES)
    assert not log_r.requires_grad


def test_clamp_to_eps_and_clip_max_and_clamped_fraction():
    positive = torch.tensor([0, 3])
    candidates = torch.tensor([[0, 3], [3, 0]])
    cfg = RewardConfig(r_pos=1e6, use_cm=False, use_sim=True, eps=1e-3, clip_max=100.0)
    log_r, comp = Reward(cfg)(positive, candidates, None, CODES)
    # Positive: 1e6 + 3 -> clipped to 100; item 3 vs positive 0 share no code -> 0 -> eps.
    assert torch.allclose(comp["R"], torch.tensor([[100.0, 1e-3], [100.0, 1e-3]]))
    assert torch.allclose(log_r, torch.log(comp["R"]))
    assert summary(comp)["reward/clamped_frac"] == 1.0


def test_beta_scales_log_reward():
    positive, candidates, cm = _inputs()
    base, comp = Reward(RewardConfig())(positive, candidates, cm, CODES)
    scaled, comp2 = Reward(RewardConfig(beta=2.5))(positive, candidates, cm, CODES)
    assert torch.allclose(scaled, 2.5 * base)
    assert torch.equal(comp["R"], comp2["R"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cm_names_component_and_row(bad):
    positive, candidates, cm = _inputs()
    cm[1, 2] = bad
    with pytest.raises(RewardError, match=r"'cm_norm'.*row\(s\) \[1\]"):
        Reward()(positive, candidates, cm, CODES)


def test_non_finite_fused_reward_names_R_and_row():
    positive, candidates, cm = _inputs()
    reward = Reward(RewardConfig(fusion="weighted", weights=(3e38, 1.0, 1.0), r_pos=3e38))
    # Only the positives carry r_a != 0, and both rows have one: 3e38 * 3e38 overflows in rows 0 and 1.
    with pytest.raises(RewardError, match=r"'R'.*\[0, 1\]"):
        reward(positive, candidates, cm, CODES)


def test_cm_out_of_unit_range_is_an_error():
    positive, candidates, cm = _inputs()
    cm[0, 1] = 1.7
    with pytest.raises(RewardError, match=r"\[0, 1\].*row\(s\) \[0\]"):
        Reward()(positive, candidates, cm, CODES)


def test_out_of_range_items_are_errors():
    positive, candidates, cm = _inputs()
    candidates[1, 3] = 5
    with pytest.raises(RewardError, match=r"candidates.*\[0, 5\).*row\(s\) \[1\]"):
        Reward()(positive, candidates, cm, CODES)
    with pytest.raises(RewardError, match="positive"):
        Reward()(torch.tensor([0, -1]), _inputs()[1], cm, CODES)
    with pytest.raises(RewardError, match="integer"):
        Reward()(positive.float(), _inputs()[1], cm, CODES)


@pytest.mark.parametrize("kw, field", [
    (dict(fusion="product"), "fusion"), (dict(cm_norm="rank"), "cm_norm"), (dict(cm_source="x"), "cm_source"),
    (dict(eps=0.0), "eps"), (dict(clip_max=1e-5), "clip_max"), (dict(beta=0.0), "beta"),
    (dict(weights=(1.0, -1.0, 1.0)), "weights"), (dict(weights=(1.0, 1.0)), "weights"),
    (dict(use_a=False, use_cm=False, use_sim=False), "use_a"),
    (dict(r_pos=float("nan")), "r_pos"), (dict(r_pos_mode="auto"), "r_pos_mode"),
    (dict(target_share=0.0), "target_share"), (dict(target_share=1.0), "target_share"),
    (dict(r_pos_mode="catalogue", use_a=False), "r_pos_mode"),
    (dict(r_pos_mode="catalogue", fusion="weighted", weights=(0.0, 1.0, 1.0)), "r_pos_mode"),
])
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        RewardConfig(**kw)


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = RewardConfig(fusion="weighted", weights=(1.0, 2.0, 3.0), beta=0.5)
    assert RewardConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        RewardConfig.from_dict({"r_pos": 1.0, "rpos": 2.0})


def test_summary_reports_each_component():
    positive, candidates, cm = _inputs()
    _, comp = Reward()(positive, candidates, cm, CODES)
    s = summary(comp)
    for name in ("r_a", "r_cm", "r_sim", "R", "R_raw"):
        for stat in ("mean", "std", "min", "max"):
            assert f"reward/{name}/{stat}" in s
    assert s["reward/r_cm/max"] == pytest.approx(1.0)
    assert s["reward/r_cm/min"] == pytest.approx(0.0)
    assert s["reward/r_sim/mean"] == pytest.approx(comp["r_sim"].mean().item())
    assert s["reward/clamped_frac"] == 0.0


def test_cm_component_calls_scorer_with_configured_method():
    calls = []

    class Scorer:
        def normalized(self, example_idx, items, method="sigmoid_z"):
            calls.append(method)
            return torch.full(items.shape, 0.5)

    idx = torch.tensor([0, 1])
    cand = torch.tensor([[0, 1], [2, 3]])
    out = cm_component(RewardConfig(cm_norm="percentile"), Scorer(), idx, cand)
    assert calls == ["percentile"] and out.shape == (2, 2)
    assert cm_component(RewardConfig(use_cm=False), Scorer(), idx, cand) is None
    with pytest.raises(RewardError, match="lm"):
        cm_component(RewardConfig(cm_source="lm"), Scorer(), idx, cand)


def test_lm_generation_prob_is_per_step_geometric_mean():
    logp = torch.log(torch.tensor([[[0.5, 0.5, 0.5], [1.0, 0.125, 1.0]]]))
    p = lm_generation_prob(logp)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5]]))
    positive = torch.tensor([0])
    log_r, comp = Reward(RewardConfig(cm_source="lm"))(positive, torch.tensor([[0, 1]]), p, CODES)
    assert torch.allclose(comp["r_cm"], p)
    with pytest.raises(RewardError, match="log-probabilities"):
        lm_generation_prob(torch.tensor([[0.3, 0.2]]))
    with pytest.raises(RewardError, match="step_logp"):
        lm_generation_prob(torch.tensor([[float("nan"), -1.0]]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_items=st.integers(2, 40), n_levels=st.integers(1, 5),
       B=st.integers(1, 6), T=st.integers(1, 7), fusion=st.sampled_from(["sum", "weighted"]),
       normalize=st.booleans(), drop_levels=st.integers(0, 4))
def test_reward_properties(seed, n_items, n_levels, B, T, fusion, normalize, drop_levels):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    codes = torch.randint(0, 3, (n_items, n_levels), generator=g)
    positive = torch.randint(0, n_items, (B,), generator=g)
    candidates = torch.randint(0, n_items, (B, T), generator=g)
    candidates[:, 0] = positive
    cm = torch.rand(B, T, generator=g)
    cfg = RewardConfig(fusion=fusion, sim_normalize=normalize, weights=(1.0, 0.5, 2.0))
    base = max(1, n_levels - drop_levels)
    log_r, comp = Reward(cfg, base_levels=base)(positive, candidates, cm, codes)
    assert torch.isfinite(log_r).all()
    assert torch.all(comp["R"] >= cfg.eps) and torch.all(comp["R"] <= cfg.clip_max)
    top = 1.0 if normalize else float(base)
    assert torch.all(comp["r_sim"][:, 0] == top)
    assert torch.all((comp["r_sim"] >= 0) & (comp["r_sim"] <= top))
    # Reference r_sim by explicit comparison of the first `base` levels.
    ref = (codes[candidates][..., :base] == codes[positive][:, None, :base]).sum(-1).float() / (
        base if normalize else 1)
    assert torch.allclose(comp["r_sim"], ref)
    if fusion == "sum":
        assert torch.allclose(comp["R_raw"], comp["r_a"] + comp["r_cm"] + comp["r_sim"])


def test_r_sim_on_letter_beauty_sids():
    index = DATA / "letter" / "Beauty" / "Beauty.index.json"
    if not index.exists():
        pytest.skip(f"shared data absent: {index}")
    raw = json.loads(index.read_text())
    keys = sorted(raw, key=int)
    codes = torch.tensor([[int(tok.split("_")[1].rstrip(">")) for tok in raw[k]] for k in keys])
    n = codes.shape[0]
    g = torch.Generator().manual_seed(7)
    positive = torch.randint(0, n, (64,), generator=g)
    candidates = torch.cat([positive[:, None], torch.randint(0, n, (64, 5), generator=g)], dim=1)
    cm = torch.rand(64, 6, generator=g)
    log_r, comp = Reward(RewardConfig(r_pos=1.0))(positive, candidates, cm, codes)
    for b in range(0, 64, 9):
        for t in range(6):
            want = sum(a == c for a, c in zip(raw[keys[candidates[b, t]]], raw[keys[positive[b]]]))
            assert comp["r_sim"][b, t].item() == want
    assert torch.all(comp["r_sim"][:, 0] == 4)
    assert torch.isfinite(log_r).all()
    assert math.isclose(comp["r_a"].sum().item(), float((candidates == positive[:, None]).sum()))


# ------------------------------------------------------------------------- suffix catalogues (base levels)

def _suffix_catalog():
    from gflowgr_core.sid.catalog import Catalog

    # Items 0 and 4 share the base SID (suffix codes 0 and 1); every other item is first in its group,
    # so it carries suffix code 0 like item 0.
    return Catalog.from_codes(CODES, (3, 2, 4), [f"i{i}" for i in range(5)], collisions="suffix")


def test_r_sim_of_a_suffix_catalogue_compares_base_levels_only():
    cat = _suffix_catalog()
    assert cat.num_levels == 4 and cat.base_levels == 3
    positive = torch.tensor([0, 3])
    candidates = torch.tensor([[0, 4, 3, 1], [3, 0, 2, 4]])
    want = torch.tensor([[3.0, 3, 0, 2], [3.0, 0, 0, 0]])
    for reward, codes in ((Reward(RewardConfig(use_cm=False), base_levels=3), cat.codes),
                          (Reward(RewardConfig(use_cm=False)), cat)):
        _, comp = reward(positive, candidates, None, codes)
        # Item 3 shares no real code with item 0 (only the suffix code 0): r_sim 0, not 1; the positive
        # gets the 3 base levels, not 4.
        assert torch.equal(comp["r_sim"], want)
    _, comp = Reward(RewardConfig(use_cm=False, sim_normalize=True), base_levels=3)(positive, candidates, None,
                                                                                    cat.codes)
    assert torch.allclose(comp["r_sim"], want / 3)
    # Without base_levels a bare codes tensor is compared on every level (the "share" behaviour).
    _, comp = Reward(RewardConfig(use_cm=False))(positive, candidates, None, cat.codes)
    assert comp["r_sim"][1, 1].item() == 1.0 and comp["r_sim"][0, 0].item() == 4.0


def test_base_levels_are_checked_against_the_codes():
    cat = _suffix_catalog()
    positive, candidates = torch.tensor([0]), torch.tensor([[0, 1]])
    with pytest.raises(RewardError, match=r"base_levels=2\) but the catalogue"):
        Reward(RewardConfig(use_cm=False), base_levels=2)(positive, candidates, None, cat)
    with pytest.raises(RewardError, match="exceeds the 3 SID levels"):
        Reward(RewardConfig(use_cm=False), base_levels=4)(positive, candidates, None, CODES)
    with pytest.raises(RewardError, match="base_levels must be >= 1"):
        Reward(base_levels=0)


# ---------------------------------------------------------------------------- catalogue mass and r_pos

def _mass_setup(seed=0, n_items=23, n_levels=3, B=5):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 3, (n_items, n_levels), generator=g)
    codes[1] = codes[0]                      # a shared SID
    positive = torch.randint(0, n_items, (B,), generator=g)
    positive[0] = 0
    cm_all = torch.rand(B, n_items, generator=g)
    return codes, positive, cm_all


def _brute_force_mass(reward, positive, cm_all, codes, log_rest=None):
    """Sum of R^beta over the catalogue via forward(): every item a candidate of every example."""
    B, n = positive.shape[0], codes.shape[0]
    cands = torch.arange(n).expand(B, n)
    log_r, _ = reward(positive, cands, cm_all, codes, log_rest=log_rest)
    same = (codes[cands] == codes[positive][:, None, :]).all(-1) & (cands != positive[:, None])
    log_r = log_r.masked_fill(same, float("-inf"))  # the positive's SID group is one terminal state
    log_pos = log_r.gather(1, positive[:, None])[:, 0]
    rest = log_r.masked_fill(cands == positive[:, None], float("-inf"))
    return log_pos, torch.logsumexp(rest, dim=1)


@pytest.mark.parametrize("cfg", [
    RewardConfig(r_pos=10.0),
    RewardConfig(r_pos=2.0, beta=0.5, sim_normalize=True),
    RewardConfig(fusion="weighted", weights=(3.0, 0.5, 0.25), r_aug=0.1, beta=2.0),
    RewardConfig(use_cm=False, r_pos=4.0),
])
def test_catalogue_mass_matches_brute_force_for_every_chunking(cfg):
    codes, positive, cm_all = _mass_setup()
    reward = Reward(cfg)
    cm = cm_all if cfg.use_cm else None
    want_pos, want_rest = _brute_force_mass(reward, positive, cm, codes)
    for chunk_elems in (1, 7, 40, 1 << 22):
        mass = reward.catalogue_mass(positive, cm, codes, chunk_elems=chunk_elems)
        assert torch.allclose(mass.log_pos, want_pos, atol=1e-5)
        assert torch.allclose(mass.log_rest, want_rest, atol=1e-5)
    calls = []

    def cm_fn(items):
        calls.append(items.numel())
        return cm_all[:, items]

    mass_fn = reward.catalogue_mass(positive, cm_fn if cfg.use_cm else None, codes, chunk_elems=40)
    assert torch.allclose(mass_fn.log_rest, want_rest, atol=1e-5)
    if cfg.use_cm:
        assert sum(calls) == codes.shape[0] and len(calls) > 1
    total = torch.logaddexp(want_pos, want_rest)
    assert torch.allclose(mass.log_total, total, atol=1e-5)
    assert torch.allclose(mass.share, torch.exp(want_pos - total), atol=1e-6)
    assert mass.log_mean_total() == pytest.approx(math.log(total.double().exp().mean().item()), rel=1e-5)


def test_catalogue_mass_leaves_out_the_positives_sid_group():
    codes, positive, cm_all = _mass_setup()
    reward = Reward(RewardConfig(use_cm=False, use_sim=False, r_aug=1.0, r_pos=1.0))
    mass = reward.catalogue_mass(positive, None, codes)
    n_same = (codes == codes[positive][:, None, :]).all(-1).sum(1)      # the positive included
    # Every item's R is 1: the rest counts the items outside the positive's SID group.
    assert torch.allclose(mass.log_rest.exp(), (codes.shape[0] - n_same).float())
    assert n_same[0] >= 2                                               # items 0 and 1 share a SID


def test_catalogue_mass_validates_inputs():
    codes, positive, cm_all = _mass_setup()
    reward = Reward()
    with pytest.raises(RewardError, match="every item"):
        reward.catalogue_mass(positive, None, codes)
    with pytest.raises(RewardError, match="shape"):
        reward.catalogue_mass(positive, cm_all[:, :-1], codes)
    bad = cm_all.clone()
    bad[2, 7] = 1.5
    with pytest.raises(RewardError, match=r"\[0, 1\].*row\(s\) \[2\]"):
        reward.catalogue_mass(positive, bad, codes)
    with pytest.raises(RewardError, match="positive"):
        reward.catalogue_mass(torch.tensor([99]), cm_all[:1], codes)


@pytest.mark.parametrize("share, beta", [(0.5, 1.0), (0.2, 0.5), (0.9, 2.0)])
def test_catalogue_r_pos_gives_the_positive_its_target_share(share, beta):
    codes, positive, cm_all = _mass_setup(seed=3)
    reward = Reward(RewardConfig(r_pos_mode="catalogue", target_share=share, beta=beta, clip_max=1e6))
    mass = reward.catalogue_mass(positive, cm_all, codes)
    assert torch.allclose(mass.share, torch.full_like(mass.share, share), atol=1e-5)
    # forward() rewards the positive the same way, given the rest of the mass.
    log_pos, log_rest = _brute_force_mass(reward, positive, cm_all, codes, log_rest=mass.log_rest)
    assert torch.allclose(log_pos, mass.log_pos, atol=1e-5)
    assert torch.allclose(log_rest, mass.log_rest, atol=1e-5)
    cands = torch.stack([positive, (positive + 1) % codes.shape[0]], dim=1)
    log_r, comp = reward(positive, cands, cm_all.gather(1, cands), codes, log_rest=mass.log_rest)
    assert torch.allclose(log_r[:, 0], mass.log_pos, atol=1e-5)
    assert torch.all(comp["r_a"][:, 0] > 0) and torch.all(comp["r_a"][:, 1] == 0)
    with pytest.raises(RewardError, match="log_rest"):
        reward(positive, cands, cm_all.gather(1, cands), codes)


def test_catalogue_r_pos_respects_clip_max_and_stays_non_negative():
    codes, positive, cm_all = _mass_setup(seed=4)
    capped = Reward(RewardConfig(r_pos_mode="catalogue", target_share=0.99, clip_max=10.0))
    mass = capped.catalogue_mass(positive, cm_all, codes)
    assert torch.allclose(mass.log_pos, torch.full_like(mass.log_pos, math.log(10.0)))
    assert torch.all(mass.share < 0.99)
    # A tiny target is already exceeded by r_cm + r_sim of the positive: r_a stays 0.
    low = Reward(RewardConfig(r_pos_mode="catalogue", target_share=1e-6))
    mass = low.catalogue_mass(positive, cm_all, codes)
    cands = positive[:, None]
    _, comp = low(positive, cands, cm_all.gather(1, cands), codes, log_rest=mass.log_rest)
    assert torch.all(comp["r_a"] == 0) and torch.all(mass.share > 1e-6)
