"""SIDPolicy: prompt layout, padding invariance, shared-prompt trajectories vs a naive recomputation,
flow heads and their gradients, LM-head SID rows, pretrained wrapping and save/load."""
import math

import pytest
import torch

from gflowgr_core.model import FlowHead, SIDPolicy, build_tiny_causal_lm
from gflowgr_core.sid.tokens import SIDTokenMap

CPL = (5, 4, 3)


def random_codes(cpl, n_items, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, k, (n_items,), generator=g) for k in cpl], dim=1)


def make_policy(cpl=CPL, n_items=12, seed=0, arch="qwen2", tie=False, hidden=32, layers=2):
    token_map = SIDTokenMap.from_scratch(cpl)
    if arch == "gpt2":
        # Absolute position embeddings: wrong position ids under left padding would show (rotary
        # attention is shift-invariant and would hide them).
        from transformers import AutoModelForCausalLM, GPT2Config

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(GPT2Config(
            vocab_size=token_map.vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64))
    else:
        model = build_tiny_causal_lm(token_map.vocab_size, hidden=hidden, layers=layers, heads=4, kv_heads=2,
                                     intermediate=64, arch=arch, seed=seed, tie_embeddings=tie)
    policy = SIDPolicy(model, token_map, random_codes(cpl, n_items, seed + 100))
    return policy.eval()


