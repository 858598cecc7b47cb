"""Trie: builders against a plain-Python trie, C++ vs PyTorch builder equality, queries, persistence."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gflowgr_core import backends
from gflowgr_core.sid import trie as trie_mod
from gflowgr_core.sid.trie import Trie

DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
HAS_CPP = backends.extension_op("trie_build") is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="compiled extension gflowgr_core._C with op trie_build "
                                                    "is not built (pip install --no-build-isolation -e .)")
BUILDERS = ["torch", pytest.param("cpp", marks=needs_cpp)]
ALL_TABLES = trie_mod._CORE + ("child_code", "child_node", "edge_key")


# ---------------------------------------------------------------- plain-Python reference trie
class RefTrie:
    """The trie spelled out with sets and dicts, numbered as the conventions say."""

    def __init__(self, rows: list[tuple[int, ...]], per_level: tuple[int, ...]):
        self.L = L = len(per_level)
        self.rows = rows
        self.sids = set(rows)
        self.levels = [sorted({r[:l] for r in rows}) for l in range(L + 1)]
        self.offsets = [0]
        for lev in self.levels:
            self.offsets.append(self.offsets[-1] + len(lev))
        self.node = {p: self.offsets[l] + i for l, lev in enumerate(self.levels) for i, p in enumerate(lev)}
        self.prefix = {v: p for p, v in self.node.items()}
        self.kids = {v: [] for v in self.prefix}
        for p, v in self.node.items():
            if p:
                self.kids[self.node[p[:-1]]].append((p[-1], v))
        for v in self.kids:
            self.kids[v].sort()
        self.items = {}
        for i, r in enumerate(rows):
            self.items.setdefault(self.node[r], []).append(i)

    def child(self, node: int, code: int) -> int:
        return dict(self.kids.get(node, [])).get(code, -1)


def random_codes(rng: random.Random, n: int, per_level: tuple[int, ...]) -> list[tuple[int, ...]]:
    # Draw from a small pool so that SIDs collide and prefixes are shared.
    pool = [tuple(rng.randrange(k) for k in per_level) for _ in range(max(1, n // 2))]
    return [rng.choice(pool) if rng.random() < 0.5 else tuple(rng.randrange(k) for k in per_level)
            for _ in range(n)]


@st.composite
def sid_sets(draw):
    L = draw(st.integers(1, 4))
    per_level = tuple(draw(st.lists(st.integers(1, 5), min_size=L, max_size=L)))
    n = draw(st.integers(1, 40))
    rng = random.Random(draw(st.integers(0, 2 ** 32 - 1)))
    return random_codes(rng, n, per_level), per_level


def as_tensor(rows, L):
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), L)


# ---------------------------------------------------------------- exact tables against the reference
def check_tables(t: Trie, ref: RefTrie, per_level):
    L = ref.L
    n_nodes = ref.offsets[-1]
    assert t.level_offsets.tolist() == ref.offsets
    assert t.num_nodes == n_nodes and t.num_edges == n_nodes - 1
    parent = [-1] + [ref.node[ref.prefix[v][:-1]] for v in range(1, n_nodes)]
    codes = [-1] + [ref.prefix[v][-1] for v in range(1, n_nodes)]
    assert t.parent.tolist() == parent
    assert t.node_code.tolist() == codes
    indptr, child_code, child_node = [0], [], []
    for v in range(n_nodes):
        for c, k in ref.kids[v]:
            child_code.append(c)
            child_node.append(k)
        indptr.append(len(child_code))
    assert t.indptr.tolist() == indptr
    assert t.child_code.tolist() == child_code
    assert t.child_node.tolist() == child_node
    assert t.max_branch == tuple(max(len(ref.kids[v]) for v in range(ref.offsets[l], ref.offsets[l + 1]))
                                 for l in range(L))
    leaves = range(ref.offsets[L], ref.offsets[L + 1])
    assert t.leaf_ptr.tolist() == [0] + list(torch.tensor([len(ref.items[v]) for v in leaves]).cumsum(0).tolist())
    assert t.leaf_items.tolist() == [i for v in leaves for i in ref.items[v]]
    assert t.item_leaf.tolist() == [ref.node[r] for r in ref.rows]
    assert t.max_items_per_leaf == max(len(x) for x in ref.items.values())
    for l, table in enumerate(t.dense):
        expect = [[ref.child(v, c) for c in range(per_level[l])]
                  for v in range(ref.offsets[l], ref.offsets[l + 1])]
        assert table.tolist() == expect


def check_queries(t: Trie, ref: RefTrie, per_level, rng: random.Random):
    L, n_nodes, kmax = ref.L, ref.offsets[-1], max(per_level)
    # next_node over every (node, code) pair, including out-of-range ids on both sides.
    nodes = torch.arange(-1, n_nodes + 2).repeat_interleave(kmax + 3)
    codes = torch.arange(-1, kmax + 2).repeat(n_nodes + 3)
    expect = [ref.child(int(v), int(c)) for v, c in zip(nodes, codes)]
    assert t.next_node(nodes, codes).tolist() == expect
    for l in range(L):
        at_level = [e if ref.offsets[l] <= int(v) < ref.offsets[l + 1] else -1 for v, e in zip(nodes, expect)]
        assert t.next_node(nodes, codes, level=l).tolist() == at_level
    # every catalogue SID is reachable, and no phantom SID is
    member = as_tensor(ref.rows, L)
    assert t.contains(member).all()
    assert t.leaf_of(member).tolist() == [ref.node[r] for r in ref.rows]
    probes = [tuple(rng.randrange(-1, k + 1) for k in per_level) for _ in range(60)]
    assert t.contains(as_tensor(probes, L)).tolist() == [p in ref.sids for p in probes]
    # children / child_mask per level, and without a level
    for l in range(L):
        lv = torch.arange(-1, n_nodes + 1)
        c, k, valid = t.children(lv, l)
        assert c.shape == (n_nodes + 2, t.max_branch[l])
        mask = t.child_mask(lv, l)
        assert mask.shape == (n_nodes + 2, per_level[l])
        for r, v in enumerate(lv.tolist()):
            kids = ref.kids.get(v, []) if ref.offsets[l] <= v < ref.offsets[l + 1] else []
            assert c[r][valid[r]].tolist() == [x for x, _ in kids]
            assert k[r][valid[r]].tolist() == [y for _, y in kids]
            assert (c[r][~valid[r]] == -1).all() and (k[r][~valid[r]] == -1).all()
            assert valid[r].tolist() == [True] * len(kids) + [False] * (t.max_branch[l] - len(kids))
            assert mask[r].nonzero().flatten().tolist() == [x for x, _ in kids]
    c, k, valid = t.children(torch.arange(n_nodes))
    assert c.shape[1] == max(t.max_branch)
    for v in range(n_nodes):
        assert list(zip(c[v][valid[v]].tolist(), k[v][valid[v]].tolist())) == ref.kids[v]
    # leaves: SIDs and items (with collisions), non-leaves give -1 / nothing
    everything = torch.arange(-1, n_nodes + 1)
    sid = t.leaf_sid(everything)
    items, ivalid = t.items_of_leaves(everything)
    for r, v in enumerate(everything.tolist()):
        if ref.offsets[L] <= v < ref.offsets[L + 1]:
            assert tuple(sid[r].tolist()) == ref.prefix[v]
            assert items[r][ivalid[r]].tolist() == ref.items[v]
        else:
            assert (sid[r] == -1).all() and not ivalid[r].any()
        assert (items[r][~ivalid[r]] == -1).all()
    lvl = t.node_level(everything).tolist()
    assert lvl == [-1] + [len(ref.prefix[v]) for v in range(n_nodes)] + [-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sid_sets(), st.sampled_from([0, 1, 2, 4]))
def test_property_matches_reference_trie(sid_set, dense_levels):
    rows, per_level = sid_set
    ref = RefTrie(rows, per_level)
    t = Trie.build(as_tensor(rows, len(per_level)), per_level, dense_levels=dense_levels, backend="torch")
    assert t.builder == "torch"
    assert t.num_dense == min(dense_levels, len(per_level))
    check_tables(t, ref, per_level)
    check_queries(t, ref, per_level, random.Random(len(rows)))
    if HAS_CPP:
        c = Trie.build(as_tensor(rows, len(per_level)), per_level, dense_levels=dense_levels, backend="cpp")
        assert_same_trie(t, c)


def assert_same_trie(a: Trie, b: Trie):
    for name in ALL_TABLES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.long, name
        assert torch.equal(x.cpu(), y.cpu()), name
    assert a.max_branch == b.max_branch and a.max_items_per_leaf == b.max_items_per_leaf
    assert a.codes_per_level == b.codes_per_level
    assert len(a.dense) == len(b.dense)
    for x, y in zip(a.dense, b.dense):
        assert torch.equal(x.cpu(), y.cpu())


# ---------------------------------------------------------------- C++ builder
@needs_cpp
@pytest.mark.parametrize("n, per_level", [
    (60_000, (256, 256, 256, 256)),       # mostly unique SIDs, dense first levels
    (50_000, (2, 3, 2)),                  # long runs of colliding SIDs across thread chunks
    (40_000, (4096,) * 8),                # mixed-radix key wider than 64 bits (LSD path in PyTorch)
    (30_000, (200_000, 3, 70_000)),       # 37-bit packed key, levels wider than one sort digit
    (30_000, (1, 200_000, 1 << 20, 5, 1 << 20)),  # > 64 bits and > 16 bits per level: gather path
    (20_000, (1, 1, 1)),                  # zero-bit levels: every SID equal
])
def test_cpp_equals_torch_large(n, per_level):
    g = torch.Generator().manual_seed(n)
    codes = torch.stack([torch.randint(0, k, (n,), generator=g) for k in per_level], dim=1)
    a = Trie.build(codes, per_level, backend="torch")
    b = Trie.build(codes, per_level, backend="cpp")
    assert b.builder == "cpp"
    assert_same_trie(a, b)
    assert b.contains(codes).all()
    assert torch.equal(b.leaf_of(codes), b.item_leaf)


@needs_cpp
def test_cpp_result_independent_of_thread_count():
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 3, (70_000, 3), generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(Trie.build(codes, (3, 3, 3), backend="cpp"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert_same_trie(results[0], other)


@needs_cpp
def test_cpp_op_checks_inputs_itself():
    op = backends.extension_op("trie_build")
    with pytest.raises(RuntimeError, match="item row 1, level 0: code 9"):
        op(torch.tensor([[0, 1], [9, 0]]), [4, 4])
    with pytest.raises(RuntimeError, match="levels per row"):
        op(torch.tensor([[0, 1]]), [4])
    with pytest.raises(RuntimeError, match="int64"):
        op(torch.tensor([[0, 1]], dtype=torch.int32), [4, 4])
    with pytest.raises(RuntimeError, match="codes must be contiguous"):
        op(torch.tensor([[0, 1, 7], [1, 0, 7]])[:, :2], [4, 4])


@pytest.mark.parametrize("backend", BUILDERS)
def test_strided_codes_build_the_same_trie(backend):
    """A strided view of the codes (every other column of a wider table) builds the contiguous codes' trie."""
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 5, (300, 3), generator=g)
    wide = torch.stack([codes, torch.randint(0, 5, (300, 3), generator=g)], dim=-1).reshape(300, 6)
    view = wide[:, 0::2]
    assert torch.equal(view, codes) and not view.is_contiguous()
    assert_same_trie(Trie.build(view, (5, 5, 5), backend=backend), Trie.build(codes, (5, 5, 5), backend="torch"))


