"""Which compute backends this installation can use, reported once.

``torch`` (the plain-PyTorch reference) is always there. ``cpp`` and ``cuda`` come from the compiled
extension ``gflowgr_core._C`` built from ``csrc/``; ``triton`` needs the triton package and either a CUDA
device or ``TRITON_INTERPRET=1`` (the CPU interpreter, for tests).

It also holds the one rule for which backend runs each op (:func:`resolve_backend`): ops are declared with
:func:`define_op` (their PyTorch reference) and accelerated implementations join with :func:`register`.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple, Sequence

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


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` is not usable in this installation, or ``None`` when it is."""
    if name == "torch" or name in available_backends():
        return None
    ext = extension()
    no_ext = ("GFLOWGR_NO_EXT=1 is set" if os.environ.get("GFLOWGR_NO_EXT") == "1" else
              "the compiled extension gflowgr_core._C is not built (pip install --no-build-isolation -v -e .)")
    if name == "cpp":
        return no_ext
    if name == "cuda":
        if ext is None:
            return no_ext
        if not getattr(ext, "has_cuda", lambda: False)():
            return "the compiled extension was built without its CUDA ops (no nvcc or CPU-only torch at build time)"
        return "no CUDA device is visible"
    if name == "triton":
        if not triton_available():
            return "triton is not installed (pip install triton)"
        return "triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tests)"
    return f"unknown backend {name!r}"


# ------------------------------------------------------------------------------------ which backend an op gets
#: What a caller may ask for: ``"auto"`` or a backend name.
REQUESTS = ("auto",) + BACKENDS
#: The device types each backend runs on (``None``: every device). Triton also runs on CPU tensors under
#: ``TRITON_INTERPRET=1`` when asked for by name: the interpreter is for tests, so ``"auto"`` never picks it.
RUNS_ON: dict[str, tuple[str, ...] | None] = {"torch": None, "cpp": ("cpu",), "cuda": ("cuda",),
                                              "triton": ("cuda",)}
#: ``"auto"`` takes the first usable backend of this list for the tensors' device type (fastest first).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


