"""Block-sparse packed attention and the last layer's MLP on read rows against their dense references."""
from __future__ import annotations

import pytest
import torch

from gflowgr_core.model.block_attention import (ATTENTION_NAME, UNSUPPORTED_KWARGS, _hf_attention, block_plan,
                                                block_sparse_attention, dense_masked_attention, use_block_sparse)
from gflowgr_core.model.packing import PackingUnsupported
from gflowgr_core.model.policy import build_tiny_causal_lm
from gflowgr_core.model.read_rows import last_mlp, mlp_on_read_rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _packed_mask(rows: int, length: int, seed: int) -> torch.Tensor:
    """Random block-diagonal rows of causal segments in which some queries skip parts of their segment (as an
    example's branch skips other examples' tokens), plus padding that sees only itself."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.zeros(rows, length, length, dtype=torch.bool)
    for r in range(rows):
        start = 0
        while start < length - 3:
            n = int(torch.randint(3, max(4, length // 2), (1,), generator=g))
            n = min(n, length - start)
            seg = torch.ones(n, n, dtype=torch.bool).tril()
            seg &= torch.rand(n, n, generator=g) > 0.3
            seg |= torch.eye(n, dtype=torch.bool)
            allowed[r, start:start + n, start:start + n] = seg
            start += n
        idx = torch.arange(start, length)
        allowed[r, idx, idx] = True
    return allowed


@pytest.mark.parametrize("length,tile", [(64, 16), (50, 16), (40, 32), (33, 8)])
@pytest.mark.parametrize("additive", [False, True])
def test_block_sparse_equals_dense_forward_and_gradients(length, tile, additive):
    allowed = _packed_mask(3, length, seed=length + tile)
    plan = block_plan(allowed, tile, additive_dtype=torch.float32 if additive else None)
    assert plan.computed_tiles < plan.dense_tiles                    # something is actually skipped
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, length, 8, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(3, 2, length, 8, generator=g)
    results = []
    for fn in (lambda: dense_masked_attention(q, k, v, allowed, scale=0.3),
               lambda: block_sparse_attention(q, k, v, plan, scale=0.3)):
        for x in (q, k, v):
            x.grad = None
        out = fn()
        (out * w).sum().backward()
        results.append((out.detach(), *(x.grad.clone() for x in (q, k, v))))
    for ref, got, what in zip(results[0], results[1], ("out", "dq", "dk", "dv")):
        assert got.shape == ref.shape
        assert _rel(got, ref) <= 1e-5, what


def test_plan_rejects_bad_masks():
    with pytest.raises(ValueError, match="square boolean"):
        block_plan(torch.ones(2, 4, 5, dtype=torch.bool))
    blind = torch.eye(6, dtype=torch.bool)[None].repeat(2, 1, 1)
    blind[1, 4, 4] = False
    with pytest.raises(ValueError, match="query 4 of row 1 sees no key"):
        block_plan(blind)
    plan = block_plan(torch.eye(6, dtype=torch.bool)[None], tile=4)
    with pytest.raises(ValueError, match="do not match a plan of 1 rows of 6 tokens"):
        block_sparse_attention(*(torch.randn(2, 1, 6, 4) for _ in range(3)), plan)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_decoder_routes_through_the_plan_and_restores_its_attention(arch):
    """With grouped-query heads, as in the models the policy wraps; outside the block the model's own
    implementation is back, also after an error inside."""
    model = build_tiny_causal_lm(40, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, arch=arch)
    allowed = _packed_mask(2, 24, seed=3)
    ids = torch.randint(3, 40, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).repeat(2, 1)
    ref = model.base_model(input_ids=ids, attention_mask=allowed[:, None], position_ids=pos).last_hidden_state
    with use_block_sparse(model):
        assert model.config._attn_implementation == ATTENTION_NAME
        got = model.base_model(input_ids=ids, attention_mask=allowed[:, None], position_ids=pos,
                               block_plan=block_plan(allowed, 8)).last_hidden_state
    assert model.config._attn_implementation == "sdpa"
    assert _rel(got, ref) <= 1e-5
    with pytest.raises(RuntimeError, match="without a block_plan"):
        with use_block_sparse(model):
            model.base_model(input_ids=ids, attention_mask=allowed[:, None], position_ids=pos)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_last_mlp_on_read_rows_keeps_read_states_and_their_gradients(arch):
    model = build_tiny_causal_lm(40, hidden=32, layers=2, heads=4, intermediate=48, arch=arch)
    mlp = last_mlp(model)
    assert mlp is model.get_decoder().layers[-1].mlp
    ids = torch.randint(3, 40, (3, 10), generator=torch.Generator().manual_seed(1))
    read = torch.tensor([29, 3, 17, 9, 0])                             # flat rows, any order
    results = []
    for restricted in (False, True):
        model.zero_grad(set_to_none=True)
        if restricted:
            with mlp_on_read_rows(mlp, read):
                h = model.base_model(input_ids=ids).last_hidden_state
        else:
            h = model.base_model(input_ids=ids).last_hidden_state
        states = h.reshape(-1, h.shape[-1]).index_select(0, read)
        (states * torch.arange(states.numel()).view_as(states).cos()).sum().backward()
        results.append((states.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
    (s0, g0), (s1, g1) = results
    assert _rel(s1, s0) <= 1e-5
    assert g0.keys() == g1.keys()
    for name in g0:
        assert _rel(g1[name], g0[name]) <= 1e-5, name
    assert not mlp._forward_hooks and not mlp._forward_pre_hooks      # hooks gone after the block


def test_last_mlp_is_none_for_an_unknown_decoder():
    from torch import nn

    class Other(nn.Module):
        config = type("C", (), {"num_hidden_layers": 1})()

        def get_decoder(self):
            return self

        layers = nn.ModuleList([nn.Linear(2, 2)])

    assert last_mlp(Other()) is None



def _route(model, length: int = 12):
    """One block-sparse forward of ``model``'s decoder over a causal row of ``length`` tokens, and the same
    forward on the model's own attention (the reference)."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None]
    ids = torch.randint(3, 40, (1, length), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length)[None]
    ref = model.base_model(input_ids=ids, attention_mask=allowed[:, None], position_ids=pos).last_hidden_state
    with use_block_sparse(model):
        got = model.base_model(input_ids=ids, attention_mask=allowed[:, None], position_ids=pos,
                               block_plan=block_plan(allowed, 4)).last_hidden_state
    return got, ref


