"""Residual dropout hooks: where they act (embeddings, every attention and MLP output), how survivors are
scaled, that evaluation is untouched, and the errors for values and models they cannot take."""
from __future__ import annotations

import pytest
import torch

from gflowgr_core.model.hidden_dropout import add_hidden_dropout
from gflowgr_core.model.policy import build_tiny_causal_lm
from gflowgr_core.train.config import ConfigError, load_config


def _model(arch: str = "qwen2"):
    return build_tiny_causal_lm(40, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, arch=arch, seed=0)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _sites(model):
    layers = model.model.layers
    return {"embed": model.get_input_embeddings(), "attn0": layers[0].self_attn, "mlp1": layers[1].mlp}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_each_site_is_dropped_and_survivors_rescaled(arch):
    p = 0.3
    model = _model(arch).train()
    raw, dropped = {}, {}
    for name, module in _sites(model).items():  # registered before the dropout: sees the sublayer's own output
        module.register_forward_hook(lambda m, a, out, name=name: raw.__setitem__(name, _first(out).detach()))
    handles = add_hidden_dropout(model, p)
    assert len(handles) == 1 + 2 * 2
    for name, module in _sites(model).items():  # registered after: sees what the residual stream receives
        module.register_forward_hook(lambda m, a, out, name=name: dropped.__setitem__(name, _first(out).detach()))
    ids = torch.randint(3, 40, (16, 24), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids)
    for name in raw:
        kept = dropped[name] != 0
        share = kept.float().mean().item()
        assert abs(share - (1 - p)) < 0.03, (name, share)
        torch.testing.assert_close(dropped[name][kept], raw[name][kept] / (1 - p))


def test_eval_mode_and_zero_p_leave_the_model_unchanged():
    model = _model().eval()
    ids = torch.randint(3, 40, (4, 10), generator=torch.Generator().manual_seed(2))
    before = model(input_ids=ids).logits
    assert add_hidden_dropout(model, 0.0) == []
    handles = add_hidden_dropout(model, 0.5)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, before)
    for h in handles:
        h.remove()
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_gradients_flow_only_through_kept_embedding_entries():
    model = _model().train()
    add_hidden_dropout(model, 0.5)
    seen = {}
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.__setitem__("e", out))
    ids = torch.arange(3, 13).unsqueeze(0)  # ten distinct tokens: one embedding row each
    model(input_ids=ids).logits.sum().backward()
    grad_rows = model.get_input_embeddings().weight.grad[ids[0]]
    dropped = seen["e"][0] == 0
    assert dropped.any() and (~dropped).any()
    assert torch.all(grad_rows[dropped] == 0)
    assert torch.all(torch.isfinite(grad_rows))


def test_refuses_bad_values_and_models_without_decoder_layers():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        add_hidden_dropout(_model(), 1.0)
    with pytest.raises(ValueError, match="Linear has none"):
        add_hidden_dropout(torch.nn.Linear(2, 2), 0.1)
    model = _model()
    del model.model.layers[1].mlp
    with pytest.raises(ValueError, match="decoder layer 1 .* no mlp"):
        add_hidden_dropout(model, 0.1)


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_config_refuses_out_of_range_hidden_dropout(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data=x", f"model.hidden_dropout={value}"]).validate()
    assert err.value.key == "model.hidden_dropout"


def test_a_hooked_model_pickles_and_keeps_its_dropout():
    import pickle

    model = _model()
    add_hidden_dropout(model, 0.5)
    copy = pickle.loads(pickle.dumps(model)).train()
    ids = torch.randint(3, 40, (4, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.allclose(copy(input_ids=ids).logits, copy.eval()(input_ids=ids).logits)
