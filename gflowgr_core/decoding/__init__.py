"""Trie-constrained decoding: the constrained step op, beam search and sampling with a KV cache."""
from .search import DecodeResult, SampleResult, beam_search, leaves_to_items, recommend, sample
from .step import BeamStep, SampleStep, constrained_step, constrained_step_torch

__all__ = ["DecodeResult", "SampleResult", "beam_search", "sample", "recommend", "leaves_to_items",
           "BeamStep", "SampleStep", "constrained_step", "constrained_step_torch"]
