"""Device names as the library reads them, and the CPU allocator setting training runs with."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises:
        RuntimeError when a CUDA device is named on a machine without CUDA.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here")
    return device


# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_retained = False


def retain_freed_cpu_memory() -> bool:
    """Keep memory that freed CPU tensors leave in this process instead of handing it back to the OS.

    glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on
    free, so a training step whose activations exceed that size page-faults all of them in again, every step
    (``benchmarks/bench_cpu_memory.py`` measures what that costs). This sets glibc's
    ``M_MMAP_MAX`` to 0 (large blocks come from the heap) and ``M_TRIM_THRESHOLD`` to -1 (the heap is never
    trimmed), for the whole process and from now on. The resident size then stays at the run's peak.

    Returns:
        ``True`` when the setting is in effect (now or from an earlier call); ``False`` where the C library is
        not glibc (nothing changes).
    """
    global _retained
    if _retained:
        return True
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    _retained = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    return _retained


def cpu_memory_retained() -> bool:
    """Whether :func:`retain_freed_cpu_memory` is in effect in this process."""
    return _retained
