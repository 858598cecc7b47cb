"""Semantic-ID construction: residual k-means (RQ-KMeans) over item embeddings.

``build_catalog`` is the entry point: item embeddings (from a ``.npy`` file, or computed from the
interactions by :func:`collaborative_item_embeddings`) are quantised level by level by
:func:`rq_kmeans`, and the codes become a :class:`~gflowgr_core.sid.catalog.Catalog`.

Residual k-means: level 0 clusters the embeddings into ``K_0`` centroids; level ``l`` clusters what is
left after subtracting the centroids chosen at levels ``< l``. The SID of an item is its centroid index
at each level, so items sharing a prefix are close in embedding space, which is what lets a generative
recommender decode coarse-to-fine.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .catalog import Catalog

log = logging.getLogger("gflowgr")

__all__ = [
    "RQKMeansResult",
    "rq_kmeans",
    "rq_encode",
    "collaborative_item_embeddings",
    "load_item_embeddings",
    "build_catalog",
]

# Rows per block when computing point-to-centroid distances: bounds the [rows, K] temporary.
_CHUNK = 65536


@dataclass(eq=False)
class RQKMeansResult:
    """Output of :func:`rq_kmeans`.

    Attributes:
        codes: ``LongTensor[N, L]``, the centroid index of each point at each level.
        codebooks: per level a tensor ``[K_l, D]`` of centroids (residual space of that level).
        codes_per_level: ``(K_0, ..., K_{L-1})`` actually used (``K_l`` may be capped below the request
            when a level has fewer distinct residuals than requested codes).
        report: ``{"levels": [per-level dict], "collisions": int, "distinct_sids": int, "num_points": int}``;
            each per-level dict has ``k``, ``k_requested``, ``capped``, ``iterations``, ``converged``,
            ``inertia`` (sum of squared distances to the centroid), ``codes_used``, ``usage``
            (``codes_used / k``), ``empty_reseeds``.
    """

    codes: torch.Tensor
    codebooks: list[torch.Tensor]
    codes_per_level: tuple[int, ...]
    report: dict = field(default_factory=dict)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=1)


def _assign(x: torch.Tensor, centers: torch.Tensor, x_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of each row: ``(index[N], squared distance[N])``, computed in row blocks."""
    c_sq = _sq_norms(centers)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        block = x[start:start + _CHUNK]
        d = x_sq[start:start + _CHUNK, None] - 2.0 * (block @ centers.T) + c_sq[None, :]
        best, arg = d.min(dim=1)
        idx[start:start + _CHUNK] = arg
        # The expanded form can dip below zero by rounding; distances are non-negative.
        dist[start:start + _CHUNK] = best.clamp_min_(0.0)
    return idx, dist


