"""Fused trie-constrained decoding step (Triton, C++, CUDA) against the PyTorch reference.

Every backend must select exactly what :func:`constrained_step_torch` selects in fp32 (codes, parents, next
nodes, ties to the lower flat index ``parent * K + code``) with scores / log-probs within 1e-5, and sample
the same codes for the same noise key. Triton runs under ``TRITON_INTERPRET=1`` on CPU (set by conftest.py
when there is no GPU) at small sizes, the C++ op on CPU, and everything again on CUDA at full size when a GPU
is present. Outputs are poisoned (NaN / a sentinel) before the kernels run, so an unwritten element fails.

On CPU the selections are compared for equality. On CUDA at full size (5,120 rows, 4 levels) two
implementations that sum the same dot products in different orders differ by ~1e-7, and among ~20,000
ranked candidate pairs some are closer than that; there a selection may differ from the reference's only
where the reference's own scores of the two choices are equal within 1e-5 (a float tie), everything else
(scores, dead slots, next nodes, all other selections) must match.
"""
import dataclasses
import logging
import os

import pytest
import torch

from gflowgr_core import backends
from gflowgr_core.decoding import step as step_mod
from gflowgr_core.decoding.step import constrained_step, constrained_step_torch, gumbel_noise, noise_key
from gflowgr_core.sid.trie import Trie
from catalogues import random_catalogue  # noqa: E402  (tests/ is on sys.path under pytest)

backends.load_providers(*step_mod._PROVIDERS)
cs = backends.kernel_module("constrained_step")  # imports without triton; an import error is a failure
kernel_utils = backends.kernel_module("utils")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = cs.triton is not None
HAS_CPP = backends.extension_op("constrained_step_beam") is not None
HAS_CUDA_OP = HAS_CUDA and "cuda" in backends.registered("constrained_step") and "cuda" in backends.available_backends()
NO_CPP = ("the compiled extension gflowgr_core._C is not built or lacks the constrained_step ops "
          "(pip install --no-build-isolation -e .)")


def _cases():
    """(backend, device) pairs that can run here."""
    out = []
    if HAS_TRITON and INTERPRET:
        out.append(pytest.param("triton", "cpu", id="triton-cpu-interpret"))
    out.append(pytest.param("cpp", "cpu", id="cpp-cpu",
                            marks=pytest.mark.skipif(not HAS_CPP, reason=NO_CPP)))
    if HAS_CUDA:
        if HAS_TRITON and not INTERPRET:
            out.append(pytest.param("triton", "cuda", id="triton-cuda"))
        out.append(pytest.param("cuda", "cuda", id="cuda-op", marks=pytest.mark.skipif(
            not HAS_CUDA_OP, reason="the extension was built without its CUDA ops")))
    return out


CASES = _cases()
IMPL = {"triton": "constrained_step_triton", "cpp": "constrained_step_cpp", "cuda": "constrained_step_cuda"}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


def run(backend, *args, **kwargs):
    """Call one backend directly; on CUDA first hand the caching allocator NaN-filled blocks, so outputs that
    the compiled ops allocate themselves start out poisoned too."""
    h = args[0]
    if h.device.type == "cuda":
        junk = [torch.full((n,), float("nan"), device=h.device) for n in (1 << 10, 1 << 14, 1 << 18, 1 << 20)]
        del junk
    return getattr(cs, IMPL[backend])(*args, **kwargs)


# ------------------------------------------------------------------------------------------ problems

@dataclasses.dataclass
class Problem:
    trie: Trie
    level: int
    h: torch.Tensor        # [R, d]
    w: torch.Tensor        # [K, d]
    bias: torch.Tensor     # [K] fp32
    node: torch.Tensor     # [R]
    scores: torch.Tensor   # [B, beams_in]