def test_auto_uses_cpp_exactly_when_available():
    t = Trie.build(torch.tensor([[0, 1], [1, 1]]), (2, 2))
    assert t.builder == ("cpp" if HAS_CPP else "torch")


def test_cpp_backend_missing_raises(monkeypatch):
    monkeypatch.setattr(backends, "extension_op", lambda name: None)
    with pytest.raises(RuntimeError, match="C.. trie builder is not available"):
        Trie.build(torch.tensor([[0, 1]]), (2, 2), backend="cpp")
    assert Trie.build(torch.tensor([[0, 1]]), (2, 2)).builder == "torch"


# ---------------------------------------------------------------- dense vs sparse, caps
def test_dense_and_sparse_lookups_agree():
    g = torch.Generator().manual_seed(3)
    per_level = (16, 9, 16)
    codes = torch.stack([torch.randint(0, k, (3000,), generator=g) for k in per_level], dim=1)
    dense = Trie.build(codes, per_level, dense_levels=3, backend="torch")
    sparse = Trie.build(codes, per_level, dense_levels=0, backend="torch")
    assert dense.num_dense == 3 and sparse.num_dense == 0
    nodes = torch.randint(-2, dense.num_nodes + 2, (5000,), generator=g)
    cand = torch.randint(-2, 18, (5000,), generator=g)
    for l in range(3):
        assert torch.equal(dense.next_node(nodes, cand, level=l), sparse.next_node(nodes, cand, level=l))
        assert torch.equal(dense.child_mask(nodes, l), sparse.child_mask(nodes, l))
    # With no level the search is global; it agrees with the per-level lookup on each level's nodes.
    lvl = dense.node_level(nodes)
    combined = torch.full_like(nodes, -1)
    for l in range(3):
        combined = torch.where(lvl == l, dense.next_node(nodes, cand, level=l), combined)
    assert torch.equal(dense.next_node(nodes, cand), combined)
    # Lookups keep the input's shape.
    grid = dense.next_node(nodes.view(50, 100), cand.view(50, 100), level=1)
    assert grid.shape == (50, 100)