def _cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int,
                  onehot_matmul: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums ``[k, D]`` and counts ``[k]``.

    Off the CPU a one-hot matmul replaces ``index_add_`` (``onehot_matmul=None`` picks by device): on GPUs
    the latter uses atomics, whose summation order varies between runs and would break seed-for-seed
    determinism. On the CPU ``index_add_`` is sequential, hence deterministic, and cheaper.
    """
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    counts = torch.bincount(assign, minlength=k)
    if onehot_matmul is None:
        onehot_matmul = x.device.type != "cpu"
    if not onehot_matmul:
        return sums.index_add_(0, assign, x), counts
    for start in range(0, x.shape[0], _CHUNK):
        a = assign[start:start + _CHUNK]
        onehot = torch.zeros(k, a.numel(), dtype=x.dtype, device=x.device)
        onehot[a, torch.arange(a.numel(), device=x.device)] = 1.0
        sums += onehot @ x[start:start + _CHUNK]
    return sums, counts


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre is a point drawn with probability ∝ squared distance to the chosen ones.

    Requires ``k <= number of distinct rows`` so that a point at positive distance always remains.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centers[0] = x[first]
    # Direct differences (not the expanded norm form) so a point equal to a centre gets exactly 0.
    d2 = ((x - centers[0]) ** 2).sum(dim=1)
    for j in range(1, k):
        pick = torch.multinomial(d2, 1, generator=generator)
        centers[j] = x[pick[0]]
        d2 = torch.minimum(d2, ((x - centers[j]) ** 2).sum(dim=1))
    return centers


def _reseed_empty(x: torch.Tensor, centers: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Move each empty cluster's centre to the point farthest from all other centres (farthest-first).

    Deterministic (argmax, lowest index on ties). Each chosen point is at positive distance from every
    live centre, so it is a new distinct location.
    """
    live = centers[~empty]
    if live.shape[0] > 0:
        _, d2 = _assign(x, live, _sq_norms(x))
    else:
        d2 = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    for j in torch.nonzero(empty).flatten().tolist():
        far = int(torch.argmax(d2))
        centers[j] = x[far]
        d2 = torch.minimum(d2, ((x - centers[j]) ** 2).sum(dim=1))
    return centers


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int, tol: float):
    """Lloyd's algorithm from a k-means++ start. Returns ``(centers[k, D], assign[N], info dict)``."""
    x_sq = _sq_norms(x)
    centers = _kmeans_pp(x, k, generator)
    assign, dist = _assign(x, centers, x_sq)
    prev_inertia = float(dist.sum())
    converged, iterations, reseeds = False, 0, 0
    for iterations in range(1, iters + 1):
        sums, counts = _cluster_sums(x, assign, k)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None].to(x.dtype))
        if bool(empty.any()):
            reseeds += int(empty.sum())
            centers = _reseed_empty(x, centers, empty)
        new_assign, dist = _assign(x, centers, x_sq)
        inertia = float(dist.sum())
        unchanged = bool(torch.equal(new_assign, assign)) and not bool(empty.any())
        assign = new_assign
        if unchanged or prev_inertia - inertia <= tol * max(prev_inertia, 1e-30):
            converged = True
            break
        prev_inertia = inertia
    used = int(torch.unique(assign).numel())
    info = {"iterations": iterations, "converged": converged, "inertia": float(dist.sum()),
            "codes_used": used, "usage": used / k, "empty_reseeds": reseeds}
    return centers, assign, info


def _codes_list(codes: int | Sequence[int], levels: int) -> list[int]:
    if isinstance(codes, (int, np.integer)):
        out = [int(codes)] * levels
    else:
        out = [int(c) for c in codes]
        if len(out) != levels:
            raise ValueError(f"codes has {len(out)} entries but levels={levels}")
    if any(c < 1 for c in out):
        raise ValueError(f"codes per level must be >= 1, got {out}")
    return out