def make_problem(seed: int, cpl, n_items: int, level: int, d: int, B: int, beams_in: int, device,
                 dtype=torch.float32, dense_levels: int = 1, p_dead: float = 0.15, trie: Trie | None = None):
    gen = torch.Generator().manual_seed(seed)
    if trie is None:
        trie = Trie.build(random_catalogue(gen, cpl, n_items), cpl, dense_levels=dense_levels)
    cpl = trie.codes_per_level
    lo = sum(trie.nodes_per_level[:level])
    R = B * beams_in
    node = torch.randint(lo, lo + trie.nodes_per_level[level], (R,), generator=gen)
    node[torch.rand(R, generator=gen) < p_dead] = -1
    K = cpl[level]
    h = torch.randn(R, d, generator=gen) / d ** 0.25
    w = torch.randn(K, d, generator=gen) / d ** 0.25
    scores = -torch.rand(B, beams_in, generator=gen) * 5
    scores[torch.rand(B, beams_in, generator=gen) < p_dead] = float("-inf")
    return Problem(trie.to(device), level, h.to(dtype).to(device), w.to(dtype).to(device),
                   torch.randn(K, generator=gen).to(device), node.to(device), scores.to(device))


def small_problems(device):
    """Odd sizes on the interpreter / CPU; the production decode shape on a GPU."""
    if device == "cpu":
        return [make_problem(1, (7, 19, 5), 70, 0, 24, 3, 1, device),
                make_problem(2, (7, 19, 5), 70, 1, 24, 3, 5, device),
                make_problem(3, (6, 40, 3, 9), 150, 2, 9, 2, 7, device),
                make_problem(4, (6, 40, 3, 9), 150, 3, 33, 4, 3, device)]
    cpl = (256, 256, 256, 256)
    gen = torch.Generator().manual_seed(0)
    trie = Trie.build(torch.randint(0, 256, (12101, 4), generator=gen), cpl)
    return [make_problem(10 + l, cpl, 0, l, 128, 256, 1 if l == 0 else 20, device, trie=trie) for l in range(4)]