def test_dense_levels_stop_at_size_cap():
    codes = torch.tensor([[a, b, c] for a in range(4) for b in range(4) for c in range(2)])
    t = Trie.build(codes, (4, 4, 2), dense_levels=3, dense_max_entries=16, backend="torch")
    # level 0: 1x4, level 1: 4x4 = 16 fit; level 2: 16x2 = 32 does not.
    assert [tuple(d.shape) for d in t.dense] == [(1, 4), (4, 4)]
    t0 = Trie.build(codes, (4, 4, 2), dense_levels=3, dense_max_entries=3, backend="torch")
    assert t0.num_dense == 0
    assert torch.equal(t0.leaf_of(codes), t.leaf_of(codes))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("backend", BUILDERS)
def test_out_of_range_code_names_the_row(backend):
    codes = torch.tensor([[0, 1, 2], [1, 1, 1], [0, 5, 0], [0, -1, 0]])
    with pytest.raises(ValueError, match=r"item row 2, level 1: code 5 is outside \[0, 3\) \(2 row"):
        Trie.build(codes, (2, 3, 3), backend=backend)
    with pytest.raises(ValueError, match=r"item row 0, level 0: code -1"):
        Trie.build(torch.tensor([[-1, 0]]), (2, 2), backend=backend)


@pytest.mark.parametrize("codes, per_level, error, message", [
    (torch.tensor([[0, 1]]), (2, 2, 2), ValueError, r"2 levels per row .* 3 levels"),
    (torch.tensor([0, 1]), (2, 2), ValueError, "must be 2-D"),
    (torch.zeros(0, 2, dtype=torch.long), (2, 2), ValueError, "no rows"),
    (torch.tensor([[0.0, 1.0]]), (2, 2), TypeError, "integers"),
    (torch.tensor([[0, 0]]), (2, 0), ValueError, r"codes_per_level\[1\] = 0"),
    (torch.tensor([[0, 0]]), (), ValueError, "codes_per_level is empty"),
    ([[0, 0]], (2, 2), TypeError, "torch.Tensor"),
])
def test_invalid_inputs(codes, per_level, error, message):
    with pytest.raises(error, match=message):
        Trie.build(codes, per_level, backend="torch")


