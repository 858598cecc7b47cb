"""The last decoder layer's MLP only on the rows whose hidden state is read.

In a packed batch (:mod:`gflowgr_core.model.packing`) most tokens are trunk tokens: later tokens attend to
their keys and values, but nothing reads their final hidden state. In the last layer of a pre-norm decoder
(``h = h + attn(norm(h)); h = h + mlp(norm(h))``) those keys and values come from the layer's input, so the
MLP, the costliest part of the layer, is needed only where a state is read: each example's decision and branch
tokens. :func:`mlp_on_read_rows` runs it there alone, forward and backward; at every other row the layer's
output is its residual stream without the MLP term, which nothing downstream reads.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["mlp_on_read_rows", "last_mlp"]

# Decoder layers of the pre-norm form above, whose MLP acts on each token alone (tests/test_block_attention.py, tests/test_packing.py).
_PRE_NORM_LAYERS = ("Qwen2DecoderLayer", "LlamaDecoderLayer")


def last_mlp(model) -> nn.Module | None:
    """The MLP of ``model``'s last decoder layer when that layer has the supported pre-norm form, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not layers:
        return None
    n = getattr(model.config, "num_hidden_layers", len(layers))
    last = layers[n - 1]
    if type(last).__name__ not in _PRE_NORM_LAYERS or not isinstance(getattr(last, "mlp", None), nn.Module):
        return None
    return last.mlp


@contextmanager
def mlp_on_read_rows(mlp: nn.Module, read_index: torch.Tensor):
    """Within this block ``mlp`` (input ``[R, C, d]``) runs on the rows ``read_index`` of its input flattened
    to ``[R * C, d]`` only, and returns zeros elsewhere. The hooks are removed on exit, also after an error."""
    shape = {}

    def select(_module, args):
        x = args[0]
        shape["x"] = x.shape
        return (x.reshape(-1, x.shape[-1]).index_select(0, read_index),) + tuple(args[1:])

    def scatter(_module, _args, out):
        x_shape = shape.pop("x")
        full = out.new_zeros(x_shape[:-1].numel(), out.shape[-1])
        return full.index_copy(0, read_index, out).view(*x_shape[:-1], out.shape[-1])

    handles = [mlp.register_forward_pre_hook(select), mlp.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
