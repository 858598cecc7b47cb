"""Residual dropout for Hugging Face decoder-only LMs, added with forward hooks.

Qwen2 and Llama configs carry only ``attention_dropout``; TIGER-style recommenders (a T5 with dropout 0.1) also
drop the token embeddings and each sublayer's output before it is added to the residual stream. These hooks add
exactly that to a built model without changing its class or its saved weights: dropout is a training setting
(``model.hidden_dropout``), so a checkpoint trained with it loads as a plain model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

# The sublayers of one decoder layer whose outputs are added to the residual stream (Qwen2, Llama, Mistral, Qwen3).
SUBLAYERS = ("self_attn", "mlp")


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"hidden dropout needs a decoder with `.{getattr(model, 'base_model_prefix', 'model')}"
                         f".layers` (Qwen2, Llama, Mistral style); {type(model).__name__} has none")
    for i, layer in enumerate(layers):
        missing = [name for name in SUBLAYERS if not isinstance(getattr(layer, name, None), torch.nn.Module)]
        if missing:
            raise ValueError(f"hidden dropout: decoder layer {i} ({type(layer).__name__}) of "
                             f"{type(model).__name__} has no {' / '.join(missing)} sublayer")
    return layers


class _Dropout:
    """The forward hook: a class, not a closure, so that a hooked model can still be pickled or deep-copied."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: torch.nn.Module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (F.dropout(output[0], self.p, training=True), *output[1:])
        return F.dropout(output, self.p, training=True)


def add_hidden_dropout(model: torch.nn.Module, p: float) -> list[RemovableHandle]:
    """Drop the token embeddings and every attention and MLP output of ``model`` with probability ``p``.

    Active only while a module is in training mode, so evaluation and decoding are unchanged. Survivors are
    scaled by ``1 / (1 - p)``, as ``torch.nn.Dropout`` does.

    Args:
        model: a Hugging Face causal LM whose decoder layers have ``self_attn`` and ``mlp`` sublayers.
        p: drop probability in ``[0, 1)``; 0 adds nothing.
    Returns:
        The hook handles (``handle.remove()`` takes the dropout off again).
    Raises:
        ValueError: ``p`` outside ``[0, 1)``, or a model without that layer structure.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"hidden dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return []
    layers = _decoder_layers(model)
    hook = _Dropout(p)
    modules = [model.get_input_embeddings()]
    modules += [getattr(layer, name) for layer in layers for name in SUBLAYERS]
    return [m.register_forward_hook(hook) for m in modules]
