"""Evaluation of a policy on a split: trie-constrained beam search, then ranking metrics.

Model selection reads the validation split only; the test split is read once per run, with the best checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from gflowgr_core.data.prepared import PreparedData
from gflowgr_core.data.split import Split
from gflowgr_core.decoding.search import beam_search
from gflowgr_core.devices import resolve_device
from gflowgr_core.metrics import evaluate_rankings
from gflowgr_core.model.policy import SIDPolicy
from gflowgr_core.train.checkpoint import load_policy
from gflowgr_core.train.distributed import DistContext

EVAL_KS = (5, 10, 20)


def evaluate_policy(policy: SIDPolicy, data: PreparedData, split_name: str = "test", *,
                    index: Optional[torch.Tensor] = None, beams: int = 20, batch_size: int = 256,
                    device: Optional[torch.device] = None, backend: str = "auto",
                    item_key: Optional[torch.Tensor] = None, dist: Optional[DistContext] = None) -> dict:
    """Metrics of ``policy`` on a split (or the rows ``index`` of it) from trie-constrained beam search.

    With a data-parallel ``dist`` every rank ranks its block of ``index`` and the rankings are gathered, so
    every rank returns the metrics of the whole ``index``.
    """
    device = device or next(policy.parameters()).device
    split: Split = getattr(data.split, split_name)
    index = torch.arange(len(split)) if index is None else index
    if dist is not None and dist.enabled:
        lo, hi = dist.shard_bounds(len(index))
        local = index[lo:hi]
    else:
        local = index
    trie = data.trie.to(device)
    policy.eval()
    width = max(EVAL_KS)
    ranked = [torch.full((0, width), -1, dtype=torch.long)]
    with torch.no_grad():
        quiet = True if dist is not None and not dist.is_main else None  # one progress bar per run
        for start in tqdm(range(0, len(local), batch_size), desc=f"eval {split_name}", leave=False, disable=quiet):
            rows = local[start:start + batch_size]
            result = beam_search(policy, trie, split.history[rows].to(device), beams=beams, topk=width,
                                 backend=backend)
            items = result.items.cpu()
            if items.shape[1] < width:  # fewer beams than the largest cut-off: pad with empty slots
                items = torch.cat([items, items.new_full((items.shape[0], width - items.shape[1]), -1)], dim=1)
            ranked.append(items)
    ranked = torch.cat(ranked)
    if dist is not None and dist.enabled:
        ranked = dist.gather_rows(ranked)
    return evaluate_rankings(ranked, split.target[index], data.popularity, ks=EVAL_KS, item_key=item_key)


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
