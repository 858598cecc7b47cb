"""Merging PEFT adapters back into a plain Hugging Face model.

The policy needs this to save (a checkpoint is always a plain HF model) and the pretrained-backbone module
offers it to users; it lives below both so that neither imports the other.
"""
from __future__ import annotations

import copy

from torch import nn

__all__ = ["merged_copy"]


def merged_copy(peft_model) -> nn.Module:
    """A plain HF model equal to ``peft_model`` with its adapters (LoRA, trainable tokens) merged in.

    The live model is left untouched (the merge runs on a deep copy).
    """
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in merged.__dict__:
            delattr(merged, attr)
    return merged
