"""The GFlowNet policy around a Hugging Face causal LM over semantic-ID tokens."""
from .hidden_dropout import add_hidden_dropout
from .policy import FlowHead, PromptState, SIDPolicy, build_tiny_causal_lm

__all__ = ["SIDPolicy", "PromptState", "FlowHead", "build_tiny_causal_lm", "add_hidden_dropout"]
