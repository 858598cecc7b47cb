import warnings

import numpy as np
import pytest
import torch

from gflowgr_core.data.loaders import Interactions
from gflowgr_core.sid.catalog import Catalog
from gflowgr_core.sid.tokenizer import (_cluster_sums, _reseed_empty, build_catalog, collaborative_item_embeddings,
                                        load_item_embeddings, rq_encode, rq_kmeans)


def _blobs(n_per=40, centers=8, dim=6, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, dim, generator=gen) * 5
    x = mu.repeat_interleave(n_per, 0) + spread * torch.randn(centers * n_per, dim, generator=gen)
    return x, torch.arange(centers).repeat_interleave(n_per)


def _grouped_interactions(n_users=120, seed=0):
    """Items 0..9 in group A, 10..19 in group B; every user browses only one group."""
    rng = np.random.default_rng(seed)
    seqs = []
    for u in range(n_users):
        group = np.arange(10) if u % 2 == 0 else np.arange(10, 20)
        seqs.append(rng.choice(group, size=8, replace=True).astype(np.int64))
    return Interactions(user_ids=[f"u{u}" for u in range(n_users)], item_ids=[f"i{i}" for i in range(20)],
                        sequences=seqs, source="synthetic")


# --------------------------------------------------------------------------------------- rq_kmeans
def test_rq_kmeans_is_deterministic_per_seed():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    a = rq_kmeans(x, levels=3, codes=16, seed=7)
    b = rq_kmeans(x, levels=3, codes=16, seed=7)
    assert torch.equal(a.codes, b.codes)
    assert all(torch.equal(p, q) for p, q in zip(a.codebooks, b.codebooks))
    c = rq_kmeans(x, levels=3, codes=16, seed=8)
    assert not torch.equal(a.codes, c.codes)


def test_rq_kmeans_shapes_and_report():
    x = torch.randn(500, 5, generator=torch.Generator().manual_seed(2))
    r = rq_kmeans(x, levels=2, codes=(10, 4), seed=0)
    assert r.codes.shape == (500, 2) and r.codes.dtype == torch.long
    assert r.codes_per_level == (10, 4)
    assert [cb.shape for cb in r.codebooks] == [(10, 5), (4, 5)]
    assert int(r.codes[:, 0].max()) < 10 and int(r.codes[:, 1].max()) < 4
    distinct = torch.unique(r.codes, dim=0).shape[0]
    assert r.report["distinct_sids"] == distinct and r.report["collisions"] == 500 - distinct
    for level, rep in enumerate(r.report["levels"]):
        used = torch.unique(r.codes[:, level]).numel()
        assert rep["codes_used"] == used and rep["usage"] == pytest.approx(used / rep["k"])
        assert rep["iterations"] >= 1 and not rep["capped"]
    # Residual quantisation: each level removes error, so the inertia decreases level by level.
    inertias = [rep["inertia"] for rep in r.report["levels"]]
    assert inertias[1] < inertias[0]
    recon = sum(cb[r.codes[:, l]] for l, cb in enumerate(r.codebooks))
    assert float(((x - recon) ** 2).sum()) == pytest.approx(inertias[-1], rel=1e-3)


def test_rq_kmeans_recovers_separated_clusters():
    x, label = _blobs()
    r = rq_kmeans(x, levels=1, codes=8, seed=0)
    codes = r.codes[:, 0]
    # Every blob maps to exactly one code, and different blobs to different codes.
    for b in range(8):
        assert torch.unique(codes[label == b]).numel() == 1
    assert torch.unique(codes).numel() == 8
    assert r.report["levels"][0]["converged"]


def test_rq_kmeans_caps_k_at_distinct_points():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)  # 12 rows, 3 distinct
    with pytest.warns(UserWarning) as record:
        r = rq_kmeans(x, levels=2, codes=256, seed=0)
    messages = [str(w.message) for w in record]
    assert any("level 0: only 3 distinct residual points for 256 requested codes; using K=3" in m
               for m in messages)
    assert any("level 1: only 1 distinct residual points" in m for m in messages)
    assert r.codes_per_level[0] == 3 and r.report["levels"][0]["capped"]
    assert torch.unique(r.codes[:3, 0]).numel() == 3
    # Level 1 residuals are all zero (1 distinct point): one code.
    assert r.codes_per_level[1] == 1 and r.report["collisions"] == 9