class Resolution(NamedTuple):
    """The backend an op call runs on (``name``) and why (``reason``, one line)."""
    name: str
    reason: str


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op: ``fn``, the device types it runs on, an optional
    ``supports(**options) -> bool`` saying whether it implements a call's options, and the floating-point
    ``dtypes`` of the operands it computes in (``None``: every dtype)."""
    fn: Callable
    device_types: tuple[str, ...] | None
    supports: Callable[..., bool] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None


@dataclass
class _Op:
    providers: tuple[str, ...]
    impls: dict[str, Implementation] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}
_LAST: dict[str, Resolution] = {}
_fallbacks_logged: set[tuple] = set()
_gpu_warning_done = False


def define_op(op: str, reference: Callable, providers: Sequence[str] = ()) -> None:
    """Declare an op with its plain-PyTorch ``reference`` (the ``"torch"`` backend, any device) and the
    modules whose import registers its accelerated implementations (imported at its first resolution)."""
    _OPS[op] = _Op(tuple(providers), {"torch": Implementation(reference, None)})


def register(op: str, name: str, fn: Callable, device_types: Sequence[str] | None = None,
             supports: Callable[..., bool] | None = None,
             dtypes: Sequence[torch.dtype] | None = None) -> None:
    """Make ``fn`` the ``name`` implementation of ``op`` (same calling convention as its reference).

    ``device_types`` defaults to :data:`RUNS_ON` of ``name``; ``supports``, when given, is called with the
    call's options as keywords and returns ``False`` for options ``fn`` does not implement; ``dtypes``, when
    given, are the operand dtypes ``fn`` computes in: a call whose ``dtype`` (see :func:`resolve_backend`) is
    not among them runs elsewhere (e.g. float64 on the reference, never rounded by a float32 kernel).
    """
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; defined ops: {sorted(_OPS)}")
    if name not in BACKENDS or name == "torch":
        raise ValueError(f"unknown backend {name!r} for {op}: expected one of {BACKENDS[1:]} (the 'torch' "
                         f"backend is the op's reference)")
    types = RUNS_ON[name] if device_types is None else tuple(device_types)
    kinds = None if dtypes is None else tuple(dtypes)
    if kinds is not None and not all(isinstance(d, torch.dtype) for d in kinds):
        raise TypeError(f"dtypes of the {name!r} {op} must be torch dtypes, got {kinds}")
    _OPS[op].impls[name] = Implementation(fn, types, supports, kinds)


def _op(op: str) -> _Op:
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; defined ops: {sorted(_OPS)}")
    load_providers(*_OPS[op].providers)
    return _OPS[op]


def registered(op: str) -> tuple[str, ...]:
    """The backends with an implementation of ``op`` (providers imported), fastest first."""
    impls = _op(op).impls
    return tuple(n for n in ("triton", "cuda", "cpp", "torch") if n in impls)


def implementation(op: str, name: str) -> Callable:
    """The function of backend ``name`` of ``op`` (as chosen by :func:`resolve_backend`)."""
    return _op(op).impls[name].fn


def _describe(options: dict) -> str:
    shown = [f"{k}={v!r}" for k, v in options.items() if isinstance(v, (str, bool, int, float))]
    return ", ".join(shown) or "these options"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unusable(op: _Op, op_name: str, name: str, device: torch.device, options: dict | None,
              dtype: torch.dtype | None = None) -> str | None:
    """``None`` when backend ``name`` can run this call of the op, else the reason it cannot."""
    impl = op.impls.get(name)
    if impl is None:
        return f"{op_name} has no {name!r} implementation"
    missing = unavailable_reason(name)
    if missing is not None:
        return f"{name!r} is not available here: {missing}"
    if (impl.device_types is not None and device.type not in impl.device_types
            and not (name == "triton" and triton_interpret())):
        return f"the {name!r} {op_name} runs on {'/'.join(impl.device_types)} tensors, not {device.type}"
    if dtype is not None and impl.dtypes is not None and dtype not in impl.dtypes:
        return (f"the {name!r} {op_name} computes in {'/'.join(_dtype_name(d) for d in impl.dtypes)}, not "
                f"{_dtype_name(dtype)}")
    if impl.supports is not None and options is not None and not impl.supports(**options):
        return f"the {name!r} {op_name} does not implement {_describe(options)}"
    return None


def _warn_missing_gpu_backends(device: torch.device) -> None:
    """Once per process, at the first op on CUDA tensors: say which GPU backends are missing and why."""
    global _gpu_warning_done
    if device.type != "cuda" or _gpu_warning_done:
        return
    _gpu_warning_done = True
    missing = [(n, unavailable_reason(n)) for n in ("triton", "cuda")]
    missing = [(n, why) for n, why in missing if why is not None]
    if missing:
        log.warning("gflowgr: CUDA tensors, but the %s backend%s missing (%s); ops without them run on the "
                    "slower PyTorch fallbacks", " and ".join(repr(n) for n, _ in missing),
                    "s are" if len(missing) > 1 else " is", "; ".join(f"{n}: {why}" for n, why in missing))


def resolve_backend(op: str, requested: str, device, options: dict | None = None,
                    dtype: torch.dtype | None = None) -> Resolution:
    """The one rule for which backend runs a call of ``op`` on tensors of ``device``.

    ``requested`` is ``"auto"`` or a backend name (:data:`REQUESTS`); every op accepts every name. A named
    backend runs when the op has an implementation of it that is available here, runs on ``device``,
    computes in ``dtype`` (the floating dtype of the call's operands, checked against the ``dtypes`` the
    implementation registered; ``None`` skips that check) and implements ``options`` (the call's keyword
    options, passed to the implementation's ``supports``; ``None`` skips that check).
    Otherwise, and for ``"auto"``, the first such backend of :data:`AUTO_ORDER` for the device type runs
    (the reference ``"torch"`` always can). A named request that falls back is logged once per
    (op, request, device type, choice).

    Returns:
        :class:`Resolution` ``(name, reason)``, also kept as :func:`last_resolution` of ``op``.

    Raises:
        ValueError: ``requested`` is not in :data:`REQUESTS`, or ``op`` is not defined.
    """
    if requested not in REQUESTS:
        raise ValueError(f"unknown backend {requested!r}; expected one of {REQUESTS}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    entry = _op(op)
    device = torch.device(device)
    _warn_missing_gpu_backends(device)
    refused = None
    if requested != "auto":
        refused = _unusable(entry, op, requested, device, options, dtype)
        if refused is None:
            return _record(op, Resolution(requested, f"{requested!r} as requested"))
    skipped = []
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        why = _unusable(entry, op, name, device, options, dtype)
        if why is None:
            break
        skipped.append(why)
    else:
        name = "torch"
    auto = f"auto on {device.type} chose {name!r}" + (f" ({'; '.join(skipped)})" if skipped else "")
    if refused is None:
        return _record(op, Resolution(name, auto))
    resolution = _record(op, Resolution(name, f"{requested!r} requested but {refused}; {auto}"))
    key = (op, requested, device.type, name)
    if key not in _fallbacks_logged:
        _fallbacks_logged.add(key)
        log.warning("gflowgr: %s: %s", op, resolution.reason)
    return resolution


def _record(op: str, resolution: Resolution) -> Resolution:
    if _LAST.get(op) != resolution:
        log.debug("%s backend: %s (%s)", op, resolution.name, resolution.reason)
    _LAST[op] = resolution
    return resolution


def last_resolution(op: str) -> Resolution | None:
    """The :class:`Resolution` of the most recent :func:`resolve_backend` of ``op`` (``None`` before)."""
    return _LAST.get(op)


def kernel_module(name: str) -> ModuleType:
    """``gflowgr_core.kernels.<name>`` (an op file of Triton kernels, or ``utils``), imported on first use.

    The top-level ``kernels/`` folder has no ``__init__.py`` on purpose: a regular package there would answer
    ``import kernels`` whenever the checkout root is on ``sys.path`` (``python -m pytest``, ``python -c``, a
    notebook started in the root) and shadow the PyPI package ``kernels`` that transformers imports. Without
    it, an installed ``kernels`` always wins, and without one transformers sees a namespace folder, which it
    reports as absent.

    A wheel holds the folder as ``gflowgr_core/kernels/`` (setup.py ``package_dir``), an implicit namespace
    subpackage that imports as it is. An editable install's finder maps only packages with an ``__init__``,
    and a source checkout on ``PYTHONPATH`` (``benchmarks/gpu_quality.sh`` without ``--build``) has no such
    subpackage, so there the ``kernels/`` folder beside ``gflowgr_core/`` is registered under that name.
    """
    if "gflowgr_core.kernels" not in sys.modules:
        try:
            importlib.import_module("gflowgr_core.kernels")
        except ModuleNotFoundError as exc:
            if exc.name != "gflowgr_core.kernels":
                raise
            folder = Path(__file__).resolve().parents[1] / "kernels"
            if not (folder / f"{name}.py").is_file():
                raise ModuleNotFoundError(f"gflowgr_core.kernels is not installed and {folder / name}.py does not "
                                          f"exist; reinstall gflowgr (pip install -e .)",
                                          name="gflowgr_core.kernels") from None
            spec = importlib.machinery.ModuleSpec("gflowgr_core.kernels", None, is_package=True)
            spec.submodule_search_locations = [str(folder)]
            module = importlib.util.module_from_spec(spec)
            sys.modules["gflowgr_core.kernels"] = module
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
