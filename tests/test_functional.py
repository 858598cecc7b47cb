"""The functional API equals the library's implementations and the direct formulas on small cases."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

import gflowgr_core.functional as F
from gflowgr_core.decoding import beam_search
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm
from gflowgr_core.objectives import (DetailedBalance, SubTrajectoryBalance, TrajectoryBalance, constrained_log_pf,
                                     dpo_loss, gfn_loss, sdpo_loss, sft_cross_entropy)
from gflowgr_core.sid.tokens import SIDTokenMap
from gflowgr_core.sid.trie import Trie


def catalogue(seed=0, cpl=(4, 3, 5), n=25):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, (n,), generator=g) for k in cpl], dim=1)
    return codes, Trie.build(codes, cpl)


def flows(T=6, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(T, L, generator=g) * 3, torch.randn(T, generator=g), torch.randn(T, L - 1, generator=g),
            torch.randn(T, generator=g), torch.rand(T, generator=g) * 2)


# ------------------------------------------------------------------------------------------ balance losses
def test_trajectory_balance():
    log_pf, log_z, _, log_r, w = flows()
    direct = (log_z + log_pf.sum(1) - log_r) ** 2
    torch.testing.assert_close(F.trajectory_balance(log_pf, log_z, log_r), direct.mean())
    torch.testing.assert_close(F.trajectory_balance(log_pf, log_z, log_r),
                               TrajectoryBalance().loss(log_pf, log_z, None, log_r))
    torch.testing.assert_close(F.trajectory_balance(log_pf, log_z, log_r, w), (w * direct).sum() / len(w))
    torch.testing.assert_close(F.trajectory_balance(log_pf, log_z, log_r, w, reduction="none"), w * direct)
    torch.testing.assert_close(F.trajectory_balance(log_pf, log_z, log_r, reduction="sum"), direct.sum())
    with pytest.raises(ValueError, match="non-negative"):
        F.trajectory_balance(log_pf, log_z, log_r, -w, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        F.trajectory_balance(log_pf, log_z, log_r, reduction="avg")


def test_detailed_balance():
    log_pf, log_z, log_f, log_r, w = flows(seed=1)
    states = torch.cat([log_z[:, None], log_f, log_r[:, None]], 1)
    direct = sum((states[:, l] + log_pf[:, l] - states[:, l + 1]) ** 2 for l in range(3))
    torch.testing.assert_close(F.detailed_balance(log_pf, log_z, log_f, log_r), direct.mean())
    torch.testing.assert_close(F.detailed_balance(log_pf, log_z, log_f, log_r, w),
                               DetailedBalance().loss(log_pf, log_z, log_f, log_r, w))
    torch.testing.assert_close(F.detailed_balance(log_pf, log_z, log_f, log_r, reduction="none"), direct)


def test_subtrajectory_balance():
    log_pf, log_z, log_f, log_r, w = flows(seed=2)
    lam = 0.7
    states = torch.cat([log_z[:, None], log_f, log_r[:, None]], 1)
    num, den = 0.0, 0.0
    for i, j in itertools.combinations(range(4), 2):
        delta = states[:, i] + log_pf[:, i:j].sum(1) - states[:, j]
        num = num + lam ** (j - i) * delta ** 2
        den += lam ** (j - i)
    direct = num / den
    torch.testing.assert_close(F.subtrajectory_balance(log_pf, log_z, log_f, log_r, lam), direct.mean())
    torch.testing.assert_close(F.subtrajectory_balance(log_pf, log_z, log_f, log_r, lam, w),
                               SubTrajectoryBalance(lam).loss(log_pf, log_z, log_f, log_r, w))
    torch.testing.assert_close(F.subtrajectory_balance(log_pf, log_z, log_f, log_r, lam, reduction="none"), direct)


# ------------------------------------------------------------------------------------------ log P_F
def children(codes, prefix):
    return sorted({c[len(prefix)] for c in codes.tolist() if tuple(c[:len(prefix)]) == tuple(prefix)})


@pytest.mark.parametrize("support", ["trie", "level"])
def test_constrained_log_pf(support):
    codes, trie = catalogue(seed=3)
    g = torch.Generator().manual_seed(3)
    T, d = 7, 8
    h = torch.randn(T, 3, d, generator=g, requires_grad=True)
    w = torch.randn(12, d, generator=g)
    bias = torch.randn(12, generator=g)
    traj = codes[torch.randint(0, len(codes), (T,), generator=g)]
    got = F.constrained_log_pf(h, w, traj, trie, support, bias=bias)
    torch.testing.assert_close(got, constrained_log_pf(h, w, traj, trie, support, bias=bias))
    offsets = [0, 4, 7, 12]
    for t in range(T):
        for l in range(3):
            z = h[t, l] @ w[offsets[l]:offsets[l + 1]].t() + bias[offsets[l]:offsets[l + 1]]
            allowed = children(codes, traj[t, :l].tolist()) if support == "trie" else list(range(len(z)))
            expect = z[traj[t, l]] - torch.logsumexp(z[allowed], 0)
            torch.testing.assert_close(got[t, l], expect)
    got.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_constrained_log_pf_vocab_and_backends():
    codes, trie = catalogue(seed=4)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(5, 3, 8, generator=g)
    w_full = torch.randn(20, 8, generator=g)
    sid_ids = torch.arange(4, 16)
    traj = codes[:5]
    got = F.constrained_log_pf(h, None, traj, trie, "vocab", w_full=w_full, sid_token_ids=sid_ids)
    torch.testing.assert_close(got, torch.log_softmax(h @ w_full.t(), -1).gather(
        2, (sid_ids[torch.tensor([0, 4, 7]) + traj])[:, :, None]).squeeze(2))
    # CPU tensors stay on the reference under "auto", and under the backends this op has none of here:
    # bitwise equal to it
    w_sid = w_full[4:16]
    for backend in ("auto", "cpp", "cuda"):
        got = F.constrained_log_pf(h, w_sid, traj, trie, backend=backend)
        assert torch.equal(got, constrained_log_pf(h, w_sid, traj, trie)), backend
    with pytest.raises(ValueError, match="unknown backend"):
        F.constrained_log_pf(h, w_sid, traj, trie, backend="jax")


def test_constrained_log_pf_triton_matches_reference():
    from gflowgr_core import backends
    if "triton" not in backends.available_backends():
        pytest.skip("triton cannot run here (not installed, or no GPU and TRITON_INTERPRET unset)")
    codes, trie = catalogue(seed=5)
    g = torch.Generator().manual_seed(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    trie = trie.to(dev)
    h = torch.randn(4, 3, 16, generator=g).to(dev)
    w = torch.randn(12, 16, generator=g).to(dev)
    traj = codes[:4].to(dev)
    torch.testing.assert_close(F.constrained_log_pf(h, w, traj, trie, backend="triton"),
                               constrained_log_pf(h, w, traj, trie), rtol=1e-5, atol=1e-5)


def test_gfn_loss_equals_dispatcher():
    codes, trie = catalogue(seed=6)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(6, 3, 8, generator=g)
    w = torch.randn(12, 8, generator=g)
    _, log_z, log_f, log_r, _ = flows(seed=6)
    traj = codes[:6]
    for objective in ("tb", "db", "subtb"):
        ours = F.gfn_loss(h, w, traj, trie, log_f, log_z, log_r, objective)
        ref = gfn_loss(h, w, traj, trie, log_f, log_z, log_r, objective)
        torch.testing.assert_close(ours.loss, ref.loss)
    tb = F.gfn_loss(h, w, traj, trie, None, log_z, log_r, "tb")
    torch.testing.assert_close(tb.loss, F.trajectory_balance(F.constrained_log_pf(h, w, traj, trie), log_z, log_r))


# ------------------------------------------------------------------------------------------ SFT / preference
def test_sft_dpo_sdpo():
    g = torch.Generator().manual_seed(7)
    B, N, L = 4, 3, 3
    pos, ref_pos = -torch.rand(B, L, generator=g), -torch.rand(B, L, generator=g)
    negs, ref_negs = -torch.rand(B, N, L, generator=g), -torch.rand(B, N, L, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    torch.testing.assert_close(F.sft_cross_entropy(pos), -pos.sum(1).mean())
    torch.testing.assert_close(F.sft_cross_entropy(pos, mask), sft_cross_entropy(pos, mask))
    beta = 0.5
    margin = (pos.sum(1) - ref_pos.sum(1)) - (negs[:, 0].sum(1) - ref_negs[:, 0].sum(1))
    direct = -torch.nn.functional.logsigmoid(beta * margin)
    torch.testing.assert_close(F.dpo_loss(pos, negs[:, 0], ref_pos, ref_negs[:, 0], beta), direct.mean())
    torch.testing.assert_close(F.dpo_loss(pos.sum(1), negs[:, 0].sum(1), ref_pos.sum(1), ref_negs[:, 0].sum(1),
                                          beta, "none"), direct)
    # S-DPO with one negative is DPO; with several it matches the library and the formula.
    torch.testing.assert_close(F.sdpo_loss(pos, negs[:, :1], ref_pos, ref_negs[:, :1], beta), direct.mean())
    diff = beta * ((negs.sum(2) - ref_negs.sum(2)) - (pos.sum(1) - ref_pos.sum(1))[:, None])
    sd = -torch.nn.functional.logsigmoid(-torch.logsumexp(diff, 1))
    torch.testing.assert_close(F.sdpo_loss(pos, negs, ref_pos, ref_negs, beta), sd.mean())
    torch.testing.assert_close(F.sdpo_loss(pos, negs, ref_pos, ref_negs, beta),
                               sdpo_loss(pos.sum(1), negs.sum(2), ref_pos.sum(1), ref_negs.sum(2), beta))
    with pytest.raises(ValueError, match="logp_negs must be"):
        F.sdpo_loss(pos, negs[:, :, :, None], ref_pos, ref_negs, beta)


# ------------------------------------------------------------------------------------------ building blocks
def test_build_trie():
    codes, trie = catalogue(seed=8)
    built = F.build_trie(codes, (4, 3, 5))
    for name in ("level_offsets", "parent", "node_code", "indptr", "leaf_ptr", "leaf_items", "item_leaf"):
        assert torch.equal(getattr(built, name), getattr(trie, name))
    inferred = F.build_trie(codes)
    assert inferred.codes_per_level == tuple(int(m) + 1 for m in codes.max(0).values)
    with pytest.raises(ValueError, match="non-empty"):
        F.build_trie(torch.zeros(0, 3, dtype=torch.long))


def test_sid_head_rows_and_decision_hidden_reproduce_model_logits():
    tokens = SIDTokenMap.from_scratch((4, 3, 5))
    model = build_tiny_causal_lm(tokens.vocab_size, hidden=16, layers=1, heads=2).eval()
    w_sid, bias = F.sid_head_rows(model, tokens)
    assert torch.equal(w_sid, model.lm_head.weight[tokens.sid_token_ids]) and bias is None
    codes, trie = catalogue(seed=9)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(4, tokens.vocab_size, (3, 5), generator=g)
    seq = torch.cat([prompt, tokens.encode(codes[:3])], 1)
    with torch.no_grad():
        out = model(seq, output_hidden_states=True)
    h = F.decision_hidden(out.hidden_states[-1], 5, 3)
    logits = out.logits[:, 4:7]
    offsets = [0, 4, 7, 12]
    for l in range(3):
        torch.testing.assert_close(h[:, l] @ w_sid[offsets[l]:offsets[l + 1]].t(),
                                   logits[:, l, tokens.level_token_ids[l]], rtol=1e-5, atol=1e-5)
    # Per-row start positions.
    h2 = F.decision_hidden(out.hidden_states[-1], torch.tensor([5, 4, 1]), 3)
    assert torch.equal(h2[1], out.hidden_states[-1][1, 3:6]) and torch.equal(h2[2], out.hidden_states[-1][2, 0:3])
    with pytest.raises(ValueError, match="sid_start needs"):
        F.decision_hidden(out.hidden_states[-1], 0, 3)


@pytest.mark.parametrize("tied", [True, False])
def test_sid_head_rows_t5_reproduce_decoder_logits(tied):
    """T5 variants that rescale the decoder output before the head: h @ w_sid.T still equals the logits."""
    tokens = SIDTokenMap.from_scratch((4, 3, 5))
    model = T5ForConditionalGeneration(T5Config(vocab_size=tokens.vocab_size, d_model=16, d_ff=16, d_kv=4,
                                                num_layers=1, num_heads=2, tie_word_embeddings=tied)).eval()
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(4, tokens.vocab_size, (2, 6), generator=g)
    dec = torch.randint(4, tokens.vocab_size, (2, 3), generator=g)
    with torch.no_grad():
        out = model(input_ids=enc, decoder_input_ids=dec, output_hidden_states=True)
        h = model.decoder(input_ids=dec, encoder_hidden_states=out.encoder_last_hidden_state).last_hidden_state
    w_sid, bias = F.sid_head_rows(model, tokens)
    torch.testing.assert_close(h @ w_sid.t(), out.logits[..., tokens.sid_token_ids], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ beam search
def policy_and_data(seed=10):
    codes, trie = catalogue(seed=seed, cpl=(4, 3, 5), n=30)
    tokens = SIDTokenMap.from_scratch((4, 3, 5))
    model = build_tiny_causal_lm(tokens.vocab_size, hidden=16, layers=2, heads=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    policy = SIDPolicy(model, tokens, codes).eval()
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 30, (3, 4), generator=g)
    history[0, :2] = -1
    return codes, trie, tokens, policy, history


def policy_step(policy, history):
    """A KV-cached step function over a SIDPolicy, driven only by (level, prefix, parent)."""
    state = {}

    def step(level, prefix, parent):
        if level == 0:
            state["s"] = policy.encode_prompt(history)
        else:
            s = policy.reorder_state(state["s"], parent)
            state["s"] = policy.extend_codes(s, prefix[:, -1], level - 1)
        return state["s"].last_hidden
    return step


@pytest.mark.parametrize("beams", [1, 3, 8])
def test_step_beam_search_equals_library_beam_search(beams):
    codes, trie, tokens, policy, history = policy_and_data()
    with torch.no_grad():
        out = F.constrained_beam_search(policy_step(policy, history), trie, beams=beams, batch_size=3,
                                        w_sid=policy.sid_head_weight(), bias=policy.head_bias())
        ref = beam_search(policy, trie, history, beams=beams)
    assert torch.equal(out.leaves, ref.leaves)
    torch.testing.assert_close(out.scores, ref.leaf_scores)
    assert torch.equal(out.codes, trie.leaf_sid(out.leaves))


def test_exhaustive_beam_search_is_exact():
    """With beams >= #SIDs the search enumerates every SID, scored by the sum of constrained log P_F."""
    codes, trie, tokens, policy, history = policy_and_data(seed=11)
    beams = trie.num_leaves + 3
    with torch.no_grad():
        out = F.constrained_beam_search(policy_step(policy, history), trie, beams=beams, batch_size=3,
                                        w_sid=policy.sid_head_weight())
        leaf_codes = trie.leaf_sid(torch.arange(trie.level_offsets[3], trie.num_nodes))  # every SID
        n = len(leaf_codes)
        h, _, _ = policy.trajectory_hidden(history, leaf_codes[None].expand(3, n, 3))
        lp = F.constrained_log_pf(h.reshape(3 * n, 3, -1), policy.sid_head_weight(),
                                     leaf_codes.repeat(3, 1), trie).sum(1).reshape(3, n)
    for b in range(3):
        expect, order = torch.sort(lp[b], descending=True, stable=True)
        torch.testing.assert_close(out.scores[b, :n], expect, rtol=1e-4, atol=1e-4)
        assert set(map(tuple, out.codes[b, :n].tolist())) == set(map(tuple, leaf_codes.tolist()))
        assert bool(torch.isinf(out.scores[b, n:]).all()) and bool((out.codes[b, n:] == -1).all())
        assert math.isclose(float(torch.logsumexp(out.scores[b, :n], 0)), 0.0, abs_tol=1e-4)


