"""What glibc's return of freed memory to the OS costs a CPU training step (``retain_cpu_memory``).

glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them on free,
so every step page-faults its large activations in again. ``retain_cpu_memory: true`` (the default on a CPU
device, :func:`gflowgr_core.devices.retain_freed_cpu_memory`) keeps freed memory in the process. The setting
is process-wide and cannot be undone, so each measurement is a worker process: one per (method, setting),
the two settings alternating over ``--rounds`` rounds so a change in machine load hits both alike. A worker
builds the trainer, runs one untimed step, then times ``--steps`` steps of
:meth:`~gflowgr_core.train.trainer.Trainer.train_step` on consecutive batches of one epoch's window order
(the same batches in every worker) and reports the median step, its CPU seconds in the kernel and its minor
page faults.

Methods, on the 1.3M Qwen2-style model of ``configs/``, fp32: packed SFT, packed GFlowGR-TB (random
sampler: the objective's own cost), per-prefix SFT (``packing: false``).

    python benchmarks/bench_cpu_memory.py            # full Beauty, batch 1,024: results/cpu_memory_cpu.json
    python benchmarks/bench_cpu_memory.py --quick    # 500 Beauty users, batch 64
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train_step import MODELS, load_data, make_trainer, timed_step  # noqa: E402
from common import RESULTS_DIR, environment, format_table, log, write_json  # noqa: E402

METHODS = {"sft_packed": ("sft", []), "gflowgr_tb_packed": ("gflowgr_tb_random", []),
           "sft_per_prefix": ("sft", ["packing=false"])}
SIZES = {False: (1024, 5), True: (64, 3)}   # quick -> (batch, steps)


def worker(args) -> None:
    """Time ``args.steps`` steps of one method under one setting; print one JSON line."""
    from gflowgr_core.data.prepared import PreparedData
    from gflowgr_core.data.windows import trunk_windows, window_order
    from gflowgr_core.devices import cpu_memory_retained

    method, extra = METHODS[args.method]
    data = PreparedData.load(args.data)
    init = Path(args.init) if method != "sft" else None
    trainer = make_trainer(Path(args.data), data, MODELS["qwen2_1.3M"], method, args.batch, "cpu", "float32",
                           Path(args.work) / f"{args.method}_{args.retain}", init,
                           [*extra, f"retain_cpu_memory={args.retain}"])
    # A per-prefix trainer builds no windows: both layouts step through the same batches of one window order.
    order = window_order(trainer.train_index, trunk_windows(data.split.train.history), torch.Generator().manual_seed(0))
    b = args.batch
    trainer.train_step(order[:b])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times = [timed_step(trainer, order[(i + 1) * b:(i + 2) * b], lambda: None) for i in range(args.steps)]
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"median_step_s": statistics.median(times), "steps": times,
                      "sys_s_per_step": (after.ru_stime - usage.ru_stime) / args.steps,
                      "user_s_per_step": (after.ru_utime - usage.ru_utime) / args.steps,
                      "minor_faults_per_step": (after.ru_minflt - usage.ru_minflt) / args.steps,
                      "retained": cpu_memory_retained()}))


def run_worker(method: str, retain: bool, data_dir: Path, init: Path, work: Path, batch: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--retain", str(retain).lower(),
           "--data", str(data_dir), "--init", str(init), "--work", str(work), "--batch", str(batch),
           "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    if done.returncode != 0:
        raise RuntimeError(f"worker {method} retain={retain} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="500 Beauty users, batch 64")
    p.add_argument("--data", default=None, help="a prepared dataset folder (default: Beauty, prepared here)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (release, retain) worker pairs per method")
    p.add_argument("--out", default=None, help="JSON path (default: results/cpu_memory_cpu[_quick].json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--method", "--retain", "--init", "--work"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    batch, steps = SIZES[args.quick]
    env = environment("cpu")
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from gflowgr_core.train.checkpoint import save_policy

        work = Path(tmp)
        data_dir, data, data_label = load_data(args.data, work, args.quick)
        sft = make_trainer(data_dir, data, MODELS["qwen2_1.3M"], "sft", batch, "cpu", "float32", work / "init_run",
                           None, ["retain_cpu_memory=false"])
        init = save_policy(sft.policy, work / "init")
        del sft
        for method in METHODS:
            runs = {False: [], True: []}
            for r in range(args.rounds):
                for retain in (False, True):
                    runs[retain].append(run_worker(method, retain, data_dir, init, work / "runs", batch, steps))
                    log(f"{method} round {r + 1} retain={retain}: median step {runs[retain][-1]['median_step_s']:.3f} s,"
                        f" {runs[retain][-1]['minor_faults_per_step']:.0f} faults/step")
            for retain, results in runs.items():
                if any(res["retained"] != retain for res in results):
                    raise RuntimeError(f"{method}: a worker asked for retain={retain} ran without that setting")
                every = [t for res in results for t in res["steps"]]
                rows.append({"method": method, "retain_cpu_memory": retain, "batch": batch,
                             "steps": len(every), "workers": len(results),
                             "median_step_s": statistics.median(every),
                             "sys_s_per_step": statistics.mean(res["sys_s_per_step"] for res in results),
                             "user_s_per_step": statistics.mean(res["user_s_per_step"] for res in results),
                             "minor_faults_per_step": statistics.mean(res["minor_faults_per_step"] for res in results)})
    by = {(r["method"], r["retain_cpu_memory"]): r["median_step_s"] for r in rows}
    summary = {f"{m}_retain_over_release": by[(m, True)] / by[(m, False)] for m in METHODS}
    for name, method in (("gflowgr_tb_over_sft_packed", "gflowgr_tb_packed"),
                         ("per_prefix_over_packed_sft", "sft_per_prefix")):
        for retain, setting in ((False, "release"), (True, "retain")):
            summary[f"{name}_{setting}"] = by[(method, retain)] / by[("sft_packed", retain)]
    payload = {**env, "quick": args.quick, "data": data_label, "dtype": "float32", "model": "qwen2_1.3M",
               "model_config": MODELS["qwen2_1.3M"], "steps_per_worker": steps, "rounds": args.rounds,
               "load_average_1m": {"start": load_start, "end": os.getloadavg()[0], "logical_cores": os.cpu_count()},
               "rows": rows, "summary": summary}
    out = Path(args.out) if args.out else RESULTS_DIR / f"cpu_memory_cpu{'_quick' if args.quick else ''}.json"
    write_json(out, payload)
    print(f"{env['device']}; {data_label}; batch {batch}")
    print(format_table(rows, ["method", "retain_cpu_memory", "steps", "median_step_s", "sys_s_per_step",
                              "user_s_per_step", "minor_faults_per_step"]))
    print(f"summary: {summary}")
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