def test_bad_backend_and_levels():
    t = Trie.build(torch.tensor([[0, 1], [1, 0]]), (2, 2), backend="torch")
    with pytest.raises(ValueError, match="unknown trie builder backend"):
        Trie.build(torch.tensor([[0, 1]]), (2, 2), backend="triton")
    with pytest.raises(ValueError, match=r"level must be in \[0, 2\), got 2"):
        t.child_mask(torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="level must be"):
        t.children(torch.tensor([0]), -1)
    with pytest.raises(ValueError, match=r"codes must be \[..., L=2\]"):
        t.contains(torch.tensor([[0, 1, 0]]))


def test_small_integer_dtypes_are_accepted():
    codes = torch.tensor([[0, 3], [2, 1]], dtype=torch.uint8)
    t = Trie.build(codes, (3, 4), backend="torch")
    assert t.contains(codes).all()
    assert t.next_node(torch.tensor([0], dtype=torch.int32), torch.tensor([2], dtype=torch.int16)).tolist() == [2]


# ---------------------------------------------------------------- persistence and devices
def test_state_dict_and_save_load_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 5, (400, 3), generator=g)
    t = Trie.build(codes, (5, 5, 5), dense_levels=1, backend="torch")
    again = Trie.from_state_dict(t.state_dict())
    assert_same_trie(t, again)
    assert again.dense_levels == 1 and again.num_dense == 1
    path = t.save(tmp_path / "prepared")
    assert path == tmp_path / "prepared" / "trie.pt"
    loaded = Trie.load(tmp_path / "prepared")
    assert_same_trie(t, loaded)
    assert loaded.stats() == t.stats()
    with pytest.raises(FileNotFoundError, match="no trie file"):
        Trie.load(tmp_path / "elsewhere")
    broken = t.state_dict()
    del broken["parent"]
    with pytest.raises(ValueError, match="lacks tensor 'parent'"):
        Trie.from_state_dict(broken)
    torch.save({"format": "other"}, tmp_path / "trie.pt")
    with pytest.raises(ValueError, match=r"trie.pt: not a trie state"):
        Trie.load(tmp_path)


