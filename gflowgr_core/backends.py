"""Which compute backends this installation can use, reported once.

``torch`` (the plain-PyTorch reference) is always there. ``cpp`` and ``cuda`` come from the compiled
extension ``gflowgr_core._C`` built from ``csrc/``; ``triton`` needs the triton package and either a CUDA
device or ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

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


def kernel_module(name: str) -> ModuleType:
    """``gflowgr_core.kernels.<name>`` (the Triton kernels), imported on first use.

    An installed package maps ``kernels/`` to ``gflowgr_core.kernels``; in a source checkout that was not
    installed that subpackage does not exist, so it is registered from the ``kernels/`` folder beside
    ``gflowgr_core/`` under the same name.
    """
    if "gflowgr_core.kernels" not in sys.modules:
        try:
            importlib.import_module("gflowgr_core.kernels")
        except ModuleNotFoundError as exc:
            if exc.name != "gflowgr_core.kernels":
                raise
            folder = Path(__file__).resolve().parents[1] / "kernels"
            init = folder / "__init__.py"
            if not init.is_file():
                raise ModuleNotFoundError(f"gflowgr_core.kernels is not installed and {init} does not exist; "
                                          f"reinstall gflowgr (pip install -e .)", name="gflowgr_core.kernels")
            spec = importlib.util.spec_from_file_location("gflowgr_core.kernels", init,
                                                          submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules["gflowgr_core.kernels"] = module
            spec.loader.exec_module(module)
            setattr(sys.modules["gflowgr_core"], "kernels", module)
    return importlib.import_module(f"gflowgr_core.kernels.{name}")


_loaded_providers: set[str] = set()


def load_providers(*modules: str) -> None:
    """Import the modules that register accelerated implementations of an op, once each.

    Dispatchers call this on first use so that ``backend="auto"`` finds every implementation without the
    caller importing anything. A provider that is not part of this installation is skipped; one that fails
    for another reason (a broken dependency) raises, since that is an error worth seeing.
    """
    for module in modules:
        if module in _loaded_providers:
            continue
        _loaded_providers.add(module)
        try:
            if module.startswith("gflowgr_core.kernels."):
                kernel_module(module.rsplit(".", 1)[1])
            else:
                importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name not in (module, "gflowgr_core.kernels"):
                raise