def randomize_heads(policy, seed=0):
    """Flow heads start with a zero last layer; tests of gradients through them need non-zero weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (policy.log_z_head, policy.log_f_head):
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def naive_sequence(policy, history_row, codes_row):
    """Unpadded token ids [BOS] + history SIDs + [SEP] + c_1..c_{L-1} for one user and one trajectory."""
    tm = policy.token_map
    items = [int(i) for i in history_row if int(i) >= 0]
    ids = [tm.bos_id]
    for item in items:
        ids += tm.encode(policy.item_codes[item]).tolist()
    ids.append(tm.sep_id)
    L = policy.num_levels
    for level in range(L - 1):
        ids.append(int(tm.level_token_ids[level][int(codes_row[level])]))
    return torch.tensor(ids), len(ids) - (L - 1) - 1


def naive_trajectory_hidden(policy, history, codes):
    """Per (user, trajectory) full forward without padding or cache sharing: the reference."""
    B, T, L = codes.shape
    hs = []
    for b in range(B):
        for t in range(T):
            ids, sep = naive_sequence(policy, history[b], codes[b, t])
            out = policy.backbone(input_ids=ids[None], position_ids=torch.arange(len(ids))[None])
            hs.append(out.last_hidden_state[0, sep:sep + L])
    h = torch.stack(hs).reshape(B, T, L, -1)
    return h, policy.log_z_head(h[:, 0, 0]), policy.log_f_head(h[:, :, 1:])


# ------------------------------------------------------------------------------------------ tiny LM builder
def test_tiny_lm_size_matches_tiger_scale_for_beauty_vocab():
    tm = SIDTokenMap.from_scratch([256] * 4)
    model = build_tiny_causal_lm(tm.vocab_size)
    n = sum(p.numel() for p in model.parameters())
    assert 1.2e6 < n < 1.45e6, n
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_lm_is_seeded_and_leaves_global_rng_alone(arch):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_causal_lm(50, hidden=32, layers=1, arch=arch, seed=7)
    after = torch.rand(1)
    b = build_tiny_causal_lm(50, hidden=32, layers=1, arch=arch, seed=7)
    c = build_tiny_causal_lm(50, hidden=32, layers=1, arch=arch, seed=8)
    assert torch.equal(before, after)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=30, heads=4), "divisible by heads"),
    (dict(heads=4, kv_heads=3), "divisible by kv_heads"),
    (dict(arch="gpt2"), "unknown arch"),
])
def test_tiny_lm_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_causal_lm(50, **kwargs)


# ------------------------------------------------------------------------------------------ prompt layout
def test_prompt_is_left_padded_bos_history_sep_with_holes_removed():
    policy = make_policy()
    tm = policy.token_map
    history = torch.tensor([[-1, -1, 3, 4], [1, -1, 2, -1], [-1, -1, -1, -1]])
    ids, mask, pos = policy.build_prompt(history)
    L = policy.num_levels
    assert ids.shape == (3, 2 + 2 * L)
    enc = lambda i: tm.encode(policy.item_codes[i]).tolist()  # noqa: E731
    assert ids[0].tolist() == [tm.bos_id] + enc(3) + enc(4) + [tm.sep_id]
    assert ids[1].tolist() == [tm.bos_id] + enc(1) + enc(2) + [tm.sep_id]
    assert ids[2].tolist() == [tm.pad_id] * (2 * L) + [tm.bos_id, tm.sep_id]
    assert mask[2].tolist() == [0] * (2 * L) + [1, 1]
    assert pos[2, -2:].tolist() == [0, 1] and pos[0].tolist() == list(range(2 + 2 * L))


@pytest.mark.parametrize("bad", [12, -2])
def test_prompt_rejects_out_of_range_history_naming_row_and_column(bad):
    policy = make_policy()
    history = torch.tensor([[-1, 2, 3], [1, bad, 2]])
    with pytest.raises(ValueError, match=rf"row 1, column 1: item id {bad}"):
        policy.encode_prompt(history)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_left_padding_does_not_change_hidden_states(arch):
    policy = make_policy(arch=arch)
    codes = random_codes(CPL, 6, 5).reshape(2, 3, 3)
    short = torch.tensor([[4, 7, 1], [-1, 2, 9]])
    padded = torch.cat([torch.full((2, 5), -1), short], dim=1)
    # A third, longer row changes how much padding the other rows get inside the batch.
    longer = torch.cat([padded, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])])
    codes3 = torch.cat([codes, codes[:1]])
    with torch.no_grad():
        h1, z1, f1 = policy.trajectory_hidden(short, codes)
        h2, z2, f2 = policy.trajectory_hidden(padded, codes)
        h3, z3, f3 = policy.trajectory_hidden(longer, codes3)
    for h in (h2, h3[:2]):
        torch.testing.assert_close(h, h1, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(z3[:2], z1, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(f3[:2], f1, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ trajectories
@pytest.mark.parametrize("arch, tie", [("qwen2", False), ("llama", True), ("gpt2", True)])
def test_shared_prompt_trajectories_equal_naive_recomputation(arch, tie):
    policy = make_policy(arch=arch, tie=tie)
    randomize_heads(policy)
    history = torch.tensor([[-1, -1, 3, 4], [1, 5, 2, 0], [-1, -1, -1, -1]])
    codes = random_codes(CPL, 12, 9).reshape(3, 4, 3)
    with torch.no_grad():
        h, log_z, log_f = policy.trajectory_hidden(history, codes)
        h_ref, z_ref, f_ref = naive_trajectory_hidden(policy, history, codes)
    assert h.shape == (3, 4, 3, 32) and log_z.shape == (3,) and log_f.shape == (3, 4, 2)
    torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(log_z, z_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(log_f, f_ref, atol=2e-5, rtol=1e-4)


def test_shared_prompt_gradients_equal_naive_gradients():
    policy = make_policy()
    randomize_heads(policy, seed=3)
    history = torch.tensor([[-1, 6, 3, 4], [1, 5, 2, 0]])
    codes = random_codes(CPL, 6, 4).reshape(2, 3, 3)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 3, 3, 32, generator=g)

    def grads(fn):
        policy.zero_grad(set_to_none=True)
        h, log_z, log_f = fn(policy, history, codes)
        loss = (h * weight).sum() + (log_z ** 2).sum() + (log_f * torch.arange(1.0, 3.0)).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    shared = grads(SIDPolicy.trajectory_hidden)
    naive = grads(naive_trajectory_hidden)
    assert shared.keys() == naive.keys()
    assert "log_z_head.net.0.weight" in shared and "log_f_head.net.2.weight" in shared
    assert any(n.startswith("model.") for n in shared)
    for name in shared:
        torch.testing.assert_close(shared[name], naive[name], atol=1e-4, rtol=1e-3, msg=name)
    assert float(shared["model.model.embed_tokens.weight"].abs().sum()) > 0


def test_flow_heads_start_at_init_and_get_gradients():
    token_map = SIDTokenMap.from_scratch(CPL)
    model = build_tiny_causal_lm(token_map.vocab_size, hidden=32, layers=1, heads=4)
    policy = SIDPolicy(model, token_map, random_codes(CPL, 8, 0), log_z_init=2.5, log_f_init=-1.0)
    history = torch.tensor([[0, 1], [-1, 2]])
    codes = random_codes(CPL, 4, 1).reshape(2, 2, 3)
    h, log_z, log_f = policy(history, codes)
    assert torch.allclose(log_z, torch.full((2,), 2.5)) and torch.allclose(log_f, torch.full((2, 2, 2), -1.0))
    (log_z.sum() + log_f.sum()).backward()
    for head in (policy.log_z_head, policy.log_f_head):
        assert float(head.net[2].weight.grad.abs().sum()) > 0
        assert float(head.net[2].bias.grad.abs().sum()) > 0
    ids = {id(p) for p in policy.flow_parameters()}
    assert ids == {id(p) for m in (policy.log_z_head, policy.log_f_head) for p in m.parameters()}
    assert not ids & {id(p) for p in policy.lm_parameters()}


def test_single_level_sids_need_no_code_forward():
    policy = make_policy(cpl=(7,), n_items=5)
    h, log_z, log_f = policy.trajectory_hidden(torch.tensor([[0, 1]]), torch.tensor([[[3], [5]]]))
    assert h.shape == (1, 2, 1, 32) and log_f.shape == (1, 2, 0)
    torch.testing.assert_close(h[0, 0, 0], h[0, 1, 0])


def test_trajectory_codes_are_validated():
    policy = make_policy()
    history = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"codes\[0, 1\] has code 4 at level 1"):
        policy.trajectory_hidden(history, torch.tensor([[[0, 0, 0], [1, 4, 0]]]))
    with pytest.raises(ValueError, match="B, T, 3"):
        policy.trajectory_hidden(history, torch.zeros(1, 2, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------ LM-head rows
def test_sid_logits_equal_full_vocabulary_logits_at_sid_rows():
    policy = make_policy()
    history = torch.tensor([[-1, 2, 3], [4, 5, 6]])
    codes = random_codes(CPL, 2, 3).reshape(2, 1, 3)
    with torch.no_grad():
        h, _, _ = policy.trajectory_hidden(history, codes)
        full = policy.model.lm_head(h)
        for level in range(3):
            ids = policy.token_map.level_token_ids[level]
            torch.testing.assert_close(policy.sid_logits(h, level), full[..., ids])
    w = policy.sid_head_weight()
    assert w.shape == (sum(CPL), 32)
    assert w.data_ptr() == policy.model.lm_head.weight[4].data_ptr()  # a view, not a copy
    assert policy.head_bias() is None and policy.level_head_bias(0) is None
    assert policy.full_head_weight() is policy.model.lm_head.weight


def test_sid_head_weight_gradient_reaches_only_sid_rows():
    policy = make_policy()
    policy.sid_head_weight().sum().backward()
    grad = policy.model.lm_head.weight.grad
    assert torch.all(grad[4:] == 1) and torch.all(grad[:4] == 0)


def test_non_contiguous_sid_tokens_are_gathered():
    cpl = (3, 2)
    ids = [torch.tensor([9, 4, 7]), torch.tensor([5, 11])]
    token_map = SIDTokenMap(codes_per_level=cpl, level_token_ids=ids, vocab_size=12, pad_id=0, bos_id=1,
                            eos_id=2, sep_id=3, kind="pretrained")
    model = build_tiny_causal_lm(12, hidden=16, layers=1, heads=2)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(12))
    policy = SIDPolicy(model, token_map, random_codes(cpl, 4, 0))
    w = model.lm_head.weight
    torch.testing.assert_close(policy.sid_head_weight(), w[[9, 4, 7, 5, 11]])
    torch.testing.assert_close(policy.level_head_weight(1), w[[5, 11]])
    torch.testing.assert_close(policy.head_bias(), model.lm_head.bias[[9, 4, 7, 5, 11]])
    h = torch.randn(3, 16)
    torch.testing.assert_close(policy.sid_logits(h, 0), model.lm_head(h)[:, [9, 4, 7]])


def test_policy_rejects_inconsistent_inputs():
    token_map = SIDTokenMap.from_scratch(CPL)
    model = build_tiny_causal_lm(token_map.vocab_size, hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="item 2 has code 7 at level 0"):
        SIDPolicy(model, token_map, torch.tensor([[0, 0, 0], [1, 1, 1], [7, 0, 0]]))
    with pytest.raises(ValueError, match="disagrees"):
        SIDPolicy(model, token_map, random_codes(CPL, 3, 0), codes_per_level=(5, 4, 4))
    small = build_tiny_causal_lm(token_map.vocab_size - 1, hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="resize"):
        SIDPolicy(small, token_map, random_codes(CPL, 3, 0))


# ------------------------------------------------------------------------------------------ pretrained
def save_tiny_pretrained(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "hello": 4, "world": 5, "shop": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                     eos_token="[EOS]", unk_token="[UNK]")
    hf_tok.save_pretrained(directory)
    build_tiny_causal_lm(len(vocab), hidden=32, layers=2, heads=4, seed=3).save_pretrained(directory)


def test_from_pretrained_adds_sid_tokens_and_resizes(tmp_path):
    save_tiny_pretrained(tmp_path / "base")
    codes = random_codes(CPL, 9, 2)
    policy = SIDPolicy.from_pretrained(tmp_path / "base", CPL, codes).eval()
    tm = policy.token_map
    assert tm.kind == "pretrained" and tm.bos_id == 1 and tm.num_sid_tokens == sum(CPL)
    assert policy.model.get_input_embeddings().weight.shape[0] >= tm.vocab_size > 7
    assert policy.tokenizer.convert_tokens_to_ids("<b_3>") == int(tm.level_token_ids[1][3])
    history = torch.tensor([[-1, 0, 8], [3, 4, 5]])
    traj = random_codes(CPL, 4, 6).reshape(2, 2, 3)
    with torch.no_grad():
        h, log_z, log_f = policy.trajectory_hidden(history, traj)
        h_ref, _, _ = naive_trajectory_hidden(policy, history, traj)
        torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=1e-4)
        full = policy.model.lm_head(h)
        torch.testing.assert_close(policy.sid_logits(h, 2), full[..., tm.level_token_ids[2]])


def test_save_and_load_round_trip(tmp_path):
    save_tiny_pretrained(tmp_path / "base")
    policy = SIDPolicy.from_pretrained(tmp_path / "base", CPL, random_codes(CPL, 9, 2)).eval()
    randomize_heads(policy, seed=5)
    policy.save(tmp_path / "ckpt")
    loaded = SIDPolicy.load(tmp_path / "ckpt").eval()
    assert torch.equal(loaded.item_codes, policy.item_codes)
    assert loaded.token_map.to_dict() == policy.token_map.to_dict()
    history = torch.tensor([[2, 1, 0]])
    traj = random_codes(CPL, 3, 1).reshape(1, 3, 3)
    with torch.no_grad():
        a = policy.trajectory_hidden(history, traj)
        b = loaded.trajectory_hidden(history, traj)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    with pytest.raises(FileNotFoundError, match="policy.json"):
        SIDPolicy.load(tmp_path / "base")


def test_flow_head_shapes():
    head = FlowHead(8, hidden=4, init=math.log(3.0))
    out = head(torch.randn(2, 5, 8))
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, torch.full((2, 5), math.log(3.0)))


def test_flow_heads_run_in_fp32_under_bf16_autocast():
    """Under a bf16 autocast (CPU here; CUDA in training) the LM computes in bf16 but log Z / log F come out of
    fp32 heads: the same values as the heads applied outside autocast to the bf16 hidden states cast up."""
    head = FlowHead(16, hidden=8)
    randomize = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=randomize))
    h = torch.randn(3, 5, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(h)
        assert torch.nn.Linear(16, 1)(h.float()).dtype == torch.bfloat16  # autocast is really on
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(h.float()), rtol=0, atol=0)

    policy = make_policy()
    randomize_heads(policy, seed=2)
    history = torch.tensor([[0, 3, -1, 5], [-1, -1, 2, 7]])
    codes = policy.item_codes[torch.tensor([[1, 4, 0], [9, 2, 11]])]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for packing in (False, True):
            _, log_z, log_f = policy(history, codes, torch.tensor([0, 1]), packing=packing)
            assert log_z.dtype == torch.float32 and log_f.dtype == torch.float32, packing
    # Outside autocast nothing changes: fp32 in, fp32 out.
    with torch.no_grad():
        _, log_z32, log_f32 = policy(history, codes)
    assert log_z32.dtype == torch.float32 and log_f32.dtype == torch.float32
