"""Shared benchmark harness: environment report, median timing, extra peak memory, tables and JSON.

Every benchmark script measures its baseline in the same run and writes one JSON file holding the
``device``, the library ``versions`` (with the git commit measured), every measurement (``rows``, each with
the sizes it ran at) and a ``summary`` whose entries carry their own sizes. ``benchmarks/report.py`` turns
these files into the tables of the README and docs. Use from a script in this folder as
``from common import ...`` (the scripts put their own folder on ``sys.path``); importing it also puts this
checkout on ``sys.path`` when ``gflowgr_core`` is not pip-installed. :func:`parse_benchmark_args` gives the
scripts their shared options (``--device``, ``--out``) and the ``--quick`` defaults.

Timing: ``warmup`` untimed calls (compilation, caches, allocator), then ``reps`` timed calls; on CUDA each
call is bracketed by CUDA events (device time, no host overhead between calls counted twice), on CPU by
``time.perf_counter``. The median is the headline number.

Memory: the extra peak of a call is ``max_memory_allocated`` during the call minus the memory allocated
just before it (its inputs), i.e. what the call itself needs at its worst moment. Only measured on CUDA.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DeviceLike = Union[str, torch.device]


def device_name(device: DeviceLike) -> str:
    """Human-readable name of ``device``: the GPU model, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} logical cores)"


def _module_version(name: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except ImportError:
        return None


REPO = Path(__file__).resolve().parents[1]
try:
    import gflowgr_core  # noqa: F401
except ImportError:  # a source checkout that is not pip-installed: measure the code next to these scripts
    sys.path.insert(0, str(REPO))
# What a measurement depends on: uncommitted changes here mean the commit alone does not reproduce it (the
# results files and the report that renders them are not measured code).
MEASURED_CODE = ("gflowgr_core", "kernels", "csrc", "benchmarks", "setup.py", ":(exclude)benchmarks/results",
                 ":(exclude)benchmarks/report.py")


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> Optional[str]:
    out = _git("rev-parse", "--short", "HEAD")
    return (out.strip() or None) if out is not None else None


def _git_uncommitted() -> Optional[list[str]]:
    """Tracked files under :data:`MEASURED_CODE` that differ from the commit (``None`` outside git)."""
    out = _git("status", "--porcelain", "--untracked-files=no", "--", *MEASURED_CODE)
    return None if out is None else sorted(line[3:] for line in out.splitlines() if line.strip())


def versions() -> dict[str, Optional[str]]:
    """Versions of Python, torch (and its CUDA), triton, transformers, numpy, gflowgr, the git commit and
    the measured code's files that differ from it (``git_uncommitted``, ``[]`` when none); ``None`` for what
    is not there."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _module_version("triton"),
        "transformers": _module_version("transformers"),
        "numpy": _module_version("numpy"),
        "gflowgr": _module_version("gflowgr_core"),
        "git_commit": _git_commit(),
        "git_uncommitted": _git_uncommitted(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


def load_average() -> Optional[list[float]]:
    """The 1/5/15-minute load average (``None`` where the OS has none): other processes on a shared machine
    slow every measurement, so results files record it."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(device: DeviceLike) -> dict[str, Any]:
    """The header of every results file, taken before the measurements: ``device`` (its name),
    ``device_kind`` (``"cpu"`` / ``"cuda"``), ``versions``, ``torch_threads`` and, on a CPU, the
    ``load_average`` at the start (scripts add ``load_average_end``)."""
    device = torch.device(device)
    env = {"device": device_name(device), "device_kind": device.type, "versions": versions(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cpu":
        env["load_average"] = load_average()
    return env


def synchronize(device: DeviceLike) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: DeviceLike, warmup: int = 3, reps: int = 20) -> dict[str, float]:
    """Median (and min / max) wall time of ``fn()`` in milliseconds over ``reps`` calls after ``warmup``.

    Returns:
        ``{"median_ms", "min_ms", "max_ms", "reps"}``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def extra_peak_bytes(fn: Callable[[], Any], device: DeviceLike) -> Optional[int]:
    """Bytes ``fn()`` needs above what was allocated before it, at its peak (CUDA only; ``None`` on CPU).

    Whatever ``fn`` returns is dropped before the next measurement by the caller; it counts in the peak.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of the device allocator."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (bool(oom) and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def release(device: DeviceLike) -> None:
    """Return cached blocks to the device between measurements (keeps peaks independent)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``; floats with 4 significant digits."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_json(path: Union[str, Path], payload: dict) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return path


def log(msg: str) -> None:
    """Progress line on stderr (stdout carries the table)."""
    print(msg, file=sys.stderr, flush=True)


def parse_benchmark_args(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]], stem: str,
                         defaults: dict[str, tuple[Any, Any]]) -> argparse.Namespace:
    """Parse ``argv`` with a script's parser ``ap`` (which has ``--quick``) plus ``--device`` (cuda when
    available) and ``--out``.

    Every option named in ``defaults`` that was not given takes its ``(full, quick)`` value as ``--quick``
    says, and ``--out`` defaults to ``results/<stem>.json`` (quick: ``results/<stem>_quick.json``).
    """
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path,
                    help=f"JSON path (default results/{stem}.json; quick: results/{stem}_quick.json)")
    args = ap.parse_args(argv)
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.out = args.out or RESULTS_DIR / (f"{stem}_quick.json" if args.quick else f"{stem}.json")
    return args
