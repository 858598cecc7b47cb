"""Evaluation of a policy on a split: trie-constrained beam search, then ranking metrics.

Every evaluation ranks under two scorings of a SID, from one beam-search call (one prompt pass):

* the headline keys (``recall@10``, ``ndcg@10``, ...): per-level log-probs over the level's codes, masked to
  the trie children (``renormalize=False``), which is how Hugging Face beam search with a
  ``prefix_allowed_tokens_fn`` ranks SIDs, the protocol of the papers we compare with;
* the same keys prefixed ``renorm/``: log-probs renormalised over the trie children of each prefix
  (``renormalize=True``, the GFlowNet forward policy);

plus ``scoring_agreement@20``, the mean share of a user's top-20 items that both scorings return.

The item metrics rank the items of the beams' leaves (every item of a shared SID, cut to 20 items). The
SID-match metrics (``sid_recall@K``, ``sid_ndcg@K``, with ``item_key``) rank the beams' leaves themselves, one
per SID, so K counts SIDs (LETTER's Hit@K over the generated SIDs) even when several items share a leaf.
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
from gflowgr_core.metrics import AGREEMENT_KEY, EVAL_KS, SCORINGS, evaluate_rankings, hit_rank
from gflowgr_core.model.policy import SIDPolicy
from gflowgr_core.sid.trie import Trie
from gflowgr_core.train.checkpoint import load_policy
from gflowgr_core.train.distributed import DistContext



def item_key_of(data: PreparedData) -> Optional[torch.Tensor]:
    """Leaf node per item when the catalogue shares SIDs between items (then SID-match metrics are reported
    too), else ``None``."""
    if data.catalog.collisions == "share" and int(data.stats.get("sid_collisions", 0)) > 0:
        return data.trie.item_leaf.cpu()
    return None


def top_k_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of ``|a_u ∩ b_u| / k`` for two rankings ``[N, k]`` (``-1`` slots match nothing)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"rankings must have the same [N, k] shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0:
        return float("nan")
    shared = ((a[:, :, None] == b[:, None, :]) & (a >= 0)[:, :, None]).any(-1).sum(-1)
    return float(shared.double().mean() / a.shape[1])


def leaf_representatives(trie: Trie, leaves: torch.Tensor, width: int) -> torch.Tensor:
    """One item per ranked leaf: ``LongTensor[N, width]`` holding the lowest item of each leaf of
    ``leaves[N, W]`` (best first) in the leaves' order, ``-1`` for dead beams (``-1`` leaves) and padding
    when ``W < width``. A leaf's items share its SID, so the SID-match metrics of this ranking count SIDs."""
    items, valid = trie.items_of_leaves(leaves.to(trie.leaf_items.device))
    rep = torch.where(valid[..., 0] & (leaves.to(items.device) >= 0), items[..., 0],
                      torch.full_like(items[..., 0], -1))
    if rep.shape[1] < width:
        rep = torch.cat([rep, rep.new_full((rep.shape[0], width - rep.shape[1]), -1)], dim=1)
    return rep.cpu()


def check_item_key(trie: Trie, item_key: torch.Tensor) -> None:
    """Raise unless ``item_key[n_items]`` gives every item of a trie leaf the same key (the SID metrics read
    one item per leaf, so a key that tells a leaf's items apart would be ill-defined)."""
    item_key = torch.as_tensor(item_key)
    if item_key.dim() != 1 or item_key.numel() != trie.num_items:
        raise ValueError(f"item_key must be [n_items={trie.num_items}], got shape {tuple(item_key.shape)}")
    keys = item_key.to(device=trie.leaf_items.device, dtype=torch.int64)[trie.leaf_items]
    first = keys[trie.leaf_ptr[:-1]]
    per_item = torch.repeat_interleave(first, trie.leaf_ptr[1:] - trie.leaf_ptr[:-1])
    bad = (keys != per_item).nonzero()
    if bad.numel():
        item = int(trie.leaf_items[int(bad[0])])
        raise ValueError(f"item_key gives item {item} the key {int(item_key[item])} but another item of its "
                         "SID (trie leaf) a different one: item_key must be constant within a SID, "
                         "e.g. Trie.item_leaf")


def evaluation_users(n: int, max_users: Optional[int] = None) -> torch.Tensor:
    """Rows of a split of ``n`` users that evaluation reads: all of them, or with ``max_users < n`` a fixed
    seeded subset (sorted), the same in every run and epoch so that runs are compared on the same users."""
    if max_users is None or max_users >= n:
        return torch.arange(n)
    rng = torch.Generator().manual_seed(1234)
    return torch.randperm(n, generator=rng)[:max_users].sort().values


