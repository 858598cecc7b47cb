"""Static shapes and ``torch.compile`` for the packed training step: does either pay?

Times :meth:`gflowgr_core.train.trainer.Trainer.train_step` (the sampler's draw, forward, loss, backward,
clip, AdamW step) of packed SFT and packed GFlowGR-TB (CM curriculum) on the 1.3M Qwen2-style model of
``configs/``, one variant per trainer, all started from the same SFT-initialised weights:

* ``eager``: today's default, as many packed rows as each batch needs (the baseline).
* ``eager_dense``: ``eager`` with ``pack_sparse: false``, the model's own forward over the whole 4D mask (does
  the block-sparse default pay on this device?).
* ``eager_static``: ``pack_rows`` fixed at the most rows any batch of the epoch needs (one shape every step).
* ``compiled``: ``eager_static`` plus ``compile_mode: default`` (inductor).
* ``compiled_dynamic``: ``compile_mode: default`` at the rows each batch needs (a second row count
  recompiles once with that dimension dynamic; its warm-up steps see several counts).
* ``compiled_cudagraphs``: ``eager_static`` plus ``compile_mode: reduce-overhead`` (CUDA graphs; CUDA only).

Eager variants other than ``eager_dense`` run the default ``pack_sparse: true`` (block-sparse attention, see
``gflowgr_core/model/block_attention.py``); the compiled ones always run the dense forward. Each row's
``forward`` says which ran.

The fixed row count is the most that any batch of one epoch's window order (the order the trainer visits)
needs with the method's trajectories per example (:meth:`Trainer.packed_rows_per_batch`). Each variant first runs ``warmup`` untimed steps (the
first one compiles; its seconds are reported as ``first_step_s``), then ``reps`` rounds time one step of
every variant on the same batch, walking through the epoch order, so a change in machine load hits all
variants alike. ``summary`` gives each variant's median step over the eager one's: below 1 pays.

    python benchmarks/bench_compile.py            # results/train_compile_<device>.json (batch 1,024)
    python benchmarks/bench_compile.py --quick    # CPU check of the script: batch 64, 500 Beauty users

Data as for ``bench_train_step.py``: ``--data``, else Beauty prepared from ``data_carry/Beauty`` or the shared
data folder, else a synthetic dataset.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train_step import MODELS, device_sync, load_data, make_trainer, timed_step  # noqa: E402
from common import RESULTS_DIR, environment, format_table, log, write_json  # noqa: E402

from gflowgr_core.devices import cpu_memory_retained  # noqa: E402

METHODS = ("sft", "gflowgr_tb_cm_curriculum")
VARIANTS = {"eager": "eager", "eager_dense": "eager", "eager_static": "eager", "compiled": "default",
            "compiled_dynamic": "default", "compiled_cudagraphs": "reduce-overhead"}   # variant -> compile_mode
STATIC = ("eager_static", "compiled", "compiled_cudagraphs")
DENSE = ("eager_dense",)   # eager variants with pack_sparse: false
SIZES = {False: (1024, 3, 20), True: (64, 2, 4)}   # quick -> (batch, warmup, reps)


def bench_method(method: str, variants: list[str], data_dir: Path, data, init: Path, order: torch.Tensor,
                 batch: int, warmup: int, reps: int, device: str, dtype: str, work: Path) -> list[dict]:
    """One row per variant of ``method``: first-step and median step seconds over ``reps`` interleaved rounds."""
    model = MODELS["qwen2_1.3M"]
    sync = device_sync(device)
    eager = make_trainer(data_dir, data, model, method, batch, device, dtype, work / f"{method}_eager", init)
    needed = eager.packed_rows_per_batch(order)
    static_rows = max(needed)
    log(f"{method}: packed rows per batch {min(needed)}..{static_rows} over {len(needed)} batches")
    trainers, first, failed = {}, {}, {}
    for name in variants:
        extra = [f"compile_mode={VARIANTS[name]}"] + ([f"pack_rows={static_rows}"] if name in STATIC else [])
        extra += ["pack_sparse=false"] if name in DENSE else []
        try:
            trainers[name] = eager if name == "eager" else make_trainer(
                data_dir, data, model, method, batch, device, dtype, work / f"{method}_{name}", init, extra)
            first[name] = timed_step(trainers[name], order[:batch], sync)
            for i in range(1, warmup):
                timed_step(trainers[name], order[i * batch:(i + 1) * batch], sync)
        except Exception as exc:  # a variant this torch/device cannot run is reported, the others still run
            failed[name] = f"{type(exc).__name__}: {exc}"[:500]
            trainers.pop(name, None)
            log(f"{method} {name}: failed ({failed[name][:200]})")
            continue
        log(f"{method} {name}: first step {first[name]:.1f} s")
    steps = math.ceil(len(order) / batch)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(reps):
        lo = ((warmup + r) % steps) * batch
        for name in times:
            times[name].append(timed_step(trainers[name], order[lo:lo + batch], sync))
        log(f"{method} round {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in times))
    out = []
    for name in variants:
        row = {"method": method, "variant": name, "batch": batch, "pack_rows": static_rows if name in STATIC else None,
               "compile_mode": VARIANTS[name],
               "rows_needed_min": min(needed), "rows_needed_max": static_rows, "reps": reps, "warmup": warmup}
        if name in failed:
            row["error"] = failed[name]
        else:
            ts = times[name]
            cfg = trainers[name].cfg
            # The compiled decoder always runs the dense packed forward; eager runs the one pack_sparse selects.
            forward = "block_sparse" if cfg.pack_sparse and cfg.compile_mode == "eager" else "dense"
            row.update(pack_row_tokens=cfg.pack_row_tokens, forward=forward, first_step_s=first[name],
                       median_step_s=statistics.median(ts), min_step_s=min(ts), max_step_s=max(ts))
        out.append(row)
    return out


def summarize(rows: list[dict]) -> dict:
    """Per method: each variant's median step over the eager variant's (below 1: the variant is faster)."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        by = {r["variant"]: r.get("median_step_s") for r in rows if r["method"] == method}
        out[method] = {f"{name}_over_eager": (by[name] / by["eager"] if by[name] and by.get("eager") else None)
                       for name in by if name != "eager"}
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 64 on 500 Beauty users, few rounds")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--data", default=None, help="a prepared dataset folder (default: Beauty, prepared here)")
    p.add_argument("--work", default=None, help="scratch folder for prepared data and checkpoints")
    p.add_argument("--out", default=None, help="JSON path (default: results/train_compile_<device>[_quick].json)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 20, --quick 4)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = torch.device(device).type
    dtype = "bfloat16" if kind == "cuda" else "float32"
    batch, warmup, reps = SIZES[args.quick]
    reps = args.reps or reps
    variants = [v for v in VARIANTS if kind == "cuda" or v != "compiled_cudagraphs"]
    load_start = os.getloadavg()[0]
    env = environment(device)  # before the run: the commit and tree it measures
    with tempfile.TemporaryDirectory() as tmp:
        from gflowgr_core.data.windows import window_order
        from gflowgr_core.train.checkpoint import save_policy

        work = Path(args.work) if args.work else Path(tmp)
        data_dir, data, data_label = load_data(args.data, work, args.quick)
        sft = make_trainer(data_dir, data, MODELS["qwen2_1.3M"], "sft", batch, device, dtype, work / "init_run", None)
        init = save_policy(sft.policy, work / "init")
        order = window_order(sft.train_index, sft.windows, torch.Generator().manual_seed(0))
        del sft
        out = Path(args.out) if args.out else RESULTS_DIR / f"train_compile_{kind}{'_quick' if args.quick else ''}.json"

        def payload(rows: list[dict], complete: bool) -> dict:
            load = {"start": load_start, "end": os.getloadavg()[0], "logical_cores": os.cpu_count()}
            return {**env, "device_kind": kind, "dtype": dtype, "quick": args.quick, "data": data_label,
                    "model": "qwen2_1.3M", "model_config": MODELS["qwen2_1.3M"], "load_average_1m": load,
                    "cpu_memory_retained": cpu_memory_retained(),
                    "notes": ("first_step_s includes compilation; the compiled variants of one run share the "
                              "process's dynamo and inductor caches, and inductor keeps an on-disk cache between "
                              "runs: only a first compile on a fresh machine is a cold one."),
                    "complete": complete, "rows": rows, "summary": summarize(rows)}

        rows = []
        for i, method in enumerate(METHODS):
            rows += bench_method(method, variants, data_dir, data, init, order, batch, warmup, reps, device, dtype,
                                 work / "runs")
            # Written after every method: a run stopped by a time limit keeps what it measured ("complete": false).
            result = payload(rows, complete=i == len(METHODS) - 1)
            write_json(out, result)
    load = result["load_average_1m"]
    print(f"{env['device']}; {data_label}; {dtype}")
    print(format_table(rows, ["method", "variant", "batch", "pack_rows", "compile_mode", "first_step_s",
                              "median_step_s", "min_step_s"]))
    print(f"median step over eager: {result['summary']}")
    print(f"1-minute load average: {load['start']:.1f} at start, {load['end']:.1f} at end")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
