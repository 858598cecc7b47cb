"""The backend rule (gflowgr_core.backends.resolve_backend): every op accepts every backend name, falls back
to the "auto" choice with a recorded reason, and warns once when CUDA tensors meet missing GPU backends."""
import logging

import pytest
import torch

from gflowgr_core import backends
from gflowgr_core.decoding import step  # noqa: F401  (defines constrained_step)
from gflowgr_core.objectives import gfn_loss  # noqa: F401  (defines gfn_loss and constrained_log_pf)

OPS = ("constrained_step", "gfn_loss", "constrained_log_pf")


def gpu_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "CUDA tensors" in r.getMessage()]


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(backends, "_gpu_warning_done", False)


def test_missing_gpu_backends_warn_once_at_the_first_cuda_dispatch(fresh_warning, monkeypatch, caplog):
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch", "cpp"))
    with caplog.at_level(logging.WARNING, logger="gflowgr"):
        backends.resolve_backend("gfn_loss", "auto", "cpu")
        assert not gpu_warnings(caplog), "CPU tensors need no GPU backend"
        for op in OPS:
            assert backends.resolve_backend(op, "auto", "cuda").name == "torch"
    (record,) = gpu_warnings(caplog)
    message = record.getMessage()
    assert "'triton' and 'cuda' backends are missing" in message and "slower PyTorch fallbacks" in message
    assert f"triton: {backends.unavailable_reason('triton')}" in message


def test_no_gpu_warning_when_both_gpu_backends_are_there(fresh_warning, monkeypatch, caplog):
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch", "cpp", "cuda", "triton"))
    with caplog.at_level(logging.WARNING, logger="gflowgr"):
        res = backends.resolve_backend("constrained_log_pf", "auto", torch.device("cuda"))
    assert not gpu_warnings(caplog)
    assert res.name == ("triton" if "triton" in backends.registered("constrained_log_pf") else "torch")


def test_one_missing_gpu_backend_is_named(fresh_warning, monkeypatch, caplog):
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch", "triton"))
    with caplog.at_level(logging.WARNING, logger="gflowgr"):
        backends.resolve_backend("constrained_step", "auto", "cuda")
    (record,) = gpu_warnings(caplog)
    assert "the 'cuda' backend is missing" in record.getMessage()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("requested", backends.REQUESTS)
def test_every_op_accepts_every_backend_name(op, requested):
    res = backends.resolve_backend(op, requested, "cpu")
    assert res.name in backends.registered(op) and res == backends.last_resolution(op)
    if res.name == requested:
        assert res.reason == f"{requested!r} as requested"
    elif requested == "auto":
        assert res.reason.startswith("auto on cpu chose")
    else:
        assert res.reason.startswith(f"{requested!r} requested but ") and f"chose {res.name!r}" in res.reason
    # The auto choice on CPU never takes the Triton interpreter.
    assert backends.resolve_backend(op, "auto", "cpu").name in ("cpp", "torch")


def test_a_fallback_from_a_named_backend_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_fallbacks_logged", set())
    with caplog.at_level(logging.WARNING, logger="gflowgr"):
        for _ in range(3):
            backends.resolve_backend("gfn_loss", "cuda", "cpu")
    fallbacks = [r for r in caplog.records if "gfn_loss: 'cuda' requested but" in r.getMessage()]
    assert len(fallbacks) == 1


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        backends.resolve_backend("gfn_loss", "jax", "cpu")
    with pytest.raises(ValueError, match="unknown op 'matmul'"):
        backends.resolve_backend("matmul", "auto", "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        backends.register("matmul", "cpp", lambda: None)


def test_auto_order_only_lists_backends_that_run_on_the_device():
    for device_type, order in backends.AUTO_ORDER.items():
        assert order[-1] == "torch"
        for name in order:
            runs_on = backends.RUNS_ON[name]
            assert runs_on is None or device_type in runs_on, (device_type, name)


def test_auto_on_cuda_passes_over_a_backend_that_does_not_compute_in_the_dtype(monkeypatch):
    # The fused log P_F kernel computes in fp32/bf16/fp16: float64 CUDA tensors go to the reference, fp32
    # ones to the kernel, and the reason names the dtype.
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch", "cpp", "cuda", "triton"))
    assert "triton" in backends.registered("constrained_log_pf")
    options = dict(support="trie")
    for op in ("constrained_log_pf", "gfn_loss"):
        assert backends.resolve_backend(op, "auto", "cuda", options, dtype=torch.float32).name == "triton"
        assert backends.resolve_backend(op, "auto", "cuda", options, dtype=torch.bfloat16).name == "triton"
        res = backends.resolve_backend(op, "auto", "cuda", options, dtype=torch.float64)
        assert res.name == "torch"
        assert f"the 'triton' {op} computes in float32/bfloat16/float16, not float64" in res.reason
        named = backends.resolve_backend(op, "triton", "cuda", options, dtype=torch.float64)
        assert named.name == "torch" and named.reason.startswith("'triton' requested but the 'triton'")
        # Without a dtype (callers that do not pass one) the check is skipped.
        assert backends.resolve_backend(op, "auto", "cuda", options).name == "triton"


def test_registered_dtypes_decide_a_named_backend(monkeypatch):
    monkeypatch.setattr(backends, "available_backends", lambda: ("torch", "cpp"))
    monkeypatch.setitem(backends._OPS, "toy_op", backends._Op(()))
    backends.define_op("toy_op", lambda x: x)
    backends.register("toy_op", "cpp", lambda x: x, dtypes=(torch.float32,))
    assert backends.resolve_backend("toy_op", "cpp", "cpu", dtype=torch.float32).name == "cpp"
    assert backends.resolve_backend("toy_op", "auto", "cpu", dtype=torch.float32).name == "cpp"
    res = backends.resolve_backend("toy_op", "cpp", "cpu", dtype=torch.float16)
    assert res == backends.Resolution("torch", "'cpp' requested but the 'cpp' toy_op computes in float32, not "
                                               "float16; auto on cpu chose 'torch' (the 'cpp' toy_op computes in "
                                               "float32, not float16)")
    with pytest.raises(TypeError, match="dtypes of the 'cpp' toy_op must be torch dtypes"):
        backends.register("toy_op", "cpp", lambda x: x, dtypes=("float32",))
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        backends.resolve_backend("toy_op", "auto", "cpu", dtype="float64")


def test_triton_constrained_step_rounds_float64_like_the_reference():
    # The reference computes the step's logits as h.float() @ w.float().T: the Triton step does the same with
    # float64 inputs (rounded to fp32 before the kernel) and gives the reference's result.
    pytest.importorskip("triton", reason="triton is not installed")
    from gflowgr_core.decoding.step import constrained_step
    from gflowgr_core.sid.trie import Trie
    if not (torch.cuda.is_available() or backends.triton_interpret()):
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    codes = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 3], [2, 1]])
    trie = Trie.build(codes, (3, 4)).to(device)
    h = torch.randn(4, 8, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(4, 8, generator=gen, dtype=torch.float64).to(device)
    bias = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
    node = trie.next_node(torch.zeros(4, dtype=torch.long, device=device),
                          torch.tensor([0, 2, 1, 0], device=device), level=0)
    for mode, extra in (("sample", dict(seed=5)), ("beam", dict(scores=torch.zeros(2, 2, device=device)))):
        want = constrained_step(h, w, node, 1, trie, mode, bias=bias, backend="torch", **extra)
        got = constrained_step(h, w, node, 1, trie, mode, bias=bias, backend="triton", **extra)
        assert backends.last_resolution("constrained_step").name == "triton"
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