def _qwen2_with_window(window: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                         sliding_window=window, max_window_layers=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def test_a_sliding_window_narrower_than_the_row_is_refused():
    model = _qwen2_with_window(4)
    assert model.model.layers[0].self_attn.sliding_window == 4     # the layer does pass it on
    with pytest.raises(PackingUnsupported, match=r"Qwen2Attention passes a sliding attention window "
                                                 r"\(sliding_window=4\).*packing: false"):
        _route(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_sliding_window_as_wide_as_the_row_changes_nothing_and_runs():
    got, ref = _route(_qwen2_with_window(12), length=12)
    assert _rel(got, ref) <= 1e-5


def test_softcap_and_attention_sinks_of_hf_layers_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

    small = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, attn_implementation="eager")
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, attn_logit_softcapping=50.0, sliding_window=64,
                                           layer_types=["full_attention"] * 2))
    with pytest.raises(PackingUnsupported, match=r"Gemma2Attention passes attention logit soft-capping "
                                                 r"\(softcap=50.0\)"):
        _route(gemma)
    gpt_oss = GptOssForCausalLM(GptOssConfig(**small, num_local_experts=2, num_experts_per_tok=1, sliding_window=64,
                                             layer_types=["full_attention"] * 2))
    with pytest.raises(PackingUnsupported, match=r"GptOssAttention passes attention sinks \(s_aux=Parameter\)"):
        _route(gpt_oss)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_KWARGS))
def test_every_unsupported_keyword_is_refused_and_none_is_not(name):
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None]
    plan = block_plan(allowed, 4)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    module = torch.nn.Module().eval()
    value = 2 if name == "sliding_window" else torch.zeros(2)
    with pytest.raises(PackingUnsupported, match=rf"Module passes .*\({name}="):
        _hf_attention(module, q, k, v, None, block_plan=plan, **{name: value})
    out, _ = _hf_attention(module, q, k, v, None, block_plan=plan, **{name: None})
    want = dense_masked_attention(q, k, v, allowed).transpose(1, 2)
    assert _rel(out, want) <= 1e-5


def test_the_trainer_start_check_reports_a_soft_capped_decoder():
    """SIDPolicy.check_packing runs the block-sparse path training uses, so the refusal surfaces there, before
    any step, naming the layer and the keyword."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from gflowgr_core.model.policy import SIDPolicy
    from gflowgr_core.sid.tokens import SIDTokenMap

    cpl = (4, 5)
    codes = torch.tensor([[0, 1], [1, 2], [3, 4], [2, 0]])
    tokens = SIDTokenMap.from_scratch(cpl)
    lm = Gemma2ForCausalLM(Gemma2Config(vocab_size=tokens.vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=8, attn_logit_softcapping=30.0, final_logit_softcapping=None,
                                        sliding_window=64,
                                        layer_types=["full_attention"], attn_implementation="eager"))
    policy = SIDPolicy(lm, tokens, codes, cpl, flow_hidden=8)
    with pytest.raises(PackingUnsupported, match=r"Gemma2Attention passes attention logit soft-capping "
                                                 r"\(softcap=30.0\).*packing: false"):
        policy.check_packing()
    policy.check_packing(sparse=False)   # the model's own attention over the dense mask applies the soft-capping