def evaluate_policy(policy: SIDPolicy, data: PreparedData, split_name: str = "test", *,
                    index: Optional[torch.Tensor] = None, beams: int = 20, batch_size: int = 256,
                    device: Optional[torch.device] = None, backend: str = "auto",
                    item_key: Optional[torch.Tensor] = None, dist: Optional[DistContext] = None,
                    sort_by_length: bool = True, ranks_out: Optional[dict] = None) -> dict:
    """Metrics of ``policy`` on a split (or the rows ``index`` of it) from trie-constrained beam search.

    Decoding runs on the policy's device (``device``, when given, must be that one).

    Returns :func:`~gflowgr_core.metrics.evaluate_rankings`' keys under the headline scoring, the same keys
    prefixed ``renorm/`` under the renormalised one, and ``scoring_agreement@20`` (see the module docstring).
    With ``item_key`` (constant within a SID, e.g. ``data.trie.item_leaf``) the SID-match metrics rank the
    beams' leaves (:func:`leaf_representatives`), not the item list cut to 20 items.
    Users are batched by history length (``sort_by_length=False`` keeps the given order: same rankings).
    With a data-parallel ``dist`` every rank ranks its block of ``index`` and the rankings are gathered, so
    every rank returns the metrics of the whole ``index``.

    ``ranks_out``, when given, receives each user's 0-based rank of the held-out item (``-1``: not in the
    top 20), ``LongTensor[len(index)]`` per scoring under its key prefix (``""`` and ``"renorm/"``): the
    per-user values behind ``recall@K`` / ``ndcg@K``, for paired tests between runs.
    """
    _check_device(policy, device)
    if item_key is not None:
        check_item_key(data.trie, item_key)
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
        # One item per beam leaf, best first: the SID ranking (a leaf may hold several items).
        sid_ranked = [leaf_representatives(data.trie, r.leaves, width) for r in results]
    else:
        ranked = [torch.full((0, width), -1, dtype=torch.long) for _ in SCORINGS]
        sid_ranked = [torch.full((0, max(width, beams)), -1, dtype=torch.long) for _ in SCORINGS]
    if dist is not None and dist.enabled:
        ranked = [dist.gather_rows(r) for r in ranked]
        sid_ranked = [dist.gather_rows(r) for r in sid_ranked]
    target = split.target[index]
    metrics: dict = {}
    for (prefix, _), r, s in zip(SCORINGS, ranked, sid_ranked):
        scored = evaluate_rankings(r, target, data.popularity, ks=EVAL_KS, item_key=item_key,
                                   sid_ranked=None if item_key is None else s)
        metrics.update({prefix + key: value for key, value in scored.items()})
    metrics[AGREEMENT_KEY] = top_k_agreement(ranked[0], ranked[1])
    if ranks_out is not None:
        for (prefix, _), r in zip(SCORINGS, ranked):
            ranks_out[prefix] = hit_rank(r, target)
    return metrics


def _check_device(policy: SIDPolicy, device: Optional[torch.device]) -> None:
    if device is None:
        return
    want, have = torch.device(device), policy.device
    if want.type != have.type or (want.index is not None and have.index is not None and want.index != have.index):
        raise ValueError(f"evaluation on {want} but the policy is on {have}: move the policy there first")


def checkpoint_data_dir(checkpoint: str | Path, data: Optional[str] = None) -> str:
    """The prepared data folder to evaluate ``checkpoint`` on: ``data`` when given, else the ``data`` of the
    checkpoint's ``config.yaml`` (the folder its run trained on)."""
    from gflowgr_core.train.config import load_config

    ckpt = Path(checkpoint)
    config = load_config(ckpt / "config.yaml") if (ckpt / "config.yaml").exists() else None
    data_dir = data or (config.data if config is not None else None)
    if not data_dir:
        raise FileNotFoundError(f"{ckpt} has no config.yaml naming its data folder: pass --data DIR")
    return str(data_dir)


def evaluate_checkpoint(checkpoint: str, split: str = "test", data: Optional[str] = None, beams: int = 20,
                        device: str = "auto") -> dict:
    """Evaluate a saved checkpoint (the ``gflowgr eval`` command) on its prepared dataset
    (:func:`checkpoint_data_dir`)."""
    ckpt = Path(checkpoint)
    data_dir = checkpoint_data_dir(ckpt, data)
    dev = resolve_device(device)
    prepared = PreparedData.load(data_dir)
    policy = load_policy(ckpt, device=dev)
    return evaluate_policy(policy, prepared, split, beams=beams, device=dev, item_key=item_key_of(prepared))