def assert_close_scores(got, ref, what, tol=1e-5):
    assert got.dtype == ref.dtype == torch.float32, what
    assert not torch.isnan(got).any(), f"{what}: NaN (an unwritten element?)"
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got)), f"{what}: -inf pattern differs\n{got}\n{ref}"
    assert torch.equal(got[~fin], ref[~fin]), what
    err = (got[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= tol * max(1.0, ref[fin].abs().max().item() if fin.any() else 1.0), f"{what}: max error {err}"


def assert_beam_equal(got, ref, what):
    for name in ("parent", "code", "next_node"):
        g, r = getattr(got, name), getattr(ref, name)
        assert g.dtype == torch.long and g.shape == r.shape, f"{what}: {name} {g.dtype} {tuple(g.shape)}"
        assert torch.equal(g, r), f"{what}: {name} differs\n got {g}\n ref {r}"
    assert_close_scores(got.score, ref.score, f"{what}: score")


def assert_sample_equal(got, ref, what):
    for name in ("code", "next_node"):
        g, r = getattr(got, name), getattr(ref, name)
        assert g.dtype == torch.long and torch.equal(g, r), f"{what}: {name} differs\n got {g}\n ref {r}"
    assert_close_scores(got.logp, ref.logp, f"{what}: logp")


def _tie_tol(x: torch.Tensor) -> float:
    return 1e-5 * max(1.0, float(x[torch.isfinite(x)].abs().max()) if torch.isfinite(x).any() else 1.0)


def check_beam(p: Problem, got, ref, what, *, bias=None, renormalize=True, exact=True):
    """Exact equality (``exact``), or equality up to float ties of the reference's candidate scores."""
    if exact:
        assert_beam_equal(got, ref, what)
        return
    B, beams_in = p.scores.shape
    K = p.trie.codes_per_level[p.level]
    assert_close_scores(got.score, ref.score, f"{what}: score")
    alive = ref.code >= 0
    assert torch.equal(got.code >= 0, alive), f"{what}: live slots differ"
    dead = ~alive
    assert (got.parent[dead] == 0).all() and (got.next_node[dead] == -1).all(), f"{what}: dead slots"
    mask = p.trie.child_mask(p.node, p.level)
    _, logp = step_mod._step_log_probs(p.h, p.w, bias, mask, renormalize)
    cand = (p.scores.float().reshape(-1, 1) + logp).reshape(B, beams_in * K)
    flat_got = got.parent * K + got.code.clamp_min(0)
    flat_ref = ref.parent * K + ref.code.clamp_min(0)
    differ = alive & (flat_got != flat_ref)
    if differ.any():
        gap = (cand.gather(1, flat_got) - ref.score)[differ].abs().max()
        assert gap <= _tie_tol(ref.score), f"{what}: a selection differs by {float(gap)} (not a float tie)"
        assert int(differ.sum()) <= max(4, int(alive.sum()) // 1000), f"{what}: {int(differ.sum())} selections differ"
    picks = flat_got.masked_fill(~alive, -1).sort(dim=1).values
    assert (picks[:, 1:] != picks[:, :-1])[picks[:, 1:] >= 0].all(), f"{what}: a candidate was selected twice"
    parent_node = p.node.reshape(B, beams_in).gather(1, got.parent)
    assert torch.equal(got.next_node, p.trie.next_node(parent_node, got.code, level=p.level)), what


def check_sample(p: Problem, got, ref, what, *, key, temperature=1.0, bias=None, renormalize=True, exact=True):
    """Exact equality (``exact``), or equality up to float ties of the reference's perturbed logits."""
    if exact:
        assert_sample_equal(got, ref, what)
        return
    R, K = p.h.shape[0], p.w.shape[0]
    mask = p.trie.child_mask(p.node, p.level)
    logits, logp = step_mod._step_log_probs(p.h, p.w, bias, mask, renormalize)
    pert = (logits / temperature + gumbel_noise(key, p.level, R, K)).masked_fill(~mask, float("-inf"))
    assert torch.equal(got.code >= 0, ref.code >= 0), f"{what}: rows with children differ"
    live = ref.code >= 0
    differ = live & (got.code != ref.code)
    if differ.any():
        gap = (pert.gather(1, got.code.clamp_min(0)[:, None]).squeeze(1) - pert.gather(
            1, ref.code.clamp_min(0)[:, None]).squeeze(1))[differ].abs().max()
        assert gap <= _tie_tol(pert), f"{what}: a sampled code differs by {float(gap)} (not a float tie)"
        assert int(differ.sum()) <= max(4, R // 1000), f"{what}: {int(differ.sum())} sampled codes differ"
    expect_logp = torch.where(live, logp.gather(1, got.code.clamp_min(0)[:, None]).squeeze(1),
                              torch.full_like(ref.logp, float("-inf")))
    assert_close_scores(got.logp, expect_logp, f"{what}: logp")
    assert torch.equal(got.next_node, p.trie.next_node(p.node, got.code, level=p.level)), what


def lookups(backend, p: Problem):
    """Every child lookup of the Triton kernel that applies to the level (compiled ops have one path)."""
    if backend != "triton":
        return [None]
    out = [None, "scan", "search"]
    return out + (["dense"] if p.level < p.trie.num_dense else [])


# ------------------------------------------------------------------------------------------ beam parity

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_beam_matches_reference(backend, device, renormalize):
    for i, p in enumerate(small_problems(device)):
        B, beams_in = p.scores.shape
        K = p.trie.codes_per_level[p.level]
        for beams in sorted({1, 4, 20, beams_in * K + 3}):
            for bias in (p.bias, None):
                ref = constrained_step_torch(p.h, p.w, p.node, p.level, p.trie, "beam", scores=p.scores,
                                             beams=beams, renormalize=renormalize, bias=bias)
                # Every child lookup once (beams 4, with bias); the default lookup for the other cases.
                for lookup in lookups(backend, p) if (bias is not None and beams == 4) else [None]:
                    extra = {"lookup": lookup} if backend == "triton" else {}
                    got = run(backend, p.h, p.w, p.node, p.level, p.trie, "beam", scores=p.scores, beams=beams,
                              renormalize=renormalize, bias=bias, **extra)
                    assert got.parent.shape == (B, beams)
                    check_beam(p, got, ref, f"problem {i}, level {p.level}, beams {beams}, lookup {lookup}, "
                                            f"bias {bias is not None}", bias=bias, renormalize=renormalize,
                               exact=device == "cpu")


@pytest.mark.parametrize("backend,device", CASES)
def test_beam_edge_cases(backend, device):
    """max_branch 1, every beam dead, beams far above the live candidates, one level of one code."""
    # Level 1 of this catalogue has one child per node (max_branch 1) and level 2 has K = 1.
    codes = torch.tensor([[0, 3, 0, 1], [1, 2, 0, 0], [2, 2, 0, 1], [2, 2, 0, 1], [4, 0, 0, 2]])
    trie = Trie.build(codes, (5, 4, 1, 3), dense_levels=0).to(device)
    assert trie.max_branch[1] == 1 and trie.max_branch[2] == 1
    gen = torch.Generator().manual_seed(5)
    for level in range(4):
        lo, n = sum(trie.nodes_per_level[:level]), trie.nodes_per_level[level]
        K = trie.codes_per_level[level]
        for B, beams_in in ((2, 1), (3, 4)):
            R = B * beams_in
            node = (lo + torch.arange(R) % n).to(device)
            h = torch.randn(R, 16, generator=gen).to(device)
            w = torch.randn(K, 16, generator=gen).to(device)
            scores = torch.randn(B, beams_in, generator=gen).to(device)
            scores[0] = float("-inf")                      # batch element 0: every beam dead
            node[-1] = -1                                  # a dead row with a finite score
            for beams in (1, beams_in * K + 5):
                ref = constrained_step_torch(h, w, node, level, trie, "beam", scores=scores, beams=beams)
                got = run(backend, h, w, node, level, trie, "beam", scores=scores, beams=beams)
                assert_beam_equal(got, ref, f"level {level}, B {B}, beams_in {beams_in}, beams {beams}")
                assert (got.code[0] == -1).all() and (got.next_node[0] == -1).all()
                assert (got.parent[0] == 0).all() and torch.isinf(got.score[0]).all()


@pytest.mark.parametrize("backend,device", CASES)
def test_beam_ties_go_to_the_lower_flat_index(backend, device):
    """Integer-valued inputs give exactly equal candidates across codes (duplicated head rows) and across
    parents (duplicated hidden rows and scores); the reference's stable sort picks the lower flat index."""
    gen = torch.Generator().manual_seed(11)
    codes = torch.cartesian_prod(torch.arange(6), torch.arange(6))
    trie = Trie.build(codes, (6, 6), dense_levels=0).to(device)
    w = torch.randint(-2, 3, (6, 8), generator=gen).float()
    w[3] = w[1]
    w[5] = w[1]
    h = torch.randint(-2, 3, (4, 8), generator=gen).float()
    h = h.repeat_interleave(2, dim=0)                      # beams (0,1), (2,3), ... identical
    scores = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-0.5, -0.5], [0.0, 0.0]])
    node = torch.tensor([1, 1, 2, 2, 3, 3, 4, 4])
    args = (h.to(device), w.to(device), node.to(device), 1, trie)
    for beams in (3, 7, 12):
        ref = constrained_step_torch(*args, "beam", scores=scores.to(device), beams=beams)
        for lookup in (["scan", "search"] if backend == "triton" else [None]):
            extra = {"lookup": lookup} if backend == "triton" else {}
            got = run(backend, *args, "beam", scores=scores.to(device), beams=beams, **extra)
            assert_beam_equal(got, ref, f"beams {beams}, lookup {lookup}")


@pytest.mark.parametrize("backend,device", CASES)
def test_beam_bf16_inputs(backend, device):
    """bf16 hidden states and head: every selected candidate is one of the reference's best (its reference
    score equals the reference's score at that rank within bf16 tolerance)."""
    for i, p in enumerate(small_problems(device)[1:3] if device == "cpu" else small_problems(device)):
        h, w = p.h.to(torch.bfloat16), p.w.to(torch.bfloat16)
        B, beams_in = p.scores.shape
        K = p.trie.codes_per_level[p.level]
        ref = constrained_step_torch(h, w, p.node, p.level, p.trie, "beam", scores=p.scores, beams=20, bias=p.bias)
        got = run(backend, h, w, p.node, p.level, p.trie, "beam", scores=p.scores, beams=20, bias=p.bias)
        mask = p.trie.child_mask(p.node, p.level)
        _, logp = step_mod._step_log_probs(h, w, p.bias, mask, True)
        cand = (p.scores.float().reshape(-1, 1) + logp).reshape(B, beams_in * K)
        alive = got.code >= 0
        assert torch.equal(alive, ref.code >= 0), f"problem {i}: live slots differ"
        flat = (got.parent * K + got.code.clamp_min(0))
        ref_of_got = cand.gather(1, flat)
        assert torch.allclose(ref_of_got[alive], ref.score[alive], atol=2e-2, rtol=1e-2), f"problem {i}"
        assert torch.allclose(got.score[alive], ref.score[alive], atol=2e-2, rtol=1e-2), f"problem {i}"
        # The selected next nodes are the children along the selected codes.
        parent_node = p.node.reshape(B, beams_in).gather(1, got.parent)
        assert torch.equal(got.next_node, p.trie.next_node(parent_node, got.code, level=p.level)), f"problem {i}"


# ------------------------------------------------------------------------------------------ sampling

@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_sample_matches_reference(backend, device, renormalize):
    for i, p in enumerate(small_problems(device)):
        for temperature, seed in ((1.0, 0), (0.6, 12345), (2.5, -7)):
            for bias in (p.bias, None):
                ref = constrained_step_torch(p.h, p.w, p.node, p.level, p.trie, "sample", seed=seed,
                                             temperature=temperature, renormalize=renormalize, bias=bias)
                for lookup in lookups(backend, p) if temperature == 1.0 else [None]:
                    extra = {"lookup": lookup} if backend == "triton" else {}
                    got = run(backend, p.h, p.w, p.node, p.level, p.trie, "sample", seed=seed,
                              temperature=temperature, renormalize=renormalize, bias=bias, **extra)
                    check_sample(p, got, ref, f"problem {i}, T {temperature}, seed {seed}, lookup {lookup}",
                                 key=noise_key(seed, None, torch.device(device)), temperature=temperature,
                                 bias=bias, renormalize=renormalize, exact=device == "cpu")


@pytest.mark.parametrize("backend,device", CASES)
def test_sample_noise_key_sources_agree(backend, device):
    """A seed int, the same seed as a device tensor, and generators in the same state give one result;
    with zero logits the pick is the argmax of the reference's noise over the children."""
    p = small_problems(device)[1]
    R, K = p.h.shape[0], p.w.shape[0]
    zero_h = torch.zeros_like(p.h)
    by_int = run(backend, zero_h, p.w, p.node, p.level, p.trie, "sample", seed=2 ** 64 - 3)
    by_tensor = run(backend, zero_h, p.w, p.node, p.level, p.trie, "sample",
                    seed=torch.tensor([-3], device=device))
    assert_sample_equal(by_tensor, by_int, "seed tensor vs int")
    key = noise_key(-3, None, torch.device(device))
    zero = dataclasses.replace(p, h=zero_h)
    ref = constrained_step_torch(zero_h, p.w, p.node, p.level, p.trie, "sample", seed=key)
    check_sample(zero, by_int, ref, "zero logits", key=key, exact=device == "cpu")
    noise = gumbel_noise(key, p.level, R, K)
    mask = p.trie.child_mask(p.node, p.level)
    expect = noise.masked_fill(~mask, float("-inf")).argmax(dim=1)
    assert torch.equal(ref.code, torch.where(mask.any(dim=1), expect, torch.full_like(expect, -1)))
    g1 = torch.Generator(device=device).manual_seed(99)
    g2 = torch.Generator(device=device).manual_seed(99)
    key = noise_key(None, torch.Generator(device=device).manual_seed(99), torch.device(device))
    a = run(backend, p.h, p.w, p.node, p.level, p.trie, "sample", generator=g1)
    b = constrained_step_torch(p.h, p.w, p.node, p.level, p.trie, "sample", generator=g2)
    check_sample(p, a, b, "same generator state", key=key, exact=device == "cpu")


def test_gumbel_noise_samples_the_policy():
    """The counter-based noise makes Gumbel-max draw from the softmax over the children (chi-square test on
    40,000 draws of a fixed seed; deterministic)."""
    codes = torch.tensor([[0, c] for c in (1, 2, 4, 5, 7)] + [[1, 0]])
    trie = Trie.build(codes, (2, 8), dense_levels=0)
    R = 40000
    w = torch.eye(8)
    logits = torch.tensor([0.5, -1.0, 1.2, 0.0, 0.3, -0.2, 2.0, 0.1])
    h = logits.expand(R, 8).contiguous()
    node = torch.ones(R, dtype=torch.long)
    out = constrained_step_torch(h, w, node, 1, trie, "sample", seed=2024, temperature=1.0)
    children = torch.tensor([1, 2, 4, 5, 7])
    probs = torch.softmax(logits[children], 0)
    counts = torch.bincount(out.code, minlength=8)[children].double()
    assert counts.sum() == R
    chi2 = float(((counts - R * probs.double()) ** 2 / (R * probs.double())).sum())
    assert chi2 < 18.47, f"chi-square {chi2:.2f} over 4 degrees of freedom (p < 0.001)"
    # Different levels and rows get independent noise.
    n0 = gumbel_noise(noise_key(1, None, torch.device("cpu")), 0, 2000, 16)
    n1 = gumbel_noise(noise_key(1, None, torch.device("cpu")), 1, 2000, 16)
    corr = torch.corrcoef(torch.stack([n0.flatten(), n1.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.02
    assert abs(float(n0.mean()) - 0.5772) < 0.03 and abs(float(n0.std()) - 1.2825) < 0.03


# ------------------------------------------------------------------------------------------ dispatch, errors

def test_backends_are_registered_with_the_dispatcher():
    names = backends.registered("constrained_step")
    if HAS_TRITON:
        assert "triton" in names
    assert ("cpp" in names) == HAS_CPP
    if HAS_CPP:
        assert backends.resolve_backend("constrained_step", "auto", torch.device("cpu")).name == "cpp"
    if HAS_CUDA:
        assert backends.resolve_backend("constrained_step", "auto", torch.device("cuda")).name in ("triton", "cuda")


@pytest.mark.parametrize("backend,device", CASES)
def test_dispatcher_runs_the_backend(backend, device):
    p = small_problems(device)[0]
    got = constrained_step(p.h, p.w, p.node, p.level, p.trie, "beam", scores=p.scores, beams=5, backend=backend)
    assert backends.last_resolution("constrained_step").name == backend
    ref = constrained_step_torch(p.h, p.w, p.node, p.level, p.trie, "beam", scores=p.scores, beams=5)
    check_beam(p, got, ref, backend, exact=device == "cpu")
    got = constrained_step(p.h, p.w, p.node, p.level, p.trie, "sample", seed=3, backend=backend)
    ref = constrained_step_torch(p.h, p.w, p.node, p.level, p.trie, "sample", seed=3)
    check_sample(p, got, ref, backend, key=noise_key(3, None, torch.device(device)), exact=device == "cpu")


@pytest.mark.parametrize("backend,device", CASES)
def test_errors_and_empty_inputs(backend, device):
    p = small_problems(device)[1]
    B, beams_in = p.scores.shape
    with pytest.raises(ValueError, match="beams must be >= 1"):
        run(backend, p.h, p.w, p.node, p.level, p.trie, "beam", scores=p.scores, beams=0)
    with pytest.raises(ValueError, match="do not match R"):
        run(backend, p.h, p.w, p.node, p.level, p.trie, "beam", scores=p.scores[:, :1], beams=2)
    with pytest.raises(ValueError, match="temperature"):
        run(backend, p.h, p.w, p.node, p.level, p.trie, "sample", temperature=0.0, seed=1)
    with pytest.raises(ValueError, match="rows, level"):
        run(backend, p.h, p.w[:-1], p.node, p.level, p.trie, "beam", scores=p.scores)
    d = p.h.shape[1]
    empty = run(backend, p.h[:0], p.w, p.node[:0], p.level, p.trie, "beam",
                scores=p.scores[:0], beams=3)
    assert empty.parent.shape == (0, 3)
    empty = run(backend, p.h.new_zeros(0, d), p.w, p.node[:0], p.level, p.trie, "sample", seed=0)
    assert empty.code.shape == (0,)


# ------------------------------------------------------------------------------------------ strided inputs

def interleaved(x: torch.Tensor, junk) -> torch.Tensor:
    """``x`` as a non-contiguous view (every element followed by ``junk``), like ``nodes[:, 0]`` of a
    ``[R, 2]`` table: a backend that reads it as packed memory picks up the junk."""
    view = torch.stack([x, torch.full_like(x, junk)], dim=-1)[..., 0]
    assert torch.equal(view, x) and (x.numel() <= 1 or not view.is_contiguous())
    return view


STRIDED_CASES = [pytest.param("torch", "cpu", id="torch-cpu")] + CASES


@pytest.mark.parametrize("backend,device", STRIDED_CASES)
@pytest.mark.parametrize("mode", ["beam", "sample"])
def test_strided_inputs_give_the_contiguous_result(backend, device, mode):
    """Every tensor argument as a strided view (node with junk node ids, h / bias / scores with NaN between
    the values, w transposed in memory) gives exactly the reference's result on contiguous inputs."""
    for p in small_problems(device)[:2]:
        lo = sum(p.trie.nodes_per_level[:p.level])
        h, node, bias = interleaved(p.h, float("nan")), interleaved(p.node, lo), interleaved(p.bias, float("nan"))
        w = p.w.t().contiguous().t()
        what = f"{backend} {mode} level {p.level}"
        if mode == "beam":
            scores = interleaved(p.scores, float("nan"))
            got = constrained_step(h, w, node, p.level, p.trie, "beam", scores=scores, beams=5, bias=bias,
                                   backend=backend)
            ref = constrained_step_torch(p.h, p.w, p.node, p.level, p.trie, "beam", scores=p.scores, beams=5,
                                         bias=p.bias)
            check_beam(p, got, ref, what, bias=p.bias, exact=device == "cpu")
        else:
            got = constrained_step(h, w, node, p.level, p.trie, "sample", seed=11, bias=bias, backend=backend)
            ref = constrained_step_torch(p.h, p.w, p.node, p.level, p.trie, "sample", seed=11, bias=p.bias)
            check_sample(p, got, ref, what, key=noise_key(11, None, torch.device(device)), bias=p.bias,
                         exact=device == "cpu")
        assert backends.last_resolution("constrained_step").name == backend


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPP, reason=NO_CPP)),
                                    pytest.param("cuda", marks=pytest.mark.skipif(
                                        not HAS_CUDA_OP, reason="needs CUDA and the extension's CUDA ops"))])
