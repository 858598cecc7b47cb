"""gflowgr: GFlowNet fine-tuning of generative recommenders over semantic-ID tokens.

The public API is re-exported here and imported lazily (``import gflowgr_core`` stays cheap; the first use
of a name imports its module)::

    from gflowgr_core import prepare, PreparedData, Trie, SIDPolicy, Trainer, load_config, beam_search
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # data
    "Interactions": "gflowgr_core.data.loaders", "load_interactions": "gflowgr_core.data.formats",
    "DataError": "gflowgr_core.data.loaders", "leave_one_out": "gflowgr_core.data.split",
    "kcore_filter": "gflowgr_core.data.split", "SplitData": "gflowgr_core.data.split",
    "Split": "gflowgr_core.data.split", "prepare": "gflowgr_core.data.prepared",
    "PreparedData": "gflowgr_core.data.prepared",
    # semantic IDs
    "Catalog": "gflowgr_core.sid.catalog", "Trie": "gflowgr_core.sid.trie", "SIDTokenMap": "gflowgr_core.sid.tokens",
    "parse_sid": "gflowgr_core.sid.tokens", "format_sid": "gflowgr_core.sid.tokens",
    "rq_kmeans": "gflowgr_core.sid.tokenizer", "build_catalog": "gflowgr_core.sid.tokenizer",
    # model, objectives, decoding
    "SIDPolicy": "gflowgr_core.model.policy", "build_tiny_causal_lm": "gflowgr_core.model.policy",
    "gfn_loss": "gflowgr_core.objectives.gfn_loss", "constrained_log_pf": "gflowgr_core.objectives.logpf", "TrajectoryBalance": "gflowgr_core.objectives.balance",
    "DetailedBalance": "gflowgr_core.objectives.balance",
    "SubTrajectoryBalance": "gflowgr_core.objectives.balance",
    "constrained_step": "gflowgr_core.decoding.step", "beam_search": "gflowgr_core.decoding.search",
    "sample": "gflowgr_core.decoding.search", "SIDTrieLogitsProcessor": "gflowgr_core.hf_processor",
    # training pieces
    "Reward": "gflowgr_core.reward", "RewardConfig": "gflowgr_core.reward", "make_sampler": "gflowgr_core.samplers",
    "ExampleBatch": "gflowgr_core.trajectories", "Trajectories": "gflowgr_core.trajectories",
    "SASRec": "gflowgr_core.collaborative", "CMScorer": "gflowgr_core.collaborative",
    "train_sasrec": "gflowgr_core.collaborative", "evaluate_rankings": "gflowgr_core.metrics",
    "TrainConfig": "gflowgr_core.train.config", "load_config": "gflowgr_core.train.config",
    "Trainer": "gflowgr_core.train.trainer", "run_training": "gflowgr_core.train.trainer",
    "GFlowGRConfig": "gflowgr_core.hf_trainer", "GFlowGRTrainer": "gflowgr_core.hf_trainer",
    "available_backends": "gflowgr_core.backends",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gflowgr_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