def test_hf_model_beam_search_matches_step_search():
    codes, trie, tokens, policy, history = policy_and_data(seed=12)
    ids, mask, _ = policy.build_prompt(history)
    beams = 6
    with torch.no_grad():
        hf = F.constrained_beam_search(policy.model, trie, beams=beams, input_ids=ids, attention_mask=mask,
                                       tokens=tokens)
        ours = F.constrained_beam_search(policy_step(policy, history), trie, beams=beams, batch_size=3,
                                         w_sid=policy.sid_head_weight())
    assert torch.equal(hf.codes, ours.codes)
    assert torch.equal(hf.leaves, ours.leaves)
    torch.testing.assert_close(hf.scores, ours.scores, rtol=1e-4, atol=1e-4)


def test_beam_search_argument_errors():
    codes, trie, tokens, policy, history = policy_and_data()
    step = policy_step(policy, history)
    with pytest.raises(ValueError, match="w_sid"):
        F.constrained_beam_search(step, trie, beams=2)
    with pytest.raises(ValueError, match=r"expected \[3, 16\]"):
        F.constrained_beam_search(lambda level, p, parent: torch.zeros(3, 5), trie, beams=2, batch_size=3,
                                  w_sid=policy.sid_head_weight())
    with pytest.raises(ValueError, match="input_ids"):
        F.constrained_beam_search(policy.model, trie, beams=2)
    with pytest.raises(ValueError, match="num_beams is set"):
        F.constrained_beam_search(policy.model, trie, beams=2, input_ids=history.clamp_min(0), tokens=tokens,
                                  num_beams=3)
