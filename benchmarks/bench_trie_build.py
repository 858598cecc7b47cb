"""Trie build time: C++ builder (OpenMP) against the vectorised PyTorch builder, measured in the same run.

Random 4-level SIDs with 256 codes per level at several catalogue sizes (and the LETTER Beauty SIDs when
the shared data is present), plus the time of ``contains`` (a full root-to-leaf walk) with dense first
levels against pure CSR search. Prints a table and writes ``benchmarks/results/trie_build.json``: the common
header (``device``, ``versions`` with the git commit, ``torch_threads``, ``load_average``) and one entry of
``rows`` per (catalogue, thread count) with its sizes and both builders' times.

    python benchmarks/bench_trie_build.py [--sizes 10000 100000 1000000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS_DIR, environment, load_average, write_json  # noqa: E402

from gflowgr_core import backends  # noqa: E402
from gflowgr_core.sid.trie import Trie  # noqa: E402

ROOT = HERE.parent
DATA = Path(os.environ.get("GFLOWGR_DATA", ROOT.parent / "shared" / "data"))


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: first-touch allocations and lazy library loading are not part of the build cost
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def beauty_codes() -> torch.Tensor | None:
    index = DATA / "letter" / "Beauty" / "Beauty.index.json"
    if not index.is_file():
        return None
    raw = json.loads(index.read_text())
    return torch.tensor([[int(t.split("_")[1].rstrip(">")) for t in raw[k]] for k in sorted(raw, key=int)])


def measure_case(name: str, codes: torch.Tensor, per_level: tuple[int, ...], builders: list[str],
                 threads: int, repeats: int) -> dict:
    n = codes.shape[0]
    repeats = max(3, repeats if n < 1_000_000 else min(repeats, 3))
    row = {"case": name, "threads": threads, "n_items": n, "codes_per_level": list(per_level),
           "repeats": repeats}
    tries = {}
    for b in builders:
        def build(b=b):
            tries[b] = Trie.build(codes, per_level, backend=b)
        med, times = median_seconds(build, repeats)
        row[f"{b}_median_s"] = med
        row[f"{b}_min_s"] = min(times)
        row[f"{b}_times_s"] = times
    stats = tries["torch"].stats()
    row.update({k: stats[k] for k in ("nodes_per_level", "num_edges", "num_leaves", "max_branch",
                                      "csr_bytes", "dense_bytes")})
    if "cpp" in tries:
        row["cpp_speedup"] = row["torch_median_s"] / row["cpp_median_s"]
    # Query cost: the full root-to-leaf walk, dense first levels vs CSR search only.
    dense = tries["torch"]
    sparse = Trie.build(codes, per_level, dense_levels=0, backend=builders[-1])
    row["contains_dense_median_s"], _ = median_seconds(lambda: dense.contains(codes), repeats)
    row["contains_sparse_median_s"], _ = median_seconds(lambda: sparse.contains(codes), repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5, help="timed builds per case (>= 3; 1M rows: <= 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch/OpenMP thread counts to measure (default: 1 and torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "trie_build.json")
    args = parser.parse_args()

    has_cpp = backends.extension_op("trie_build") is not None
    if not has_cpp:
        print("note: compiled extension not built; only the PyTorch builder is measured", file=sys.stderr)
    builders = ["torch"] + (["cpp"] if has_cpp else [])
    default_threads = torch.get_num_threads()
    thread_counts = args.threads or sorted({1, default_threads})
    per_level = (256,) * 4
    cases = []
    gen = torch.Generator().manual_seed(0)
    for n in args.sizes:
        cases.append((f"random n={n:,}", torch.randint(0, 256, (n, 4), generator=gen)))
    beauty = beauty_codes()
    if beauty is not None:
        cases.append(("LETTER Beauty", beauty))

    env = environment("cpu")  # before the runs: its load average is the one they started under
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name, codes in cases:
            rows.append(measure_case(name, codes, per_level, builders, threads, args.repeats))
    torch.set_num_threads(default_threads)

    header = f"{'case':<20}{'threads':>8}{'items':>11}{'nodes':>11}{'torch s':>10}{'cpp s':>10}{'speedup':>9}" \
             f"{'contains dense s':>18}{'sparse s':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        cpp = f"{r['cpp_median_s']:>10.4f}" if has_cpp else f"{'-':>10}"
        speed = f"{r['cpp_speedup']:>8.1f}x" if has_cpp else f"{'-':>9}"
        print(f"{r['case']:<20}{r['threads']:>8}{r['n_items']:>11,}{sum(r['nodes_per_level']):>11,}"
              f"{r['torch_median_s']:>10.4f}{cpp}{speed}{r['contains_dense_median_s']:>18.4f}"
              f"{r['contains_sparse_median_s']:>10.4f}")

    ext = backends.extension()
    env["load_average_end"] = load_average()
    result = {
        **env,
        "benchmark": "trie_build",
        "extension": {"version": ext.version() if ext is not None else None,
                      "openmp": ext.has_openmp() if ext is not None else None},
        "config": {"sizes": args.sizes, "repeats": args.repeats, "threads": thread_counts,
                   "codes_per_level": list(per_level), "torch_default_threads": default_threads},
        "baseline": "torch builder (vectorised PyTorch), same process and inputs",
        "timing": "median (and min) wall-clock seconds after one warm-up build, per thread count; includes "
                  "input validation and the derived tables (edges, dense levels)",
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
