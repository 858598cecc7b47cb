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