def test_compiled_ops_reject_strided_tensors(device):
    """Direct callers of the compiled ops get an error naming the strided argument, never wrong codes."""
    p = small_problems(device)[0]
    lo, hi = cs._level_bounds(p.trie, p.level)
    t = p.trie
    beam = backends.extension_op("constrained_step_beam")
    sample = backends.extension_op("constrained_step_sample")
    key = noise_key(1, None, torch.device(device))
    args = dict(h=p.h, w=p.w, bias=p.bias, node=p.node)
    for name, view in (("node", interleaved(p.node, lo)), ("h", interleaved(p.h, 0.0)),
                       ("w", p.w.t().contiguous().t()), ("bias", interleaved(p.bias, 0.0))):
        a = dict(args, **{name: view})
        with pytest.raises(RuntimeError, match=f"{name} must be contiguous"):
            beam(a["h"], a["w"], a["bias"], a["node"], t.indptr, t.child_code, t.child_node, lo, hi, p.scores, 5,
                 True)
        with pytest.raises(RuntimeError, match=f"{name} must be contiguous"):
            sample(a["h"], a["w"], a["bias"], a["node"], t.indptr, t.child_code, t.child_node, lo, hi, key,
                   p.level, 1.0, True)
    with pytest.raises(RuntimeError, match="scores must be contiguous"):
        beam(p.h, p.w, p.bias, p.node, t.indptr, t.child_code, t.child_node, lo, hi,
             interleaved(p.scores, 0.0), 5, True)
    with pytest.raises(RuntimeError, match="child_code must be contiguous"):
        beam(p.h, p.w, p.bias, p.node, t.indptr, interleaved(t.child_code, 0), t.child_node, lo, hi, p.scores, 5,
             True)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs the Triton interpreter (no GPU here)")