def rq_kmeans(embeddings: torch.Tensor, levels: int = 3, codes: int | Sequence[int] = 256, seed: int = 0,
              iters: int = 50, tol: float = 1e-4, dtype: torch.dtype = torch.float32) -> RQKMeansResult:
    """Residual k-means quantisation of item embeddings into ``levels``-level semantic IDs.

    Deterministic for a given seed, input and device: k-means++ seeding draws from a seeded
    ``torch.Generator``, Lloyd steps are argmin/matmul only, and empty clusters are re-seeded at the
    points farthest from the live centres (no randomness). Different seeds give different seedings and
    in general different codes.

    Args:
        embeddings: ``[N, D]`` float tensor (or array) on any device.
        levels: number of SID levels ``L``.
        codes: codebook size ``K`` for every level, or one size per level.
        seed: seed of the k-means++ draws.
        iters: maximum Lloyd iterations per level.
        tol: stop a level when assignments stop changing or the relative inertia decrease is ``<= tol``.
        dtype: compute dtype (``torch.float64`` for extra precision at ~2x the cost).
    Returns:
        :class:`RQKMeansResult` with ``codes[N, L]``, ``codebooks`` (``[K_l, D]`` each) and a report.

    A level whose residuals have fewer distinct points than ``K`` cannot fill ``K`` clusters; its ``K_l`` is
    capped at the number of distinct points (a warning says so, and ``report["levels"][l]["capped"]``).
    """
    x = torch.as_tensor(embeddings)
    if x.dim() != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings must be non-empty, got shape {tuple(x.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    x = x.to(dtype)
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0])
        raise ValueError(f"embeddings row {row} contains NaN or inf")
    requested = _codes_list(codes, levels)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed))

    residual = x.clone()
    all_codes, codebooks, level_reports, cpl = [], [], [], []
    for level, k_req in enumerate(requested):
        started = time.perf_counter()
        distinct = int(torch.unique(residual, dim=0).shape[0])
        k = min(k_req, distinct)
        if k < k_req:
            warnings.warn(f"RQ-KMeans level {level}: only {distinct} distinct residual points for {k_req} "
                          f"requested codes; using K={k}", stacklevel=2)
        log.info("RQ-KMeans level %d of %d: %d codes over %d points", level + 1, levels, k, int(x.shape[0]))
        centers, assign, info = _kmeans(residual, k, generator, iters, tol)
        residual = residual - centers[assign]
        all_codes.append(assign)
        codebooks.append(centers)
        cpl.append(k)
        level_reports.append({"level": level, "k": k, "k_requested": k_req, "capped": k < k_req, **info})
        log.info("RQ-KMeans level %d of %d done: %d iterations, %d of %d codes used (%.1f s)", level + 1, levels,
                 info["iterations"], info["codes_used"], k, time.perf_counter() - started)
    codes_t = torch.stack(all_codes, dim=1).cpu()
    distinct_sids = int(torch.unique(codes_t, dim=0).shape[0])
    report = {"levels": level_reports, "num_points": int(x.shape[0]), "distinct_sids": distinct_sids,
              "collisions": int(x.shape[0]) - distinct_sids}
    return RQKMeansResult(codes=codes_t, codebooks=codebooks, codes_per_level=tuple(cpl), report=report)


def rq_encode(embeddings: torch.Tensor, codebooks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Quantise ``embeddings[N, D]`` with existing residual codebooks (e.g. for items added later).

    Returns ``LongTensor[N, L]``: at each level the nearest centroid of the current residual.
    """
    if len(codebooks) == 0:
        raise ValueError("rq_encode needs at least one codebook")
    residual = torch.as_tensor(embeddings).to(dtype=codebooks[0].dtype, device=codebooks[0].device)
    if residual.dim() != 2 or residual.shape[1] != codebooks[0].shape[1]:
        raise ValueError(f"embeddings must be [N, {codebooks[0].shape[1]}], got {tuple(residual.shape)}")
    out = []
    for centers in codebooks:
        assign, _ = _assign(residual, centers, _sq_norms(residual))
        residual = residual - centers[assign]
        out.append(assign)
    return torch.stack(out, dim=1).cpu()


# ---------------------------------------------------------------------- collaborative embeddings
def _torch_csr(m: sp.csr_matrix) -> torch.Tensor:
    """float64 torch CSR copy of a scipy CSR matrix (whose invariants scipy already guarantees)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                       torch.from_numpy(m.indices.astype(np.int64)),
                                       torch.from_numpy(m.data.astype(np.float64)), size=m.shape,
                                       check_invariants=False)