def test_stats_counts():
    codes = torch.tensor([[0, 0], [0, 1], [1, 1], [0, 1], [0, 1]])
    s = Trie.build(codes, (2, 2), backend="torch").stats()
    assert s["nodes_per_level"] == [1, 2, 3]
    assert s["num_edges"] == 5 and s["num_leaves"] == 3 and s["num_items"] == 5
    assert s["items_sharing_a_leaf"] == 2 and s["max_items_per_leaf"] == 3
    assert s["max_branch"] == [2, 2] and s["dense_levels"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BUILDERS)
def test_cuda_build_and_queries_match_cpu_without_host_sync(backend):
    g = torch.Generator().manual_seed(5)
    per_level = (32, 32, 32, 8)
    codes = torch.stack([torch.randint(0, k, (20_000,), generator=g) for k in per_level], dim=1)
    cpu = Trie.build(codes, per_level, backend="torch")
    gpu = Trie.build(codes.cuda(), per_level, backend=backend)
    assert gpu.device.type == "cuda"
    assert_same_trie(cpu, gpu)
    moved = cpu.to("cuda")
    assert_same_trie(cpu, moved)
    nodes = torch.randint(-1, cpu.num_nodes, (4096,), generator=g)
    cand = torch.randint(0, 32, (4096,), generator=g)
    nodes_d, cand_d, codes_d = nodes.cuda(), cand.cuda(), codes.cuda()
    leaves_d = gpu.item_leaf[:4096].clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [gpu.next_node(nodes_d, cand_d), gpu.next_node(nodes_d, cand_d, level=1),
               gpu.next_node(nodes_d, cand_d, level=2), *gpu.children(nodes_d, 2), gpu.child_mask(nodes_d, 2),
               gpu.child_mask(nodes_d, 0), gpu.contains(codes_d), gpu.leaf_sid(leaves_d),
               *gpu.items_of_leaves(leaves_d), gpu.node_level(nodes_d)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    leaves = cpu.item_leaf[:4096]
    ref = [cpu.next_node(nodes, cand), cpu.next_node(nodes, cand, level=1), cpu.next_node(nodes, cand, level=2),
           *cpu.children(nodes, 2), cpu.child_mask(nodes, 2), cpu.child_mask(nodes, 0), cpu.contains(codes),
           cpu.leaf_sid(leaves), *cpu.items_of_leaves(leaves), cpu.node_level(nodes)]
    for a, b in zip(out, ref):
        assert torch.equal(a.cpu(), b)


# ---------------------------------------------------------------- real catalogue
def test_beauty_letter_sids():
    index = DATA / "letter" / "Beauty" / "Beauty.index.json"
    if not index.is_file():
        pytest.skip(f"shared data absent: {index}")
    raw = json.loads(index.read_text())
    rows = [[int(tok.split("_")[1].rstrip(">")) for tok in raw[key]] for key in sorted(raw, key=int)]
    codes = torch.tensor(rows)
    t = Trie.build(codes, (256,) * 4)
    s = t.stats()
    assert s["num_items"] == 12_101 and s["num_leaves"] == 12_088 and s["items_sharing_a_leaf"] == 13
    assert t.contains(codes).all()
    assert torch.equal(t.leaf_of(codes), t.item_leaf)
    assert torch.equal(t.leaf_sid(t.item_leaf), codes)
    if HAS_CPP:
        assert_same_trie(t, Trie.build(codes, (256,) * 4, backend="torch"))