def test_rq_kmeans_small_n():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="using K=5"):
        r = rq_kmeans(x, levels=1, codes=256)
    assert sorted(r.codes[:, 0].tolist()) == [0, 1, 2, 3, 4]


def test_rq_kmeans_input_errors():
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        x = torch.zeros(4, 2)
        x[2, 1] = float("nan")
        rq_kmeans(x, levels=1, codes=2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        rq_kmeans(torch.zeros(4), levels=1, codes=2)
    with pytest.raises(ValueError, match="codes has 2 entries but levels=3"):
        rq_kmeans(torch.randn(4, 2), levels=3, codes=(2, 2))


def test_rq_encode_matches_training_codes():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(5))
    r = rq_kmeans(x, levels=3, codes=8, seed=1)
    assert torch.equal(rq_encode(x, r.codebooks), r.codes)


def test_cluster_sums_matmul_path_matches_index_add():
    # The one-hot matmul path is the one GPUs take; check it against index_add_ on the CPU.
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(70, 5, generator=gen, dtype=torch.float64)
    assign = torch.randint(0, 6, (70,), generator=gen)
    assign[assign == 4] = 0  # cluster 4 empty
    s1, c1 = _cluster_sums(x, assign, 7, onehot_matmul=False)
    s2, c2 = _cluster_sums(x, assign, 7, onehot_matmul=True)
    assert torch.equal(c1, c2) and c1[4] == 0 and c1[6] == 0
    assert torch.allclose(s1, s2, atol=1e-12)
    expected = torch.stack([x[assign == j].sum(0) if (assign == j).any() else torch.zeros(5, dtype=x.dtype)
                            for j in range(7)])
    assert torch.allclose(s1, expected, atol=1e-12)


def test_empty_cluster_reseeded_at_farthest_point():
    x = torch.tensor([[0.0], [0.1], [5.0], [9.0], [9.2]])
    centers = torch.tensor([[0.05], [123.0], [9.1]])
    out = _reseed_empty(x, centers.clone(), torch.tensor([False, True, False]))
    assert out[1].item() == 5.0  # farthest from the live centres 0.05 and 9.1
    both = _reseed_empty(x, torch.tensor([[0.0], [0.0], [0.0]]), torch.tensor([False, True, True]))
    assert both[1].item() == pytest.approx(9.2) and both[2].item() == 5.0  # farthest-first, one after the other


# -------------------------------------------------------------------------------- embeddings
def _cos(e):
    e = e / e.norm(dim=1, keepdim=True)
    return e @ e.T


def test_collaborative_embeddings_group_co_occurring_items():
    inter = _grouped_interactions()
    emb = collaborative_item_embeddings(inter, dim=4, window=3, seed=0)
    assert emb.shape == (20, 4) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(20), atol=1e-5)
    sim = _cos(emb)
    same = torch.zeros(20, 20, dtype=torch.bool)
    same[:10, :10] = True
    same[10:, 10:] = True
    off_diag = ~torch.eye(20, dtype=torch.bool)
    within = sim[same & off_diag].mean()
    across = sim[~same].mean()
    assert within > across + 0.5
    # Nearest neighbour of every item lies in its own group.
    nn = (sim - 2 * torch.eye(20)).argmax(dim=1)
    assert torch.equal(nn < 10, torch.arange(20) < 10)


def test_collaborative_embeddings_deterministic():
    inter = _grouped_interactions(seed=3)
    a = collaborative_item_embeddings(inter, dim=6, seed=4)
    b = collaborative_item_embeddings(inter, dim=6, seed=4)
    assert torch.equal(a, b)


