"""Evaluation of a policy on a split: trie-constrained beam search, then ranking metrics.

Every evaluation ranks under two scorings of a SID, from one beam-search call (one prompt pass):

* the headline keys (``recall@10``, ``ndcg@10``, ...): per-level log-probs over the level's codes, masked to
  the trie children (``renormalize=False``), which is how Hugging Face beam search with a
  ``prefix_allowed_tokens_fn`` ranks SIDs, the protocol of the papers we compare with;
* the same keys prefixed ``renorm/``: log-probs renormalised over the trie children of each prefix
  (``renormalize=True``, the GFlowNet forward policy);

plus ``scoring_agreement@20``, the mean share of a user's top-20 items that both scorings return.
Model selection reads the validation split only; the test split is read once per run, with the best checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from gflowgr_core.data.prepared import PreparedData
from gflowgr_core.data.split import Split
from gflowgr_core.decoding.search import beam_search_scorings
from gflowgr_core.devices import resolve_device
from gflowgr_core.metrics import evaluate_rankings
from gflowgr_core.model.policy import SIDPolicy
from gflowgr_core.train.checkpoint import load_policy
from gflowgr_core.train.distributed import DistContext

EVAL_KS = (5, 10, 20)
# Key prefix of each scoring, headline first: (prefix, renormalize).
SCORINGS = (("", False), ("renorm/", True))
AGREEMENT_KEY = f"scoring_agreement@{max(EVAL_KS)}"


def top_k_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of ``|a_u ∩ b_u| / k`` for two rankings ``[N, k]`` (``-1`` slots match nothing)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"rankings must have the same [N, k] shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0:
        return float("nan")
    shared = ((a[:, :, None] == b[:, None, :]) & (a >= 0)[:, :, None]).any(-1).sum(-1)
    return float(shared.double().mean() / a.shape[1])


def evaluate_policy(policy: SIDPolicy, data: PreparedData, split_name: str = "test", *,
                    index: Optional[torch.Tensor] = None, beams: int = 20, batch_size: int = 256,
                    device: Optional[torch.device] = None, backend: str = "auto",
                    item_key: Optional[torch.Tensor] = None, dist: Optional[DistContext] = None,
                    sort_by_length: bool = True) -> dict:
    """Metrics of ``policy`` on a split (or the rows ``index`` of it) from trie-constrained beam search.

    Decoding runs on the policy's device (``device``, when given, must be that one).

    Returns :func:`~gflowgr_core.metrics.evaluate_rankings`' keys under the headline scoring, the same keys
    prefixed ``renorm/`` under the renormalised one, and ``scoring_agreement@20`` (see the module docstring).
    Users are batched by history length (``sort_by_length=False`` keeps the given order: same rankings).
    With a data-parallel ``dist`` every rank ranks its block of ``index`` and the rankings are gathered, so
    every rank returns the metrics of the whole ``index``.
    """
    _check_device(policy, device)
    split: Split = getattr(data.split, split_name)
    index = torch.arange(len(split)) if index is None else index
    if dist is not None and dist.enabled:
        lo, hi = dist.shard_bounds(len(index))
        local = index[lo:hi]
    else:
        local = index
    width = max(EVAL_KS)
    quiet = dist is not None and not dist.is_main  # one progress bar per run
    if len(local) > 0:
        results = beam_search_scorings(policy, data.trie, split.history[local], [r for _, r in SCORINGS],
                                       beams=beams, topk=width, batch_size=batch_size, backend=backend,
                                       progress=False if quiet else None, sort_by_length=sort_by_length)
        ranked = [r.items.cpu() for r in results]  # [n, 20]: empty slots are -1 when beams < 20
    else:
        ranked = [torch.full((0, width), -1, dtype=torch.long) for _ in SCORINGS]
    if dist is not None and dist.enabled:
        ranked = [dist.gather_rows(r) for r in ranked]
    target = split.target[index]
    metrics: dict = {}
    for (prefix, _), r in zip(SCORINGS, ranked):
        scored = evaluate_rankings(r, target, data.popularity, ks=EVAL_KS, item_key=item_key)
        metrics.update({prefix + key: value for key, value in scored.items()})
    metrics[AGREEMENT_KEY] = top_k_agreement(ranked[0], ranked[1])
    return metrics


def _check_device(policy: SIDPolicy, device: Optional[torch.device]) -> None:
    if device is None:
        return
    want, have = torch.device(device), policy.device
    if want.type != have.type or (want.index is not None and have.index is not None and want.index != have.index):
        raise ValueError(f"evaluation on {want} but the policy is on {have}: move the policy there first")


def evaluate_checkpoint(checkpoint: str, split: str = "test", data: Optional[str] = None, beams: int = 20,
                        device: str = "auto") -> dict:
    """Evaluate a saved checkpoint (the ``gflowgr eval`` command) on its prepared dataset."""
    from gflowgr_core.train.config import load_config

    ckpt = Path(checkpoint)
    config = load_config(ckpt / "config.yaml") if (ckpt / "config.yaml").exists() else None
    data_dir = data or (config.data if config is not None else None)
    if not data_dir:
        raise FileNotFoundError(f"{ckpt} has no config.yaml naming its data folder: pass --data DIR")
    dev = resolve_device(device)
    prepared = PreparedData.load(data_dir)
    policy = load_policy(ckpt, device=dev)
    item_key = None
    if prepared.catalog.collisions == "share" and int(prepared.stats.get("sid_collisions", 0)) > 0:
        item_key = prepared.trie.item_leaf.cpu()
    return evaluate_policy(policy, prepared, split, beams=beams, device=dev, item_key=item_key)
