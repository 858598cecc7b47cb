"""Which compute backends this installation can use, reported once.

``torch`` (the plain-PyTorch reference) is always there. ``cpp`` and ``cuda`` come from the compiled
extension ``gflowgr_core._C`` built from ``csrc/``; ``triton`` needs the triton package and either a CUDA
device or ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests).
"""
from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache

import torch

log = logging.getLogger("gflowgr")

BACKENDS = ("torch", "cpp", "cuda", "triton")


@lru_cache(maxsize=None)
def extension():
    """The compiled extension module ``gflowgr_core._C``, or ``None`` when it was not built.

    Importing it loads the shared library, which registers the compiled ops as ``torch.ops.gflowgr.*``.
    A library built against another torch (undefined symbols) counts as not built.
    """
    if os.environ.get("GFLOWGR_NO_EXT") == "1":
        return None
    try:
        return importlib.import_module("gflowgr_core._C")
    except (ImportError, OSError) as exc:
        if not isinstance(exc, ModuleNotFoundError):
            log.warning("gflowgr: compiled extension present but not loadable (%s); using fallbacks", exc)
        return None


def extension_op(name: str):
    """The compiled op ``torch.ops.gflowgr.<name>``, or ``None`` when the extension is absent or was built
    without that op (an older build)."""
    if extension() is None:
        return None
    try:
        return getattr(torch.ops.gflowgr, name)
    except (AttributeError, RuntimeError):
        return None


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (kernels then run on CUDA tensors, or on CPU under TRITON_INTERPRET=1)."""
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@lru_cache(maxsize=None)
def available_backends() -> tuple[str, ...]:
    """The backends usable here, logged once at the first call."""
    ext = extension()
    found = ["torch"]
    if ext is not None:
        found.append("cpp")
        if getattr(ext, "has_cuda", lambda: False)() and torch.cuda.is_available():
            found.append("cuda")
    if triton_available() and (torch.cuda.is_available() or triton_interpret()):
        found.append("triton")
    log.info("gflowgr backends available: %s", ", ".join(found))
    return tuple(found)


def resolve(requested: str, device: torch.device, preference: tuple[str, ...]) -> str:
    """Pick the backend for an op on ``device``.

    ``requested`` is ``"auto"`` or one of :data:`BACKENDS`; ``preference`` lists, best first, the backends
    the op implements for this device type. An explicitly requested backend that is not available raises.
    """
    avail = available_backends()
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; expected 'auto' or one of {BACKENDS}")
        if requested not in avail:
            raise RuntimeError(f"backend {requested!r} is not available here (available: {avail})")
        return requested
    for name in preference:
        if name in avail:
            return name
    return "torch"