def test_triton_wide_level_uses_the_reference(caplog, monkeypatch):
    monkeypatch.setattr(cs, "_warned_wide", False)
    codes = torch.tensor([[0, 5], [0, cs.MAX_TRITON_CODES + 100], [1, 7]])
    trie = Trie.build(codes, (2, cs.MAX_TRITON_CODES + 200))
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 8, generator=gen), torch.randn(cs.MAX_TRITON_CODES + 200, 8, generator=gen)
    node = torch.tensor([1, 2])
    scores = torch.zeros(1, 2)
    with caplog.at_level(logging.WARNING, logger="gflowgr"):
        got = cs.constrained_step_triton(h, w, node, 1, trie, "beam", scores=scores, beams=3)
    ref = constrained_step_torch(h, w, node, 1, trie, "beam", scores=scores, beams=3)
    assert_beam_equal(got, ref, "wide level")
    assert any("Triton kernel's limit" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ CUDA only

def _beam_loop(backend, trie, hs, ws, B, beams):
    """A 4-level beam loop as the decoder runs it (hidden states gathered by parent on the device)."""
    node = torch.zeros(B, dtype=torch.long, device=hs[0].device)
    scores = torch.zeros(B, 1, device=hs[0].device)
    h = hs[0][:B]
    base = torch.arange(B, device=node.device)[:, None]
    for level in range(trie.num_levels):
        out = constrained_step(h, ws[level], node, level, trie, "beam", scores=scores, beams=beams, backend=backend)
        rows_in = scores.shape[1]
        scores, node = out.score, out.next_node.reshape(-1)
        if level + 1 < trie.num_levels:
            h = hs[level + 1][(base * rows_in + out.parent).reshape(-1)]
    return node.reshape(B, beams), scores


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_beam_loop_is_host_sync_free_and_cuda_graph_capturable(backend):
    """The whole 4-level loop runs with host syncs turned into errors, is captured in a CUDA graph, and a
    replay on new inputs (written into the captured buffers) equals an eager run on them bit for bit."""
    if backend not in backends.available_backends() or backend not in backends.registered("constrained_step"):
        pytest.skip(f"backend {backend} is not available on this CUDA machine")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    cpl = (256, 256, 256, 256)
    trie = Trie.build(torch.randint(0, 256, (12101, 4), generator=gen), cpl).to(dev)
    B, beams, d = 256, 20, 128
    hs = [torch.randn(B * beams, d, generator=gen).to(dev) for _ in cpl]
    ws = [torch.randn(256, d, generator=gen).to(dev) / 4 for _ in cpl]
    leaves, scores = _beam_loop(backend, trie, hs, ws, B, beams)    # compiles the kernels
    alive = scores > float("-inf")
    assert alive.all(), "12,101 random SIDs leave every user 20 live beams"
    assert (leaves >= trie.num_nodes - trie.num_leaves).all() and (leaves < trie.num_nodes).all()
    assert (scores[:, 1:] <= scores[:, :-1]).all()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _beam_loop(backend, trie, hs, ws, B, beams)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _beam_loop(backend, trie, hs, ws, B, beams)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _beam_loop(backend, trie, hs, ws, B, beams)
    for h in hs:
        h.mul_(-1.0)
    graph.replay()
    torch.cuda.synchronize()
    expect = _beam_loop(backend, trie, hs, ws, B, beams)
    assert torch.equal(captured[0], expect[0]) and torch.equal(captured[1], expect[1])
    assert not torch.equal(expect[0], leaves), "the new inputs should change the result"
