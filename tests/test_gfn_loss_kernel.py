"""Fused Triton log P_F / GFlowNet loss against the plain-PyTorch reference, forward and every gradient.

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py when there is no GPU) at small sizes, and on CUDA
at full size when a GPU is present. Relative error is ``max|fused - ref| / max|ref|`` against the reference
evaluated in fp32 (fp64 for the fp32 case) on the same (already rounded) inputs: <= 1e-5 for fp32 inputs,
<= 1e-2 for bf16 / fp16. Every kernel output is poisoned with NaN before launch, so an element a kernel
forgets to write fails the finiteness checks.
"""
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="triton is not installed")

from gflowgr_core import backends  # noqa: E402
from gflowgr_core.objectives import (constrained_log_pf, gfn_loss, gfn_loss_reference,  # noqa: E402
                                     constrained_log_pf_torch, resolve_objective, sft_cross_entropy, trie_walk)
from gflowgr_core.sid.trie import Trie  # noqa: E402
from catalogues import random_catalogue  # noqa: E402  (tests/ is on sys.path under pytest)

gfn_loss_module = importlib.import_module("gflowgr_core.objectives.gfn_loss")
kern = backends.kernel_module("constrained_log_pf")
kernel_utils = backends.kernel_module("utils")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if HAS_CUDA and not INTERPRET else [])
if not DEVICES:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run here",
                allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Smallest tiles: with the toy sizes below every loop (rows, codes, d) runs over several tiles and the
# weight gradient is split into several row chunks.
TINY_TILES = kern.KernelConfig(fwd_block_t=16, fwd_block_k=16, fwd_block_d=16, dh_block_t=16, dh_block_k=16,
                               dh_block_d=16, dw_block_t=16, dw_block_k=16, dw_block_d=16,
                               dw_min_programs=10 ** 6, num_warps=4, num_stages=1)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


# ------------------------------------------------------------------------------------ problem builders

@dataclasses.dataclass
class Problem:
    trie: Trie
    cpl: tuple
    codes: torch.Tensor      # [T, L] trajectories
    h: torch.Tensor          # [T, L, d]
    w_sid: torch.Tensor      # [sum K, d]
    bias: torch.Tensor       # [sum K] fp32
    log_z: torch.Tensor      # [T]
    log_f: torch.Tensor      # [T, L-1]
    log_r: torch.Tensor      # [T]
    weights: torch.Tensor    # [T]


