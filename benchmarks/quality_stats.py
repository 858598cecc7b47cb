"""Paired statistics over test users for the quality grid: per-user metrics from per-user ranks, and a paired
bootstrap of the difference of two methods.

A run's test evaluation saves each user's 0-based rank of the held-out item under each scoring
(``test_ranks.pt``: ``-1`` when the item is not in the top 20). Recall@K and NDCG@K of one user follow from that
rank exactly as :mod:`gflowgr_core.metrics` computes them (tests/test_quality_stats.py checks the two agree), so
the mean over users of these arrays is the run's reported metric. A method with several seeds is represented by
the per-user mean over its seeds; two methods are compared on the same users (paired).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

# Scoring prefix in the metric names -> key in test_ranks.pt.
SCORING_KEYS = {"": "headline", "renorm/": "renorm/"}
STAT_KS = (5, 10)
STAT_METRICS = tuple(f"{prefix}{name}@{k}" for prefix in SCORING_KEYS for name in ("recall", "ndcg")
                     for k in STAT_KS)


def per_user_metrics(ranks: Mapping[str, np.ndarray], ks: Sequence[int] = STAT_KS) -> dict[str, np.ndarray]:
    """``{"recall@K", "ndcg@K", "renorm/recall@K", ...}`` -> ``float64[n_users]`` from the per-user ranks of
    each scoring (``ranks["headline"]``, ``ranks["renorm/"]``; ``-1`` = not retrieved)."""
    out = {}
    for prefix, key in SCORING_KEYS.items():
        if key not in ranks:
            continue
        rank = np.asarray(ranks[key], dtype=np.int64)
        for k in ks:
            hit = (rank >= 0) & (rank < k)
            out[f"{prefix}recall@{k}"] = hit.astype(np.float64)
            out[f"{prefix}ndcg@{k}"] = np.where(hit, 1.0 / np.log2(np.maximum(rank, 0) + 2.0), 0.0)
    return out


def seed_mean(per_seed: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-user mean over seeds of :func:`per_user_metrics` dicts (the users must be the same, in order)."""
    if not per_seed:
        raise ValueError("no seeds to average")
    sizes = {len(v) for m in per_seed for v in m.values()}
    if len(sizes) != 1:
        raise ValueError(f"the seeds were evaluated on different numbers of users: {sorted(sizes)}")
    keys = set.intersection(*(set(m) for m in per_seed))
    return {key: np.mean([m[key] for m in per_seed], axis=0) for key in sorted(keys)}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0,
                     chunk: int = 100) -> dict:
    """Mean difference ``a - b`` over users, its 95% percentile interval and a two-sided p-value, from
    ``resamples`` bootstrap draws of the users (paired: one draw picks a user's value in both).

    The p-value is the share of centred resampled means at least as far from 0 as the observed mean (the
    null distribution of the mean difference, shifted to 0), floored at ``1 / (resamples + 1)``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired samples must be two non-empty vectors of one length, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be >= 1")
    d = a - b
    n = d.size
    observed = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    extreme = np.abs(means - observed) >= abs(observed)
    p = (extreme.sum() + 1) / (resamples + 1)
    return {"diff": observed, "ci95": [float(lo), float(hi)], "p": float(min(1.0, p)), "users": int(n),
            "resamples": int(resamples)}


def compare_methods(per_user: Mapping[str, Mapping[str, np.ndarray]], pairs: Sequence[tuple[str, str]],
                    metrics: Sequence[str] = STAT_METRICS, resamples: int = 2000, seed: int = 0) -> dict:
    """``{"a-b": {metric: paired_bootstrap(...)}}`` for each pair whose two methods have per-user metrics."""
    out = {}
    for a, b in pairs:
        if a not in per_user or b not in per_user:
            continue
        out[f"{a}-{b}"] = {m: paired_bootstrap(per_user[a][m], per_user[b][m], resamples, seed)
                           for m in metrics if m in per_user[a] and m in per_user[b]}
    return out


def mean_intervals(per_user: Mapping[str, Mapping[str, np.ndarray]], metrics: Sequence[str] = STAT_METRICS,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """``{method: {metric: [lo, hi]}}``: the 95% bootstrap interval over users of each method's mean (the
    paired bootstrap of the method against zero: the same user draws as :func:`paired_bootstrap`)."""
    return {name: {m: paired_bootstrap(v[m], np.zeros_like(v[m]), resamples, seed)["ci95"] for m in metrics if m in v}
            for name, v in per_user.items()}


def save_ranks(path: Path, ranks: Mapping[str, np.ndarray]) -> None:
    """Write per-user ranks (int8, compressed: ~20 KB per run on Beauty) to ``path`` (.npz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key.replace("/", ""): np.asarray(v, dtype=np.int8) for key, v in ranks.items()}
    np.savez_compressed(path, **arrays)


def load_ranks(path: Path) -> dict[str, np.ndarray]:
    """Read :func:`save_ranks`' file back under the ``test_ranks.pt`` keys (``headline``, ``renorm/``)."""
    with np.load(path) as f:
        return {("renorm/" if key == "renorm" else key): f[key].astype(np.int64) for key in f.files}