def _randomized_svd(a: sp.csr_matrix, rank: int, seed: int, oversample: int = 10,
                    power_iters: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` left singular vectors and values of sparse ``a`` (randomised range finder, Halko et al.).

    Power iterations with re-orthonormalisation sharpen the spectrum's decay so the top components are
    accurate; the Gaussian test matrix comes from ``numpy.random.default_rng(seed)``. The small ``[p, m]``
    projection ``B = Qᵀ A`` is decomposed through the ``[p, p]`` Gram matrix ``B Bᵀ = U_B S² U_Bᵀ``, which
    is exact in float64 for the well-separated leading components this is used for.
    """
    n, m = a.shape
    p = min(rank + oversample, min(n, m))
    rng = np.random.default_rng(seed)
    # torch's QR and sparse products are multi-threaded and much faster here than numpy/scipy's.
    a_t, at_t = _torch_csr(a), _torch_csr(a.T.tocsr())
    q, _ = torch.linalg.qr(a_t @ torch.from_numpy(rng.standard_normal((m, p))))
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(at_t @ q)
        q, _ = torch.linalg.qr(a_t @ z)
    b = (at_t @ q).T  # [p, m] = Q^T A
    evals, evecs = torch.linalg.eigh(b @ b.T)
    order = torch.argsort(evals, descending=True)[:rank]
    s = evals[order].clamp_min(0.0).sqrt()
    u = q @ evecs[:, order]
    return u.numpy(), s.numpy()


def collaborative_item_embeddings(interactions, dim: int = 64, window: int = 5, seed: int = 0,
                                  shift: float = 1.0, context_alpha: float = 0.75, distance_weighting: bool = True,
                                  normalize: bool = True, power_iters: int = 3) -> torch.Tensor:
    """Item embeddings from the interaction sequences alone (no item content needed).

    Method: the truncated SVD of the shifted positive PMI (SPPMI) matrix of item co-occurrence.

    1. Count co-occurrences of items at most ``window`` positions apart in the same user's sequence
       (weight ``1/distance`` when ``distance_weighting``, as in GloVe; an item next to itself is not counted),
       symmetrically, into a sparse ``[n_items, n_items]`` matrix ``C``.
    2. ``PMI(i, j) = log(C_ij · |C| / (C_i · P_α(j)·|C|))`` with context smoothing ``P_α(j) ∝ C_j^α``
       (``context_alpha``, 0.75 as in word2vec), and ``SPPMI = max(PMI − log(shift), 0)``, kept sparse.
    3. A seeded randomised SVD ``SPPMI ≈ U S Vᵀ``; the embedding is ``U · sqrt(S)``, each column's sign
       fixed so its largest-magnitude entry is positive (a deterministic output), rows L2-normalised when
       ``normalize`` (otherwise norms track popularity and k-means would cluster by popularity).

    Why: item2vec (skip-gram with negative sampling over item sequences) implicitly factorises the PMI
    matrix shifted by ``log(#negatives)`` (Levy & Goldberg, 2014), so this is its closed form: no learning
    rate, epochs or sampling noise, deterministic for a seed, and a few seconds for ~20k items.

    Items with no positive association to any other item (e.g. seen only in one-item sequences) get a
    seeded random unit direction instead of a zero vector, so they do not all fall onto one SID; a
    warning gives their count.

    Args:
        interactions: object with ``item_ids`` (length ``n_items``) and ``sequences`` (int arrays of item
            indices), e.g. :class:`gflowgr_core.data.loaders.Interactions`.
        dim: embedding size (capped at ``n_items - 1``).
        window: co-occurrence window in positions.
        seed: seed of the randomised SVD and of the fallback directions.
        shift: SPPMI shift ``k`` (``log k`` is subtracted; 1 = plain positive PMI).
        context_alpha: context distribution smoothing exponent.
        distance_weighting: weight a pair by ``1/distance``.
        normalize: L2-normalise the rows.
        power_iters: power iterations of the randomised SVD.
    Returns:
        ``FloatTensor[n_items, dim]``.
    """
    n_items = len(interactions.item_ids)
    if n_items < 2:
        raise ValueError(f"collaborative embeddings need at least 2 items, got {n_items}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if dim > n_items - 1:
        warnings.warn(f"collaborative embeddings: dim={dim} capped at n_items - 1 = {n_items - 1}", stacklevel=2)
        dim = n_items - 1

    flat, owner = _flat_sequences(interactions.sequences, n_items)
    emb = np.zeros((n_items, dim))
    sppmi = _sppmi(_cooccurrence_counts(flat, owner, n_items, window, distance_weighting), context_alpha, shift)
    if sppmi.nnz > 0:
        u, s = _randomized_svd(sppmi, dim, seed, power_iters=power_iters)
        signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
        signs[signs == 0] = 1.0
        emb = u * signs * np.sqrt(s)

    norms = np.linalg.norm(emb, axis=1)
    lonely = norms <= 1e-12 * max(float(norms.max()), 1e-30)
    n_lonely = int(lonely.sum())
    if n_lonely:
        warnings.warn(f"collaborative embeddings: {n_lonely} of {n_items} item(s) have no positive co-occurrence "
                      f"signal; they get seeded random directions", stacklevel=2)
        rng = np.random.default_rng([seed, 1])
        fallback = rng.standard_normal((n_lonely, dim))
        fallback /= np.linalg.norm(fallback, axis=1, keepdims=True)
        scale = float(np.median(norms[~lonely])) if n_lonely < n_items else 1.0
        emb[lonely] = fallback * scale
    if normalize:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return torch.from_numpy(emb.astype(np.float32))


def _flat_sequences(sequences, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """All sequences end to end, and the user index owning each position; item indices are checked."""
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    bad = (flat < 0) | (flat >= n_items)
    if bad.any():
        pos = int(np.argmax(bad))
        user = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        raise ValueError(f"sequence of user index {user} holds item index {int(flat[pos])}, outside "
                         f"[0, {n_items})")
    return flat, np.repeat(np.arange(len(seqs)), lengths)


def _cooccurrence_counts(flat: np.ndarray, owner: np.ndarray, n_items: int, window: int,
                         distance_weighting: bool) -> sp.csr_matrix:
    """Symmetric ``[n_items, n_items]`` counts of distinct items at most ``window`` positions apart in one
    user's sequence, each pair weighted ``1/distance`` when ``distance_weighting``."""
    rows, cols, vals = [], [], []
    for offset in range(1, window + 1):
        if flat.size <= offset:
            break
        a, b = flat[:-offset], flat[offset:]
        keep = (owner[:-offset] == owner[offset:]) & (a != b)
        w = 1.0 / offset if distance_weighting else 1.0
        rows += [a[keep], b[keep]]
        cols += [b[keep], a[keep]]
        vals.append(np.full(2 * int(keep.sum()), w))
    if rows:
        counts = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(n_items, n_items)).tocsr()
    else:
        counts = sp.csr_matrix((n_items, n_items))
    counts.sum_duplicates()
    return counts


def _sppmi(counts: sp.csr_matrix, context_alpha: float, shift: float) -> sp.csr_matrix:
    """The shifted positive PMI of co-occurrence ``counts`` with context smoothing ``context_alpha``
    (empty when nothing co-occurs)."""
    n_items = counts.shape[0]
    row_tot = np.asarray(counts.sum(axis=1)).ravel()
    total = float(row_tot.sum())
    if total <= 0:
        return sp.csr_matrix((n_items, n_items))
    ctx = row_tot ** context_alpha
    ctx_p = ctx / ctx.sum()
    coo = counts.tocoo()
    pmi = (np.log(coo.data) + math.log(1.0 / total) - np.log(row_tot[coo.row] / total)
           - np.log(ctx_p[coo.col]) - math.log(shift))
    pos = pmi > 0
    return sp.csr_matrix((pmi[pos], (coo.row[pos], coo.col[pos])), shape=(n_items, n_items))


def load_item_embeddings(npy_path: str | Path, num_items: int) -> torch.Tensor:
    """Read ``[num_items, D]`` item embeddings (row ``i`` = internal item ``i``) from a ``.npy`` file.

    Raises ``ValueError`` naming the file when the array is not 2-D numeric, its row count differs from
    ``num_items``, or a row holds NaN/inf (the first such row is named). Returns a ``FloatTensor``.
    """
    path = Path(npy_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: item embedding file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a plain .npy array ({exc})") from exc
    return _check_embeddings(arr, num_items, str(path))


def _check_embeddings(arr, num_items: int, source: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(arr)) if not isinstance(arr, torch.Tensor) else arr
    if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                    torch.uint8)):
        raise ValueError(f"{source}: embeddings must be numeric, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{source}: embeddings must be 2-D [num_items, D], got shape {tuple(t.shape)}")
    if t.shape[0] != num_items:
        raise ValueError(f"{source}: {t.shape[0]} embedding rows but the catalogue has {num_items} items "
                         f"(row i must be internal item i)")
    if t.shape[1] == 0:
        raise ValueError(f"{source}: embeddings have zero columns")
    t = t.float()
    finite = torch.isfinite(t).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0])
        raise ValueError(f"{source}: embedding row {row} (item index {row}) contains NaN or inf")
    return t


def build_catalog(interactions, levels: int = 3, codes: int | Sequence[int] = 256, collisions: str = "share",
                  embeddings=None, seed: int = 0, dim: int = 64, window: int = 5, iters: int = 50) -> Catalog:
    """Build a SID catalogue for ``interactions`` by RQ-KMeans.

    Args:
        interactions: ``Interactions`` (``item_ids``, ``sequences``); item ``i`` of the catalogue is
            ``interactions.item_ids[i]``.
        levels: number of RQ-KMeans levels (before any collision suffix).
        codes: codebook size per level (int, or one per level); capped where the data has fewer points.
        collisions: ``"share"`` or ``"suffix"`` (see :class:`Catalog`).
        embeddings: ``None`` to compute :func:`collaborative_item_embeddings` from ``interactions``; a path
            to a ``.npy`` file; or a ``[n_items, D]`` tensor/array.
        seed: seed of the embeddings and of k-means++.
        dim, window: collaborative embedding size and window (used when ``embeddings is None``).
        iters: maximum Lloyd iterations per level.
    Returns:
        :class:`Catalog`, whose ``provenance`` records the method, parameters and the RQ-KMeans report.

    RQ-KMeans SIDs collide more than learned tokenisers' (a residual codebook is shared by every cell of
    the level above, so dense regions of the embedding space are under-resolved): on Toys, 3 x 256 codes
    over collaborative embeddings leave about 12% of items sharing a SID, up to a few dozen per SID.
    ``collisions="suffix"`` keeps every item individually decodable; check ``Catalog.stats()``.
    """
    n_items = len(interactions.item_ids)
    started = time.perf_counter()
    if embeddings is None:
        log.info("item embeddings: collaborative (SPPMI + SVD, dim %d, window %d) over %d items", dim, window,
                 n_items)
        emb = collaborative_item_embeddings(interactions, dim=dim, window=window, seed=seed)
        source = {"embeddings": "collaborative_sppmi_svd", "dim": int(emb.shape[1]), "window": window}
    elif isinstance(embeddings, (str, Path)):
        emb = load_item_embeddings(embeddings, n_items)
        source = {"embeddings": str(embeddings)}
    else:
        emb = _check_embeddings(embeddings, n_items, "embeddings")
        source = {"embeddings": "in-memory"}
    log.info("item embeddings ready: %s (%.1f s)", tuple(emb.shape), time.perf_counter() - started)
    result = rq_kmeans(emb, levels=levels, codes=codes, seed=seed, iters=iters)
    provenance = {"method": "rq_kmeans", "seed": seed, "levels": levels, "iters": iters, **source,
                  "rq_report": result.report}
    return Catalog.from_codes(result.codes, result.codes_per_level, interactions.item_ids, collisions=collisions,
                              provenance=provenance)