def test_collaborative_embeddings_items_without_signal_get_distinct_directions():
    inter = _grouped_interactions(n_users=40)
    inter = Interactions(user_ids=inter.user_ids + ["solo1", "solo2"], item_ids=inter.item_ids + ["x", "y"],
                         sequences=inter.sequences + [np.array([20]), np.array([21])], source="synthetic")
    with pytest.warns(UserWarning, match=r"2 of 22 item\(s\) have no positive co-occurrence"):
        emb = collaborative_item_embeddings(inter, dim=4, seed=0)
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb[20:].norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(emb[20], emb[21])


def test_collaborative_embeddings_rejects_bad_item_index():
    inter = Interactions(user_ids=["a", "b"], item_ids=["i0", "i1", "i2"],
                         sequences=[np.array([0, 1]), np.array([2, 3])], source="synthetic")
    with pytest.raises(ValueError, match=r"user index 1 holds item index 3, outside \[0, 3\)"):
        collaborative_item_embeddings(inter, dim=2)


def test_load_item_embeddings(tmp_path):
    good = tmp_path / "e.npy"
    np.save(good, np.arange(12, dtype=np.float64).reshape(4, 3))
    t = load_item_embeddings(good, 4)
    assert t.dtype == torch.float32 and t.shape == (4, 3) and t[3, 2].item() == 11.0
    with pytest.raises(ValueError, match=r"e.npy: 4 embedding rows but the catalogue has 5 items"):
        load_item_embeddings(good, 5)
    nan = tmp_path / "nan.npy"
    arr = np.zeros((4, 3))
    arr[2, 0] = np.nan
    np.save(nan, arr)
    with pytest.raises(ValueError, match=r"nan.npy: embedding row 2 .*NaN"):
        load_item_embeddings(nan, 4)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(4))
    with pytest.raises(ValueError, match=r"flat.npy: embeddings must be 2-D"):
        load_item_embeddings(flat, 4)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_item_embeddings(tmp_path / "missing.npy", 4)


# ------------------------------------------------------------------------------ build_catalog
def test_build_catalog_from_interactions_suffix_and_share(tmp_path):
    inter = _grouped_interactions()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capping K on 20 items is expected here
        share = build_catalog(inter, levels=2, codes=4, collisions="share", seed=0, dim=4)
        suffix = build_catalog(inter, levels=2, codes=4, collisions="suffix", seed=0, dim=4)
    assert isinstance(share, Catalog) and share.item_ids == inter.item_ids
    assert share.codes.shape == (20, 2) and share.codes_per_level == (4, 4)
    assert torch.equal(suffix.base_codes, share.codes)
    assert torch.unique(suffix.codes, dim=0).shape[0] == 20
    # Co-occurring groups never share a first-level code.
    assert not set(share.codes[:10, 0].tolist()) & set(share.codes[10:, 0].tolist())
    assert share.provenance["embeddings"] == "collaborative_sppmi_svd"
    assert share.provenance["rq_report"]["collisions"] == share.stats()["sid_collisions"]
    share.save(tmp_path / "c")
    assert Catalog.load(tmp_path / "c").provenance == share.provenance


def test_build_catalog_from_npy_and_array(tmp_path):
    x, label = _blobs(n_per=10, centers=4, dim=3)
    inter = Interactions(user_ids=["u"], item_ids=[str(i) for i in range(40)],
                         sequences=[np.arange(40, dtype=np.int64)], source="synthetic")
    path = tmp_path / "emb.npy"
    np.save(path, x.numpy())
    a = build_catalog(inter, levels=2, codes=4, embeddings=path, seed=0)
    b = build_catalog(inter, levels=2, codes=4, embeddings=x.numpy(), seed=0)
    assert torch.equal(a.codes, b.codes)
    assert a.provenance["embeddings"] == str(path)
    for blob in range(4):
        assert torch.unique(a.codes[label == blob, 0]).numel() == 1
    with pytest.raises(ValueError, match="39 embedding rows but the catalogue has 40"):
        build_catalog(inter, levels=1, codes=4, embeddings=x[:39])
