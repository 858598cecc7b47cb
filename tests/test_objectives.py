"""Reference objectives: constrained log P_F, TB / DB / SubTB, SFT / DPO / S-DPO, the composed GFlowNet loss."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gflowgr_core import backends, functional
from gflowgr_core.objectives import (DetailedBalance, SubTrajectoryBalance, TrajectoryBalance,
                                     autocast_operands, code_offsets, constrained_log_pf,
                                     constrained_log_softmax_rows, dpo_loss, gfn_loss, gfn_loss_reference,
                                     make_objective, sdpo_loss, sft_cross_entropy, trie_walk)
from gflowgr_core.sid.trie import Trie

DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CPL = (3, 4, 2)
DT = torch.float64


def _catalogue(seed=0, n_items=11, cpl=CPL):
    """Distinct random SIDs over ``cpl`` and their trie."""
    g = torch.Generator().manual_seed(seed)
    total = math.prod(cpl)
    flat = torch.randperm(total, generator=g)[:n_items]
    codes = torch.empty(n_items, len(cpl), dtype=torch.long)
    rest = flat.clone()
    for lvl in reversed(range(len(cpl))):
        codes[:, lvl] = rest % cpl[lvl]
        rest = rest // cpl[lvl]
    return codes, Trie.build(codes, cpl)


def _children(codes):
    """``{prefix tuple: sorted next codes}`` computed directly from the SIDs."""
    out = {}
    for sid in codes.tolist():
        for lvl in range(len(sid)):
            out.setdefault(tuple(sid[:lvl]), set()).add(sid[lvl])
    return {k: sorted(v) for k, v in out.items()}


def _random_inputs(t, cpl, d=5, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, len(cpl), d, generator=g, dtype=dtype)
    w = torch.randn(sum(cpl), d, generator=g, dtype=dtype)
    b = torch.randn(sum(cpl), generator=g, dtype=dtype)
    return h, w, b


# ---------------------------------------------------------------- constrained log P_F

def test_trie_log_pf_matches_direct_renormalisation():
    codes, trie = _catalogue()
    rows = torch.cat([codes, codes[[3, 0, 3]]])  # duplicates are fine
    h, w, b = _random_inputs(rows.shape[0], CPL)
    got = constrained_log_pf(h, w, rows, trie, "trie", codes_per_level=CPL, bias=b)
    kids = _children(codes)
    off = code_offsets(CPL)
    for t, sid in enumerate(rows.tolist()):
        for lvl in range(len(CPL)):
            z = h[t, lvl] @ w[off[lvl]:off[lvl + 1]].T + b[off[lvl]:off[lvl + 1]]
            allowed = kids[tuple(sid[:lvl])]
            want = z[sid[lvl]] - torch.logsumexp(z[allowed], 0)
            assert torch.allclose(got[t, lvl], want, atol=1e-12), (t, lvl)


def test_constrained_rows_sum_to_one_over_children_and_are_minus_inf_elsewhere():
    codes, trie = _catalogue(seed=3)
    nodes = trie_walk(trie, codes)
    kids = _children(codes)
    off = code_offsets(CPL)
    h, w, b = _random_inputs(codes.shape[0], CPL, seed=4)
    for lvl in range(len(CPL)):
        logp = constrained_log_softmax_rows(h[:, lvl], w[off[lvl]:off[lvl + 1]], nodes[:, lvl], lvl, trie,
                                            bias=b[off[lvl]:off[lvl + 1]])
        assert logp.shape == (codes.shape[0], CPL[lvl])
        assert torch.allclose(logp.exp().sum(1), torch.ones(codes.shape[0], dtype=DT))
        for t, sid in enumerate(codes.tolist()):
            allowed = kids[tuple(sid[:lvl])]
            outside = [c for c in range(CPL[lvl]) if c not in allowed]
            assert torch.isfinite(logp[t, allowed]).all()
            assert torch.isinf(logp[t, outside]).all() and (logp[t, outside] < 0).all()


def test_level_and_vocab_supports_match_direct_log_softmax():
    codes, trie = _catalogue(seed=5)
    t, d, vocab = codes.shape[0], 6, 40
    h, w, _ = _random_inputs(t, CPL, d=d, seed=6)
    g = torch.Generator().manual_seed(7)
    w_full = torch.randn(vocab, d, generator=g, dtype=DT)
    b_full = torch.randn(vocab, generator=g, dtype=DT)
    sid_tok = torch.randperm(vocab, generator=g)[:sum(CPL)]
    off = code_offsets(CPL)

    level = constrained_log_pf(h, w, codes, None, "level", codes_per_level=CPL)
    vocab_lp = constrained_log_pf(h, None, codes, None, "vocab", codes_per_level=CPL, w_full=w_full,
                                  sid_token_ids=sid_tok, bias=b_full)
    for lvl in range(len(CPL)):
        direct_level = F.log_softmax(h[:, lvl] @ w[off[lvl]:off[lvl + 1]].T, dim=-1)
        assert torch.allclose(level[:, lvl], direct_level.gather(1, codes[:, lvl:lvl + 1])[:, 0])
        direct_vocab = F.log_softmax(h[:, lvl] @ w_full.T + b_full, dim=-1)
        tok = sid_tok[off[lvl] + codes[:, lvl]]
        assert torch.allclose(vocab_lp[:, lvl], direct_vocab.gather(1, tok[:, None])[:, 0])
    # Renormalising over fewer codes can only raise a code's probability.
    trie_lp = constrained_log_pf(h, w, codes, trie, "trie")
    assert (trie_lp >= level - 1e-12).all()


def test_half_precision_inputs_are_normalised_in_float32():
    codes, trie = _catalogue(seed=9)
    h, w, b = _random_inputs(codes.shape[0], CPL, d=8, seed=10)
    want = constrained_log_pf(h, w, codes, trie, bias=b)
    for support in ("trie", "level"):
        got = constrained_log_pf(h.bfloat16(), w.bfloat16(), codes, trie, support, bias=b.bfloat16())
        assert got.dtype == torch.float32
        if support == "trie":
            assert torch.allclose(got.double(), want, rtol=2e-2, atol=5e-2)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(1, 30), st.integers(0, 10_000))
def test_random_tries_trie_support_normalises_and_dominates_level(cpl, n_items, seed):
    cpl = tuple(cpl)
    n_items = min(n_items, math.prod(cpl))
    codes, trie = _catalogue(seed=seed, n_items=n_items, cpl=cpl)
    h, w, b = _random_inputs(n_items, cpl, d=3, seed=seed + 1, dtype=torch.float32)
    trie_lp = constrained_log_pf(h, w, codes, trie, bias=b)
    level_lp = constrained_log_pf(h, w, codes, trie, "level", bias=b)
    assert torch.isfinite(trie_lp).all() and (trie_lp <= 1e-6).all()
    assert (trie_lp >= level_lp - 1e-5).all()
    # Each item is the unique leaf of its path, so the trie-constrained policy's item probabilities sum to 1
    # once every item's path is scored under one shared hidden state per level.
    h_shared = h[:1].expand(n_items, -1, -1)
    total = constrained_log_pf(h_shared, w, codes, trie, bias=b).sum(1).exp().sum()
    assert torch.allclose(total, torch.tensor(1.0), atol=1e-5)


def test_log_pf_errors_name_the_rows():
    codes, trie = _catalogue(seed=8)
    h, w, _ = _random_inputs(4, CPL)
    kids = _children(codes)
    missing = next((c0, c1, c2) for c0 in range(3) for c1 in range(4) for c2 in range(2)
                   if (c0, c1) not in kids or c2 not in kids[(c0, c1)])
    bad = torch.stack([codes[0], codes[1], torch.tensor(missing), codes[2]])
    with pytest.raises(ValueError, match=r"rows 2 .*not in the trie"):
        constrained_log_pf(h, w, bad, trie)
    out_of_range = codes[:4].clone()
    out_of_range[1, 1] = 4
    with pytest.raises(ValueError, match=r"codes\[:, 1\] must lie in \[0, 4\).*rows 1"):
        constrained_log_pf(h, w, out_of_range, trie)
    with pytest.raises(ValueError, match="w_sid must be"):
        constrained_log_pf(h, w[:-1], codes[:4], trie)
    with pytest.raises(ValueError, match="codes must be"):
        constrained_log_pf(h, w, codes[:3], trie)
    with pytest.raises(ValueError, match="support must be"):
        constrained_log_pf(h, w, codes[:4], trie, "beam")
    with pytest.raises(ValueError, match="needs a trie"):
        constrained_log_pf(h, w, codes[:4], None, "trie", codes_per_level=CPL)
    with pytest.raises(ValueError, match="w_full"):
        constrained_log_pf(h, w, codes[:4], trie, "vocab")
    with pytest.raises(ValueError, match="does not match the trie"):
        constrained_log_pf(h, w, codes[:4], trie, codes_per_level=(3, 4, 3))


# ---------------------------------------------------------------- flows consistent with R

def _proportional_policy(seed=11, n_items=9):
    """Hidden states whose trie-constrained policy samples items with probability R / sum R.

    With ``w_sid`` the identity, ``h[t, l, offset_l + c] = log F(s_l + c) + shift`` where ``F(s)`` sums R
    over the leaves under ``s``; codes that are not children get arbitrary (large) values the trie masks.
    """
    codes, trie = _catalogue(seed=seed, n_items=n_items)
    g = torch.Generator().manual_seed(seed)
    reward = torch.rand(n_items, generator=g, dtype=DT) * 5 + 0.1
    flow = {}
    for sid, r in zip(codes.tolist(), reward.tolist()):
        for lvl in range(len(CPL) + 1):
            flow[tuple(sid[:lvl])] = flow.get(tuple(sid[:lvl]), 0.0) + r
    off = code_offsets(CPL)
    h = torch.randn(n_items, len(CPL), sum(CPL), generator=g, dtype=DT) * 3 + 4
    log_f = torch.empty(n_items, len(CPL) - 1, dtype=DT)
    for t, sid in enumerate(codes.tolist()):
        for lvl in range(len(CPL)):
            shift = float(torch.randn(1, generator=g))
            for c in _children(codes)[tuple(sid[:lvl])]:
                h[t, lvl, off[lvl] + c] = math.log(flow[tuple(sid[:lvl]) + (c,)]) + shift
            if lvl:
                log_f[t, lvl - 1] = math.log(flow[tuple(sid[:lvl])])
    log_z = torch.full((n_items,), math.log(flow[()]), dtype=DT)
    return codes, trie, h, torch.eye(sum(CPL), dtype=DT), log_f, log_z, reward.log()


def test_tb_db_subtb_vanish_for_a_policy_proportional_to_reward():
    codes, trie, h, w, log_f, log_z, log_r = _proportional_policy()
    log_pf = constrained_log_pf(h, w, codes, trie)
    # The policy generates each item with probability R / sum R.
    assert torch.allclose(log_pf.sum(1), log_r - log_z, atol=1e-12)
    for obj in (TrajectoryBalance(), DetailedBalance(), SubTrajectoryBalance(0.5), SubTrajectoryBalance(3.0)):
        res = obj.residuals(log_pf, log_z, log_f, log_r)
        assert res.shape == (codes.shape[0],)
        assert res.abs().max() < 1e-20, obj
    # A wrong log Z leaves TB residual (dZ)^2 on every trajectory.
    res = TrajectoryBalance().residuals(log_pf, log_z + 0.3, None, log_r)
    assert torch.allclose(res, torch.full_like(res, 0.09))
    # The masked-out logits are what make this policy proportional: without the trie it is not.
    level_lp = constrained_log_pf(h, w, codes, trie, "level")
    assert TrajectoryBalance().residuals(level_lp, log_z, None, log_r).min() > 1e-3
    # Inconsistent intermediate flows break DB and SubTB but not TB.
    log_f_bad = log_f.clone()
    log_f_bad[:, 0] += 0.5
    assert (DetailedBalance().residuals(log_pf, log_z, log_f_bad, log_r) > 0.1).all()
    assert (SubTrajectoryBalance().residuals(log_pf, log_z, log_f_bad, log_r) > 0.01).all()


def test_gfn_loss_reference_zero_for_consistent_flows_and_composes():
    codes, trie, h, w, log_f, log_z, log_r = _proportional_policy(seed=12)
    for name in ("tb", "db", "subtb"):
        loss, log_pf = gfn_loss_reference(h, w, codes, trie, log_f, log_z, log_r, objective=name)
        assert loss.abs() < 1e-20 and log_pf.shape == codes.shape
    h2 = h + 0.1 * torch.randn_like(h)
    loss, log_pf = gfn_loss_reference(h2, w, codes, trie, log_f, log_z, log_r, objective="subtb",
                                      subtb_lambda=1.7)
    want = SubTrajectoryBalance(1.7).residuals(constrained_log_pf(h2, w, codes, trie), log_z, log_f, log_r)
    assert torch.allclose(loss, want.mean())


# ---------------------------------------------------------------- balance formulas

def _random_flows(t=6, n_levels=4, seed=20):
    g = torch.Generator().manual_seed(seed)
    log_pf = -torch.rand(t, n_levels, generator=g, dtype=DT) * 3
    return (log_pf, torch.randn(t, generator=g, dtype=DT), torch.randn(t, n_levels - 1, generator=g, dtype=DT),
            torch.randn(t, generator=g, dtype=DT))


def _subtb_brute_force(log_pf, log_z, log_f, log_r, lam):
    out = []
    for t in range(log_pf.shape[0]):
        flows = [log_z[t]] + list(log_f[t]) + [log_r[t]]
        n_levels = log_pf.shape[1]
        num = den = 0.0
        for i in range(n_levels + 1):
            for j in range(i + 1, n_levels + 1):
                delta = flows[i] + log_pf[t, i:j].sum() - flows[j]
                num += lam ** (j - i) * delta ** 2
                den += lam ** (j - i)
        out.append(num / den)
    return torch.stack(out)


def test_tb_and_db_formulas():
    log_pf, log_z, log_f, log_r = _random_flows()
    tb = TrajectoryBalance().residuals(log_pf, log_z, None, log_r)
    assert torch.allclose(tb, (log_z + log_pf.sum(1) - log_r) ** 2)
    db = DetailedBalance().residuals(log_pf, log_z, log_f, log_r)
    flows = torch.cat([log_z[:, None], log_f, log_r[:, None]], 1)
    want = sum((flows[:, l] + log_pf[:, l] - flows[:, l + 1]) ** 2 for l in range(log_pf.shape[1]))
    assert torch.allclose(db, want)


@pytest.mark.parametrize("lam", [0.9, 0.3, 1.0, 2.5])
def test_subtb_matches_brute_force(lam):
    args = _random_flows(seed=21)
    got = SubTrajectoryBalance(lam).residuals(*args)
    assert torch.allclose(got, _subtb_brute_force(*args, lam))


def test_subtb_limits_are_db_average_and_tb():
    args = _random_flows(seed=22)
    log_pf = args[0]
    db = DetailedBalance().residuals(*args)
    tb = TrajectoryBalance().residuals(*args)
    small = SubTrajectoryBalance(1e-9).residuals(*args)
    large = SubTrajectoryBalance(1e9).residuals(*args)
    assert torch.allclose(small, db / log_pf.shape[1], rtol=1e-6)
    assert torch.allclose(large, tb, rtol=1e-6)
    # Extreme lambdas stay finite even in float32 (weights are normalised in log space).
    f32 = [a.float() for a in args]
    assert torch.isfinite(SubTrajectoryBalance(1e30).residuals(*f32)).all()
    assert torch.isfinite(SubTrajectoryBalance(1e-30).residuals(*f32)).all()


# ---------------------------------------------------------------- torchgfn's reductions (docs/ARCHITECTURE.md)

def _transitions_of(log_pf, log_z, log_f, log_r):
    """The batch as a flat list of transition residuals ``log F(s) + log P_F - log F(s')``, trajectory by
    trajectory, the last transition's target being ``log R`` (a torchgfn ``Transitions`` container)."""
    out = []
    for t in range(log_pf.shape[0]):
        flows = [log_z[t], *log_f[t], log_r[t]]
        out += [flows[l] + log_pf[t, l] - flows[l + 1] for l in range(log_pf.shape[1])]
    return torch.stack(out)


def _geometric_within(log_pf, log_z, log_f, log_r, lam):
    """torchgfn's SubTB ``weighting="geometric_within"``: a sub-trajectory of k transitions weighs lam^(k-1), the
    weights of one trajectory are divided by their sum, and the weighted squares are summed over the batch and
    divided by the number of trajectories."""
    n = log_pf.shape[1]
    denom = sum((n - k + 1) * lam ** (k - 1) for k in range(1, n + 1))
    total = 0.0
    for t in range(log_pf.shape[0]):
        flows = [log_z[t], *log_f[t], log_r[t]]
        for k in range(1, n + 1):
            for i in range(0, n - k + 1):
                score = flows[i] + log_pf[t, i:i + k].sum() - flows[i + k]
                total = total + lam ** (k - 1) / denom * score ** 2
    return total / log_pf.shape[0]


@pytest.mark.parametrize("n_levels", [1, 2, 4, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_db_is_l_times_the_mean_over_transitions(n_levels, seed):
    # Our DB sums the L transitions of a trajectory and averages over trajectories; torchgfn's DBGFlowNet
    # averages the squared residuals over every transition of the batch: ours = L x theirs.
    args = _random_flows(t=5, n_levels=n_levels, seed=40 + seed)
    theirs = _transitions_of(*args).square().mean()
    assert torch.allclose(DetailedBalance().loss(*args), n_levels * theirs, rtol=1e-12, atol=0)
    assert torch.allclose(functional.detailed_balance(*args), n_levels * theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("lam", [0.9, 0.5, 1.0, 1.7])
@pytest.mark.parametrize("n_levels", [1, 3, 4])
def test_subtb_equals_geometric_within_and_tb_the_mean_over_trajectories(lam, n_levels):
    args = _random_flows(t=4, n_levels=n_levels, seed=50 + n_levels)
    got = SubTrajectoryBalance(lam).loss(*args)
    assert torch.allclose(got, _geometric_within(*args, lam), rtol=1e-12, atol=0)
    log_pf, log_z, _, log_r = args
    assert torch.allclose(TrajectoryBalance().loss(*args), ((log_z + log_pf.sum(1) - log_r) ** 2).mean(),
                          rtol=1e-12, atol=0)


def test_single_level_objectives_coincide():
    log_pf, log_z, log_f, log_r = _random_flows(n_levels=1, seed=23)
    assert log_f.shape == (6, 0)
    tb = TrajectoryBalance().residuals(log_pf, log_z, log_f, log_r)
    assert torch.allclose(DetailedBalance().residuals(log_pf, log_z, log_f, log_r), tb)
    assert torch.allclose(SubTrajectoryBalance(0.4).residuals(log_pf, log_z, log_f, log_r), tb)


def test_weighted_loss_divides_by_t():
    log_pf, log_z, log_f, log_r = _random_flows(seed=24)
    wts = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 1.0], dtype=DT)
    for obj in (TrajectoryBalance(), DetailedBalance(), SubTrajectoryBalance()):
        res = obj.residuals(log_pf, log_z, log_f, log_r)
        assert torch.allclose(obj.loss(log_pf, log_z, log_f, log_r), res.mean())
        assert torch.allclose(obj.loss(log_pf, log_z, log_f, log_r, wts), (wts * res).sum() / 6)
    with pytest.raises(ValueError, match="non-negative"):
        TrajectoryBalance().loss(log_pf, log_z, None, log_r, -wts)
    with pytest.raises(ValueError, match="weights must be"):
        TrajectoryBalance().loss(log_pf, log_z, None, log_r, wts[:3])


def test_objective_factory_and_input_checks():
    assert isinstance(make_objective("tb"), TrajectoryBalance)
    assert isinstance(make_objective("DB"), DetailedBalance)
    sub = make_objective("subtb", subtb_lambda=0.7)
    assert isinstance(sub, SubTrajectoryBalance) and sub.subtb_lambda == 0.7
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("fm")
    with pytest.raises(TypeError, match="takes no options"):
        make_objective("tb", subtb_lambda=0.5)
    with pytest.raises(ValueError, match="subtb_lambda must be"):
        SubTrajectoryBalance(0.0)
    log_pf, log_z, log_f, log_r = _random_flows(seed=25)
    with pytest.raises(ValueError, match="needs the intermediate flows"):
        DetailedBalance().loss(log_pf, log_z, None, log_r)
    with pytest.raises(ValueError, match=r"log_f must be \[T, L-1\]"):
        SubTrajectoryBalance().loss(log_pf, log_z, log_f[:, :-1], log_r)
    with pytest.raises(ValueError, match="log_r must be"):
        TrajectoryBalance().loss(log_pf, log_z, None, log_r[:-1])


# ---------------------------------------------------------------- SFT / DPO / S-DPO

def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_sft_cross_entropy():
    lp = -torch.rand(4, 3, dtype=DT)
    assert torch.allclose(sft_cross_entropy(lp), -lp.sum(1).mean())
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    lp_inf = lp.masked_fill(~mask, float("-inf"))
    assert torch.allclose(sft_cross_entropy(lp_inf, mask), -(lp * mask).sum() / 4)
    with pytest.raises(ValueError, match="mask must be"):
        sft_cross_entropy(lp, mask[:2])


def test_dpo_and_sdpo_match_direct_formulas():
    g = torch.Generator().manual_seed(30)
    b, n = 5, 3
    pos, ref_pos = torch.randn(b, generator=g, dtype=DT), torch.randn(b, generator=g, dtype=DT)
    negs, ref_negs = torch.randn(b, n, generator=g, dtype=DT), torch.randn(b, n, generator=g, dtype=DT)
    beta = 0.7
    dpo = dpo_loss(pos, negs[:, 0], ref_pos, ref_negs[:, 0], beta=beta, reduction="none")
    sdpo = sdpo_loss(pos, negs, ref_pos, ref_negs, beta=beta, reduction="none")
    for i in range(b):
        margin = (pos[i] - ref_pos[i]) - (negs[i, 0] - ref_negs[i, 0])
        assert math.isclose(dpo[i].item(), -_logsig(beta * margin.item()), rel_tol=1e-12)
        s = sum(math.exp(beta * ((negs[i, j] - ref_negs[i, j]) - (pos[i] - ref_pos[i])).item()) for j in range(n))
        assert math.isclose(sdpo[i].item(), -_logsig(-math.log(s)), rel_tol=1e-12)
    assert torch.allclose(dpo_loss(pos, negs[:, 0], ref_pos, ref_negs[:, 0], beta=beta), dpo.mean())
    one = sdpo_loss(pos, negs[:, :1], ref_pos, ref_negs[:, :1], beta=beta, reduction="none")
    assert torch.allclose(one, dpo)
    # Padded negatives: masking them equals dropping them.
    mask = torch.tensor([[1, 1, 0]] * b, dtype=torch.bool)
    assert torch.allclose(sdpo_loss(pos, negs, ref_pos, ref_negs, beta, neg_mask=mask),
                          sdpo_loss(pos, negs[:, :2], ref_pos, ref_negs[:, :2], beta))
    mask[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\] have no negative"):
        sdpo_loss(pos, negs, ref_pos, ref_negs, beta, neg_mask=mask)


@pytest.mark.parametrize("beta", [0, 0.0, -0.5, float("nan"), float("inf"), -float("inf")])
def test_dpo_and_sdpo_reject_a_beta_that_is_not_positive(beta):
    pos, neg = torch.randn(3), torch.randn(3)
    for loss, negs in ((dpo_loss, neg), (sdpo_loss, neg[:, None])):
        with pytest.raises(ValueError, match=rf"{loss.__name__}: beta must be a finite number > 0.*got"):
            loss(pos, negs, torch.zeros(3), torch.zeros_like(negs), beta=beta)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        functional.dpo_loss(pos, neg, torch.zeros(3), torch.zeros(3), beta=beta)


def test_dpo_and_sdpo_take_beta_as_a_number():
    pos, neg = torch.randn(3), torch.randn(3)
    want = dpo_loss(pos, neg, torch.zeros(3), torch.zeros(3), beta=0.5)
    assert torch.equal(dpo_loss(pos, neg, torch.zeros(3), torch.zeros(3), beta=torch.tensor(0.5)), want)
    assert torch.equal(sdpo_loss(pos, neg[:, None], torch.zeros(3), torch.zeros(3, 1), beta=1),
                       sdpo_loss(pos, neg[:, None], torch.zeros(3), torch.zeros(3, 1), beta=1.0))
    for bad in ("0.5", True, None, torch.tensor([0.5, 1.0])):
        with pytest.raises(TypeError, match="dpo_loss: beta must be a real number > 0"):
            dpo_loss(pos, neg, torch.zeros(3), torch.zeros(3), beta=bad)


def test_preference_losses_are_stable_and_do_not_train_the_reference():
    big = torch.tensor([3e4, -3e4], dtype=torch.float32)
    zero = torch.zeros(2)
    dpo = dpo_loss(big, -big, zero, zero, beta=1.0, reduction="none")
    assert torch.isfinite(dpo).all() and dpo[0] == 0 and torch.isclose(dpo[1], torch.tensor(6e4))
    sd = sdpo_loss(big, torch.stack([-big, -big], 1), zero, torch.zeros(2, 2), reduction="none")
    assert torch.isfinite(sd).all()
    pos = torch.randn(3, requires_grad=True)
    ref = torch.randn(3, requires_grad=True)
    dpo_loss(pos, torch.randn(3), ref, torch.randn(3)).backward()
    assert pos.grad is not None and ref.grad is None


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("objective", ["tb", "db", "subtb"])
def test_gradcheck_trie_support(objective):
    codes, trie = _catalogue(seed=40, n_items=5)
    h, w, b = _random_inputs(5, CPL, d=3, seed=41)
    g = torch.Generator().manual_seed(42)
    log_f = torch.randn(5, len(CPL) - 1, generator=g, dtype=DT)
    log_z, log_r = torch.randn(5, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    wts = torch.rand(5, generator=g, dtype=DT)
    leaves = [x.clone().requires_grad_() for x in (h, w, b, log_f, log_z)]

    def fn(h_, w_, b_, f_, z_):
        return gfn_loss_reference(h_, w_, codes, trie, f_, z_, log_r, objective=objective, weights=wts,
                                  bias=b_)[0]
    assert torch.autograd.gradcheck(fn, leaves)
    fn(*leaves).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in leaves[:3])


def test_gradcheck_level_and_vocab_supports():
    codes, trie = _catalogue(seed=43, n_items=4)
    h, w, _ = _random_inputs(4, CPL, d=3, seed=44)
    g = torch.Generator().manual_seed(45)
    w_full = torch.randn(12, 3, generator=g, dtype=DT)
    sid_tok = torch.randperm(12, generator=g)[:sum(CPL)]
    log_z, log_r = torch.randn(4, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    assert torch.autograd.gradcheck(
        lambda h_, w_: gfn_loss_reference(h_, w_, codes, None, None, log_z, log_r, support="level",
                                          codes_per_level=CPL)[0],
        (h.clone().requires_grad_(), w.clone().requires_grad_()))
    assert torch.autograd.gradcheck(
        lambda h_, wf_: gfn_loss_reference(h_, None, codes, None, None, log_z, log_r, support="vocab",
                                           codes_per_level=CPL, w_full=wf_, sid_token_ids=sid_tok)[0],
        (h.clone().requires_grad_(), w_full.clone().requires_grad_()))


# ---------------------------------------------------------------- dispatcher

def _dispatch_inputs():
    codes, trie = _catalogue(seed=50, n_items=6)
    h, w, _ = _random_inputs(6, CPL, seed=51)
    g = torch.Generator().manual_seed(52)
    return (h, w, codes, trie, torch.randn(6, 2, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT),
            torch.randn(6, generator=g, dtype=DT))


@pytest.fixture
def empty_registry(monkeypatch):
    """The dispatcher with no accelerated implementation registered (providers imported beforehand so they
    do not register into the temporary registry)."""
    for op in ("gfn_loss", "constrained_log_pf"):
        entry = backends._op(op)
        monkeypatch.setattr(entry, "impls", {"torch": entry.impls["torch"]})


def test_dispatcher_keeps_cpu_tensors_on_the_reference():
    args = _dispatch_inputs()
    out = gfn_loss(*args, objective="tb")
    assert out.backend == "torch"
    assert torch.equal(out.loss, gfn_loss_reference(*args)[0])


def test_dispatcher_runs_reference_on_cpu_and_says_so(empty_registry):
    args = _dispatch_inputs()
    out = gfn_loss(*args, objective="db")
    ref_loss, ref_lp = gfn_loss_reference(*args, objective="db")
    assert out.backend == "torch"
    assert torch.equal(out.loss, ref_loss) and torch.equal(out.log_pf, ref_lp)
    assert gfn_loss(*args, backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        gfn_loss(*args, backend="jax")


def test_dispatcher_prefers_registered_backend_and_falls_back(empty_registry, monkeypatch):
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch", "cpp"))
    calls = []

    def fake(h, w_sid, codes, trie, log_f, log_z, log_r, *, objective, **kw):
        calls.append(objective.name)
        return gfn_loss_reference(h, w_sid, codes, trie, log_f, log_z, log_r, objective, **kw)

    backends.register("gfn_loss", "cpp", fake, ("cpu",),
                      supports=lambda objective, support, **kw: support == "trie")
    args = _dispatch_inputs()
    assert gfn_loss(*args, objective="subtb").backend == "cpp" and calls == ["subtb"]
    assert gfn_loss(*args, support="level").backend == "torch"
    # A named backend that cannot run the call falls back to the auto choice, and the reason says why.
    assert gfn_loss(*args, support="level", backend="cpp").backend == "torch"
    assert "does not implement support='level'" in backends.last_resolution("gfn_loss").reason
    assert gfn_loss(*args, backend="cuda").backend == "cpp" and calls == ["subtb", "tb"]
    reason = backends.last_resolution("gfn_loss").reason
    assert reason.startswith("'cuda' requested but gfn_loss has no 'cuda' implementation") and "chose 'cpp'" in reason
    with pytest.raises(ValueError, match="the 'torch' backend is the op's reference"):
        backends.register("gfn_loss", "torch", fake, ("cpu",))


@pytest.mark.parametrize("backend", backends.REQUESTS)
def test_every_backend_name_runs_gfn_loss_and_constrained_log_pf_on_cpu(backend):
    """A training run may name any backend: ops without it (gfn_loss has no cpp / cuda implementation; no CUDA
    here) run the auto choice and match the reference."""
    h, w, codes, trie, log_f, log_z, log_r = _dispatch_inputs()
    h = h.float().requires_grad_()
    w, log_f, log_z, log_r = w.float(), log_f.float(), log_z.float(), log_r.float()
    out = gfn_loss(h, w, codes, trie, log_f, log_z, log_r, "db", backend=backend)
    ref_loss, ref_lp = gfn_loss_reference(h.double(), w.double(), codes, trie, log_f.double(), log_z.double(),
                                          log_r.double(), "db")
    expected = backend if backend == "torch" or (backend == "triton" and "triton" in backends.available_backends()) \
        else "torch"
    assert out.backend == expected
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_pf.double(), ref_lp, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    lp = constrained_log_pf(h.detach(), w, codes, trie, backend=backend)
    assert backends.last_resolution("constrained_log_pf").name == expected
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-6)


def test_autocast_casts_the_reference_operands_too():
    """One autocast rule for every backend: under bf16 autocast the reference gets bf16 h / head rows / bias."""
    h, w, codes, trie, log_f, log_z, log_r = _dispatch_inputs()
    h, w, log_f, log_z, log_r = h.float(), w.float(), log_f.float(), log_z.float(), log_r.float()
    bias = torch.randn(sum(CPL), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gfn_loss(h, w, codes, trie, log_f, log_z, log_r, "tb", bias=bias, backend="torch")
        lp = constrained_log_pf(h, w, codes, trie, bias=bias, backend="torch")
    expected = constrained_log_pf(h.bfloat16(), w.bfloat16(), codes, trie, bias=bias.bfloat16())
    assert torch.equal(out.log_pf, expected) and torch.equal(lp, expected)
    ref = constrained_log_pf(h, w, codes, trie, bias=bias)
    assert float((lp - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    assert autocast_operands("cpu", h, None, codes) == (h, None, codes)  # autocast off: as is


# ---------------------------------------------------------------- real catalogue

def test_beauty_catalogue_trie_support():
    index = DATA / "letter" / "Beauty" / "Beauty.index.json"
    if not index.exists():
        pytest.skip(f"{index} absent (set GFLOWGR_DATA to the shared data folder)")
    sids = json.loads(index.read_text())
    codes = torch.tensor([[int(tok.strip("<>").split("_")[1]) for tok in sid] for sid in sids.values()])
    cpl = (256, 256, 256, 256)
    trie = Trie.build(codes, cpl)
    g = torch.Generator().manual_seed(60)
    rows = codes[torch.randint(0, codes.shape[0], (64,), generator=g)]
    h = torch.randn(64, 4, 16, generator=g)
    w = torch.randn(sum(cpl), 16, generator=g)
    trie_lp = constrained_log_pf(h, w, rows, trie)
    level_lp = constrained_log_pf(h, w, rows, trie, "level")
    assert torch.isfinite(trie_lp).all() and (trie_lp >= level_lp - 1e-5).all()
    # Deep levels of a 12k-item trie have few children: there the constrained policy is far more peaked.
    assert (trie_lp[:, 3] - level_lp[:, 3]).mean() > 2.0