def make_problem(seed: int, cpl, t: int, d: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    catalogue = random_catalogue(gen, cpl, n_items=max(8, 3 * t))
    trie = Trie.build(catalogue, cpl).to(device)
    codes = catalogue[torch.randint(0, catalogue.shape[0], (t,), generator=gen)]
    n_levels, total = len(cpl), sum(cpl)
    h = (torch.randn(t, n_levels, d, generator=gen) * scale / d ** 0.25).to(dtype)
    w = (torch.randn(total, d, generator=gen) * scale / d ** 0.25).to(dtype)
    return Problem(trie, tuple(cpl), codes.to(device), h.to(device), w.to(device),
                   torch.randn(total, generator=gen).to(device),
                   torch.randn(t, generator=gen).to(device), torch.randn(t, n_levels - 1, generator=gen).to(device),
                   torch.randn(t, generator=gen).to(device), torch.rand(t, generator=gen).to(device) * 2)


def sizes(device: str):
    """(cpl, T, d) cases: toy and odd on the interpreter, the production shape on a GPU."""
    if device == "cpu":
        return [((5, 33, 17, 2), 19, 37), ((40, 3), 7, 3)]
    return [((256, 256, 256, 256), 1024, 1536), ((5, 33, 17, 2), 333, 97), ((300, 7, 129), 129, 4096)]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    got, ref = got.detach().double(), ref.detach().double()
    assert torch.isfinite(got).all(), "non-finite values in the fused result"
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if got.numel() else 0.0


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.detach().clone().to(dtype or x.dtype).requires_grad_(True)


def ref_dtype(dtype):
    return torch.float64 if dtype == torch.float32 else torch.float32


# ------------------------------------------------------------------------------------ log P_F parity

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("support", ["trie", "level"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_log_pf_and_gradients_match_reference(device, dtype, support, with_bias):
    for case, (cpl, t, d) in enumerate(sizes(device)):
        p = make_problem(100 + case, cpl, t, d, dtype, device)
        h, w = leaf(p.h), leaf(p.w_sid)
        b = leaf(p.bias) if with_bias else None
        log_pf = kern.constrained_log_pf_triton(h, w, p.codes, p.trie, support, bias=b)
        assert log_pf.dtype == torch.float32 and log_pf.shape == p.codes.shape
        upstream = torch.randn(log_pf.shape, generator=torch.Generator().manual_seed(case)).to(device)
        grads = torch.autograd.grad(log_pf, [x for x in (h, w, b) if x is not None], upstream)

        rd = ref_dtype(dtype)
        hr, wr = leaf(p.h, rd), leaf(p.w_sid, rd)
        br = leaf(p.bias, rd) if with_bias else None
        ref = constrained_log_pf(hr, wr, p.codes, p.trie, support, bias=br)
        ref_grads = torch.autograd.grad(ref, [x for x in (hr, wr, br) if x is not None], upstream.to(rd))

        assert rel_err(log_pf, ref) <= TOL[dtype], f"log_pf, case {case}"
        for name, g, r in zip(("h", "w_sid", "bias"), grads, ref_grads):
            assert g.dtype == {"h": h, "w_sid": w, "bias": b}[name].dtype
            assert rel_err(g, r) <= TOL[dtype], f"grad {name}, case {case}"


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_inputs(device):
    cpl, t, d = sizes(device)[0]
    p = make_problem(7, cpl, t, d, torch.float16, device)
    h, w = leaf(p.h), leaf(p.w_sid)
    log_pf = kern.constrained_log_pf_triton(h, w, p.codes, p.trie)
    log_pf.sum().backward()
    hr, wr = leaf(p.h, torch.float32), leaf(p.w_sid, torch.float32)
    ref = constrained_log_pf(hr, wr, p.codes, p.trie)
    ref.sum().backward()
    assert rel_err(log_pf, ref) <= TOL[torch.float16]
    assert rel_err(h.grad, hr.grad) <= TOL[torch.float16]
    assert rel_err(w.grad, wr.grad) <= TOL[torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tile_loops_and_split_weight_gradient(device, dtype):
    """16-wide tiles: rows, codes and d each span several tiles; the weight gradient sums row chunks."""
    cpl, t, d = ((21, 50, 3), 35, 45) if device == "cpu" else ((256, 100, 256), 500, 200)
    p = make_problem(11, cpl, t, d, dtype, device)
    h, w = leaf(p.h), leaf(p.w_sid)
    log_pf = kern.constrained_log_pf_triton(h, w, p.codes, p.trie, config=TINY_TILES)
    upstream = torch.randn(log_pf.shape, generator=torch.Generator().manual_seed(3)).to(device)
    gh, gw = torch.autograd.grad(log_pf, (h, w), upstream)
    rd = ref_dtype(dtype)
    hr, wr = leaf(p.h, rd), leaf(p.w_sid, rd)
    ref = constrained_log_pf(hr, wr, p.codes, p.trie)
    rh, rw = torch.autograd.grad(ref, (hr, wr), upstream.to(rd))
    assert rel_err(log_pf, ref) <= TOL[dtype]
    assert rel_err(gh, rh) <= TOL[dtype]
    assert rel_err(gw, rw) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_strided_hidden_states(device):
    """``h`` as a non-contiguous view (levels-major storage, then transposed) gives the same values."""
    cpl, t, d = sizes(device)[0]
    p = make_problem(5, cpl, t, d, torch.float32, device)
    storage = leaf(p.h.transpose(0, 1).contiguous())       # [L, T, d]
    h = storage.transpose(0, 1)                              # [T, L, d] view, stride(0) = d
    log_pf = kern.constrained_log_pf_triton(h, p.w_sid, p.codes, p.trie)
    log_pf.sum().backward()
    hr = leaf(p.h, torch.float64)
    ref = constrained_log_pf(hr, p.w_sid.double(), p.codes, p.trie)
    ref.sum().backward()
    assert rel_err(log_pf, ref) <= 1e-5
    assert rel_err(storage.grad.transpose(0, 1), hr.grad) <= 1e-5


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 31 - 1), n_levels=st.integers(1, 4), t=st.integers(1, 21),
       d=st.integers(1, 50), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_shapes_property(seed, n_levels, t, d, dtype):
    """Fresh random tries and shapes (odd T, d, K_l; single-level SIDs; T = 1)."""
    device = DEVICES[0]
    gen = torch.Generator().manual_seed(seed)
    cpl = tuple(int(k) for k in torch.randint(1, 40, (n_levels,), generator=gen))
    p = make_problem(seed, cpl, t, d, dtype, device)
    h, w, b = leaf(p.h), leaf(p.w_sid), leaf(p.bias)
    log_pf = kern.constrained_log_pf_triton(h, w, p.codes, p.trie, bias=b)
    log_pf.sum().backward()
    rd = ref_dtype(dtype)
    hr, wr, br = leaf(p.h, rd), leaf(p.w_sid, rd), leaf(p.bias, rd)
    ref = constrained_log_pf(hr, wr, p.codes, p.trie, bias=br)
    ref.sum().backward()
    tol = TOL[dtype]
    assert rel_err(log_pf, ref) <= tol
    for g, r in ((h.grad, hr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        if r.abs().max() > 0:  # a level with one code in every node has probability 1: zero gradient
            assert rel_err(g, r) <= tol
        else:
            assert torch.isfinite(g).all() and g.abs().max() <= 1e-6


# ------------------------------------------------------------------------------------ GFlowNet losses

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective", ["tb", "db", "subtb"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gfn_loss_and_every_gradient_match_reference(device, dtype, objective, weighted):
    cpl, t, d = sizes(device)[0]
    p = make_problem(200, cpl, t, d, dtype, device)
    h, w = leaf(p.h), leaf(p.w_sid)
    log_f, log_z, log_r = leaf(p.log_f), leaf(p.log_z), leaf(p.log_r)
    weights = p.weights if weighted else None
    loss, log_pf = kern.gfn_loss_triton(h, w, p.codes, p.trie, log_f, log_z, log_r,
                                        objective=resolve_objective(objective, 0.7), weights=weights)
    grads = torch.autograd.grad(loss, (h, w, log_f, log_z, log_r), allow_unused=True)

    rd = ref_dtype(dtype)
    hr, wr = leaf(p.h, rd), leaf(p.w_sid, rd)
    fr, zr, rr = leaf(p.log_f, rd), leaf(p.log_z, rd), leaf(p.log_r, rd)
    ref_loss, ref_log_pf = gfn_loss_reference(hr, wr, p.codes, p.trie, fr, zr, rr, objective, subtb_lambda=0.7,
                                              weights=None if weights is None else weights.to(rd))
    ref_grads = torch.autograd.grad(ref_loss, (hr, wr, fr, zr, rr), allow_unused=True)

    assert loss.dim() == 0 and torch.isfinite(loss)
    assert rel_err(loss, ref_loss) <= TOL[dtype]
    assert rel_err(log_pf, ref_log_pf) <= TOL[dtype]
    names = ("h", "w_sid", "log_f", "log_z", "log_r")
    for name, g, r in zip(names, grads, ref_grads):
        if name == "log_f" and objective == "tb":
            assert g is None or float(g.abs().max()) == 0.0
            continue
        assert rel_err(g, r) <= TOL[dtype], f"grad {name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sft_cross_entropy_matches_reference(device, dtype):
    cpl, t, d = sizes(device)[0]
    p = make_problem(300, cpl, t, d, dtype, device)
    mask = torch.rand(p.codes.shape, generator=torch.Generator().manual_seed(1)).to(device) > 0.3
    h, w = leaf(p.h), leaf(p.w_sid)
    loss = sft_cross_entropy(kern.constrained_log_pf_triton(h, w, p.codes, p.trie), mask)
    loss.backward()
    rd = ref_dtype(dtype)
    hr, wr = leaf(p.h, rd), leaf(p.w_sid, rd)
    ref = sft_cross_entropy(constrained_log_pf(hr, wr, p.codes, p.trie), mask)
    ref.backward()
    assert rel_err(loss, ref) <= TOL[dtype]
    assert rel_err(h.grad, hr.grad) <= TOL[dtype]
    assert rel_err(w.grad, wr.grad) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device):
    cpl, t, d = sizes(device)[0]
    p = make_problem(9, cpl, t, d, torch.float32, device)
    w = leaf(p.w_sid)
    log_pf = kern.constrained_log_pf_triton(p.h, w, p.codes, p.trie)
    log_pf.sum().backward()
    wr = leaf(p.w_sid, torch.float64)
    constrained_log_pf(p.h.double(), wr, p.codes, p.trie).sum().backward()
    assert rel_err(w.grad, wr.grad) <= 1e-5


# ------------------------------------------------------------------------------------ tables and errors

@pytest.mark.parametrize("device", DEVICES)
def test_child_bits_agree_with_child_mask(device):
    cpl = (70, 33, 5)
    gen = torch.Generator().manual_seed(4)
    trie = Trie.build(random_catalogue(gen, cpl, 200), cpl).to(device)
    bits = kern.trie_child_bits(trie)
    assert bits is kern.trie_child_bits(trie), "the bitmap is cached per trie"
    assert bits.dtype == torch.int32 and bits.shape == (sum(trie.nodes_per_level[:3]), 3)
    offsets = trie.level_offsets.tolist()
    for lvl, k in enumerate(cpl):
        nodes = torch.arange(offsets[lvl], offsets[lvl + 1], device=device)
        codes = torch.arange(k, device=device)
        got = ((bits[nodes][:, codes // 32] >> (codes % 32)) & 1).bool()
        assert torch.equal(got, trie.child_mask(nodes, lvl))


def child_bits_int64(trie) -> torch.Tensor:
    """The bitmap as it was built before (an int64 table, then reinterpreted as int32): the equality target
    of the int32 builder."""
    n_internal = sum(trie.nodes_per_level[:trie.num_levels])
    words = (trie.max_codes + 31) // 32
    src, code = trie.parent[trie.child_node], trie.child_code
    table = torch.zeros(n_internal * words, dtype=torch.int64, device=trie.device)
    table.index_add_(0, src * words + (code >> 5), torch.bitwise_left_shift(torch.ones_like(code), code & 31))
    return torch.where(table >= 2 ** 31, table - 2 ** 32, table).to(torch.int32).view(n_internal, words)


@pytest.mark.parametrize("seed", range(6))
def test_child_bits_identical_to_the_int64_construction(seed):
    device = DEVICES[0]
    gen = torch.Generator().manual_seed(100 + seed)
    n_levels = int(torch.randint(1, 5, (1,), generator=gen))
    # Levels up to 256 codes: every bit of a word is used, the sign bit (codes 31, 63, ...) included.
    cpl = tuple(int(k) for k in torch.randint(1, 257, (n_levels,), generator=gen))
    trie = Trie.build(random_catalogue(gen, cpl, int(torch.randint(1, 3000, (1,), generator=gen))), cpl).to(device)
    got = kern.trie_child_bits(trie)
    assert got.dtype == torch.int32 and torch.equal(got, child_bits_int64(trie))


def _strided_inputs(p: Problem):
    """``h`` with a non-unit last stride, ``w_sid`` transposed in memory, bias and codes with junk between
    their values: views equal to the problem's tensors."""
    h = torch.stack([p.h, torch.full_like(p.h, float("nan"))], dim=-1)[..., 0]
    w = p.w_sid.t().contiguous().t()
    bias = torch.stack([p.bias, torch.full_like(p.bias, float("nan"))], dim=-1)[..., 0]
    codes = torch.stack([p.codes, torch.zeros_like(p.codes)], dim=-1)[..., 0]
    for x, y in ((h, p.h), (w, p.w_sid), (bias, p.bias), (codes, p.codes)):
        assert torch.equal(x, y) and not x.is_contiguous()
    return h, w, bias, codes


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("support", ["trie", "level"])
def test_strided_inputs_match_contiguous(backend, support):
    """Both backends of constrained_log_pf and gfn_loss give the contiguous inputs' values on strided views."""
    device = DEVICES[0]
    cpl, t, d = sizes(device)[0]
    p = make_problem(21, cpl, t, d, torch.float32, device)
    h, w, bias, codes = _strided_inputs(p)
    ref = constrained_log_pf(p.h.double(), p.w_sid.double(), p.codes, p.trie, support, bias=p.bias.double())
    got = constrained_log_pf(h, w, codes, p.trie, support, bias=bias, backend=backend)
    assert backends.last_resolution("constrained_log_pf").name == backend
    assert rel_err(got, ref) <= 1e-5
    out = gfn_loss(h, w, codes, p.trie, p.log_f, p.log_z, p.log_r, "subtb", support=support, bias=bias,
                   backend=backend)
    ref_loss, _ = gfn_loss_reference(p.h.double(), p.w_sid.double(), p.codes, p.trie, p.log_f.double(),
                                     p.log_z.double(), p.log_r.double(), "subtb", support=support,
                                     bias=p.bias.double())
    assert out.backend == backend and rel_err(out.loss, ref_loss) <= 1e-5


def test_kernel_launcher_rejects_a_strided_bias():
    p = make_problem(22, *sizes(DEVICES[0])[0], torch.float32, DEVICES[0])
    _, _, bias, _ = _strided_inputs(p)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        kern.logpf_forward(p.h, p.w_sid, p.codes, p.cpl, bias=bias)


@pytest.mark.parametrize("op", ["gfn_loss", "constrained_log_pf"])
def test_autocast_sends_bf16_operands_to_the_fused_kernel(op, monkeypatch):
    """Autocast does not cast custom autograd inputs: the dispatcher casts h, the SID rows and the bias."""
    device = DEVICES[0]
    p = make_problem(23, *sizes(device)[0], torch.float32, device)
    seen = []
    forward = kern.logpf_forward

    def spy(h, w_sid, codes, cpl, nodes=None, child_bits=None, bias=None, config=None):
        seen.append((h.dtype, w_sid.dtype, bias.dtype))
        return forward(h, w_sid, codes, cpl, nodes, child_bits, bias, config)

    monkeypatch.setattr(kern, "logpf_forward", spy)
    h, w, b = leaf(p.h), leaf(p.w_sid), leaf(p.bias)
    backend = "triton" if device == "cpu" else "auto"
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        if op == "gfn_loss":
            value = gfn_loss(h, w, p.codes, p.trie, p.log_f, p.log_z, p.log_r, "tb", bias=b, backend=backend).loss
        else:
            value = constrained_log_pf(h, w, p.codes, p.trie, bias=b, backend=backend)
    assert seen == [(torch.bfloat16,) * 3]
    value.sum().backward()
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    if op == "gfn_loss":
        ref = gfn_loss_reference(p.h, p.w_sid, p.codes, p.trie, p.log_f, p.log_z, p.log_r, "tb", bias=p.bias)[0]
    else:
        ref = constrained_log_pf(p.h, p.w_sid, p.codes, p.trie, bias=p.bias)
    assert rel_err(value, ref) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_checked_walk_equals_reference_walk(device):
    p = make_problem(12, (9, 30, 4), 25, 8, torch.float32, device)
    assert torch.equal(kern._checked_walk(p.trie, p.codes), trie_walk(p.trie, p.codes)[:, :-1])


def test_errors_name_the_problem():
    device = DEVICES[0]
    p = make_problem(13, (9, 30, 4), 6, 8, torch.float32, device)
    with pytest.raises(ValueError, match="vocab"):
        kern.constrained_log_pf_triton(p.h, p.w_sid, p.codes, p.trie, "vocab")
    # Row 4 keeps its first and last codes; its middle code is replaced by one that makes a SID outside
    # the trie.
    candidates = p.codes[4].repeat(30, 1)
    candidates[:, 1] = torch.arange(30, device=device)
    absent = (~p.trie.contains(candidates)).nonzero().flatten()
    assert absent.numel() > 0
    bad = p.codes.clone()
    bad[4] = candidates[absent[0]]
    with pytest.raises(ValueError, match="rows 4 "):
        kern.constrained_log_pf_triton(p.h, p.w_sid, bad, p.trie)
    out_of_range = p.codes.clone()
    out_of_range[2, 2] = 4
    with pytest.raises(ValueError, match=r"codes\[:, 2\].*rows 2"):
        kern.constrained_log_pf_triton(p.h, p.w_sid, out_of_range, p.trie)
    with pytest.raises(ValueError, match=r"codes\[:, 2\].*rows 2"):
        kern.constrained_log_pf_triton(p.h, p.w_sid, out_of_range, None, "level", codes_per_level=(9, 30, 4))
    with pytest.raises(TypeError, match="dtype"):
        kern.constrained_log_pf_triton(p.h, p.w_sid.double(), p.codes, p.trie)
    with pytest.raises(ValueError, match="w_sid"):
        kern.constrained_log_pf_triton(p.h, p.w_sid[:-1], p.codes, p.trie)


def test_empty_batch():
    device = DEVICES[0]
    p = make_problem(14, (9, 30, 4), 3, 8, torch.float32, device)
    h = torch.zeros(0, 3, 8, device=device, requires_grad=True)
    w = leaf(p.w_sid)
    log_pf = kern.constrained_log_pf_triton(h, w, p.codes[:0], p.trie)
    assert log_pf.shape == (0, 3)
    log_pf.sum().backward()
    assert h.grad.shape == h.shape and torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------------------------------------------------------------ dispatcher

def test_registered_as_triton_backend():
    assert "triton" in backends.registered("gfn_loss")


@pytest.mark.parametrize("device", DEVICES)
def test_dispatcher_runs_the_fused_path(device):
    # "auto" keeps CPU tensors on the reference (the interpreter is for tests); naming the backend runs the
    # fused kernel on them under TRITON_INTERPRET=1.
    backend = "triton" if device == "cpu" else "auto"
    p = make_problem(15, *sizes(device)[0], torch.float32, device)
    h = leaf(p.h)
    out = gfn_loss(h, p.w_sid, p.codes, p.trie, p.log_f, p.log_z, p.log_r, "db", backend=backend)
    assert out.backend == "triton"
    out.loss.backward()
    hr = leaf(p.h, torch.float64)
    ref, _ = gfn_loss_reference(hr, p.w_sid.double(), p.codes, p.trie, p.log_f.double(), p.log_z.double(),
                                p.log_r.double(), "db")
    ref.backward()
    assert rel_err(out.loss, ref) <= 1e-5 and rel_err(h.grad, hr.grad) <= 1e-5
    # "vocab" is not fused: auto and an explicit "triton" both run the reference, and the reason says why.
    vocab = sum(p.cpl) + 13
    w_full = torch.randn(vocab, p.h.shape[-1], device=device)
    ids = torch.randperm(vocab, device=device)[:sum(p.cpl)]
    fallback = gfn_loss(p.h, p.w_sid, p.codes, p.trie, p.log_f, p.log_z, p.log_r, support="vocab",
                        w_full=w_full, sid_token_ids=ids)
    assert fallback.backend == "torch"
    asked = gfn_loss(p.h, p.w_sid, p.codes, p.trie, p.log_f, p.log_z, p.log_r, support="vocab", w_full=w_full,
                     sid_token_ids=ids, backend="triton")
    assert asked.backend == "torch" and torch.equal(asked.loss, fallback.loss)
    reason = backends.last_resolution("gfn_loss").reason
    assert "'triton' requested but" in reason and "support='vocab'" in reason


def test_auto_keeps_cpu_tensors_on_the_reference():
    p = make_problem(16, (9, 30, 4), 4, 8, torch.float32, "cpu")
    out = gfn_loss(p.h, p.w_sid, p.codes, p.trie, p.log_f, p.log_z, p.log_r)
    assert out.backend == "torch"


@pytest.mark.parametrize("device", DEVICES)
def test_float64_named_triton_falls_back_to_the_reference(device):
    # The fused kernel computes in fp32/bf16/fp16: float64 inputs must run (unrounded) on the reference,
    # with the reason recorded, for backend="triton" and for "auto" alike.
    p = make_problem(17, (9, 30, 4), 5, 8, torch.float64, device)
    want = constrained_log_pf_torch(p.h, p.w_sid, p.codes, p.trie)
    for backend in ("triton", "auto"):
        h = leaf(p.h)
        got = constrained_log_pf(h, p.w_sid, p.codes, p.trie, backend=backend)
        res = backends.last_resolution("constrained_log_pf")
        assert res.name == "torch" and got.dtype == torch.float64 and torch.equal(got, want)
        got.sum().backward()
        assert h.grad is not None and h.grad.dtype == torch.float64
    assert res.reason.startswith("auto on")
    constrained_log_pf(p.h, p.w_sid, p.codes, p.trie, backend="triton")
    reason = backends.last_resolution("constrained_log_pf").reason
    assert "'triton' requested but" in reason and "not float64" in reason, reason
    out = gfn_loss(p.h, p.w_sid, p.codes, p.trie, p.log_f.double(), p.log_z.double(), p.log_r.double(), "tb",
                   backend="triton")
    ref_loss, _ = gfn_loss_reference(p.h, p.w_sid, p.codes, p.trie, p.log_f.double(), p.log_z.double(),
                                     p.log_r.double(), "tb")
    assert out.backend == "torch" and torch.equal(out.loss, ref_loss)
    assert "not float64" in backends.last_resolution("gfn_loss").reason
    # The kernel's own dtypes still run on it when named.
    p32 = make_problem(17, (9, 30, 4), 5, 8, torch.float32, device)
    constrained_log_pf(p32.h, p32.w_sid, p32.codes, p32.trie, backend="triton")
    assert backends.last_resolution("constrained_log_pf").name == "triton"


def test_mixed_operand_dtypes_raise_naming_the_argument():
    p = make_problem(18, (9, 30, 4), 4, 8, torch.float32, "cpu")
    for backend in ("torch", "triton", "auto"):
        with pytest.raises(TypeError, match=r"w_sid must have the dtype of h \(torch.float32\), got torch.float64"):
            constrained_log_pf(p.h, p.w_sid.double(), p.codes, p.trie, backend=backend)
        with pytest.raises(TypeError, match=r"w_sid must have the dtype of h"):
            gfn_loss(p.h, p.w_sid.half(), p.codes, p.trie, p.log_f, p.log_z, p.log_r, backend=backend)
    with pytest.raises(TypeError, match=r"w_sid must have the dtype of h"):
        gfn_loss_reference(p.h.double(), p.w_sid, p.codes, p.trie, p.log_f, p.log_z, p.log_r)
    vocab = sum(p.cpl) + 3
    ids = torch.arange(sum(p.cpl))
    with pytest.raises(TypeError, match=r"w_full must have the dtype of h"):
        constrained_log_pf(p.h, None, p.codes, p.trie, "vocab", w_full=torch.randn(vocab, 8, dtype=torch.float64),
                           sid_token_ids=ids)
    with pytest.raises(TypeError, match=r"^h must be a floating-point tensor, got torch.int64"):
        constrained_log_pf(p.h.long(), p.w_sid, p.codes, p.trie)
    with pytest.raises(TypeError, match=r"^bias must be a floating-point tensor"):
        constrained_log_pf(p.h, p.w_sid, p.codes, p.trie, bias=torch.zeros(sum(p.cpl), dtype=torch.long))
    # Under autocast both operands are cast to one dtype first, so a fp32 head with bf16 states is fine there.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = constrained_log_pf(p.h.bfloat16(), p.w_sid, p.codes, p.trie, backend="torch")
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ memory and benchmark

@pytest.mark.skipif(not (HAS_CUDA and "cuda" in DEVICES), reason="needs a CUDA device for memory statistics")
def test_forward_keeps_no_logits_in_memory():
    """The forward allocates its [T, L] outputs (and the [T, L] trie walk), never [T, L, K] logits."""
    cpl, t, d = sizes("cuda")[0]
    p = make_problem(17, cpl, t, d, torch.bfloat16, "cuda")
    kern.constrained_log_pf_triton(p.h, p.w_sid, p.codes, p.trie)  # compile, cache the child bitmap
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = kern.constrained_log_pf_triton(p.h, p.w_sid, p.codes, p.trie)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = t * len(cpl) * max(cpl) * 2
    assert extra < logits_bytes / 8, f"forward used {extra} bytes; [T, L, K] bf16 logits would be {logits_bytes}"
    del out


def test_benchmark_quick_mode(tmp_path):
    """The benchmark script runs end to end at --quick sizes and writes the documented JSON fields."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        bench = importlib.import_module("bench_gfn_loss")
    finally:
        sys.path.pop(0)
    out = tmp_path / "gfn_loss.json"
    bench.main(["--quick", "--warmup", "0", "--reps", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert {"device", "versions", "rows", "summary"} <= set(payload)
    assert {r["method"] for r in payload["rows"]} == set(bench.METHODS)
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in payload["rows"])
    summary = payload["summary"]
    for key in ("speedup_vs_eager_full_vocab", "memory_ratio_vs_eager_full_vocab", "speedup_vs_eager_sid_rows"):
        assert key in summary
    assert summary["speedup_vs_eager_full_vocab"] > 0 and summary["speedup_vs_eager_sid_rows"] > 0
    assert payload["parity"][0]["relative_difference"] < 1e-2
