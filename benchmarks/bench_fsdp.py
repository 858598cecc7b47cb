"""Peak memory per rank and step time of DDP vs FSDP2 (``distributed: auto`` vs ``fsdp``) on 2 CPU processes.

The library trainer runs SFT steps (packing on) on a backbone built from config, large enough (~110M parameters
by default) that parameters + gradients + AdamW state dominate each rank's memory. Each strategy runs under its
own ``torchrun --nproc_per_node=2`` (gloo); every rank reports

* ``peak_rss_mb``: the process's resident-set high-water mark (``ru_maxrss``) at the end, and
  ``peak_over_baseline_mb``: the same minus the resident set after importing torch, transformers and the
  trainer, before the model is built (what training adds: model, gradients, optimiser state, activations,
  communication buffers);
* ``build_peak_over_baseline_mb``: the high-water mark once the trainer is built (model built, and sharded under
  FSDP, whose rank 0 alone builds the whole model), and ``step_peak_over_baseline_mb``: after each step, warm-up
  included, so that the peak can be told apart into the build and the steps;
* ``state_mb``: the bytes of the parameters, gradients and AdamW state this rank holds (its shards under FSDP);
* ``step_seconds``: median wall time of the timed steps (after one warm-up step).

The high-water mark counts what the C library keeps as well as what tensors hold. ``retain_cpu_memory: true``
(the trainer's CPU default: glibc keeps freed memory in the process, so a step does not page its activations in
again) lets FSDP's per-step gather and reduce buffers, of many sizes, pile up in the heap; ``--retain-cpu-memory
false`` returns freed memory to the OS, so the peak follows what is live. Each setting is its own JSON.

Usage: ``python benchmarks/bench_fsdp.py [--hidden 768 --layers 12 --steps 4] [--retain-cpu-memory false]``;
writes ``benchmarks/results/fsdp_cpu.json`` (``fsdp_cpu_memory_returned.json`` under ``--retain-cpu-memory
false``) with the device, versions, commit, sizes (the setting included), per-rank numbers and a summary with
``memory_ratio_fsdp_over_ddp`` (per-rank peak over baseline, the larger rank of each run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "fixtures" / "beauty_tiny"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    """The process's resident-set high-water mark so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _state_mb(trainer) -> float:
    """Bytes of parameters, gradients and optimiser state held by this rank (local shards of DTensors)."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    total = 0
    for p in trainer.policy.parameters():
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for state in trainer.optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += local(v).numel() * v.element_size()
    return total / 2 ** 20


def worker(args) -> None:
    """One rank: build the trainer, run the steps, write this rank's numbers."""
    import torch

    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import Trainer

    baseline = _rss_mb()  # after the imports: what follows is what training adds

    overrides = [f"data={args.data}", f"out={args.out}/{args.strategy}", "stage=sft", "device=cpu",
                 f"distributed={'fsdp' if args.strategy == 'fsdp' else 'auto'}", f"model.hidden={args.hidden}",
                 f"model.layers={args.layers}", f"model.heads={args.heads}", f"model.kv_heads={args.heads}",
                 f"model.intermediate={args.intermediate}", f"batch_size={args.batch_size}", "handle_signals=false",
                 "save_every_steps=0", "warmup_steps=1", f"retain_cpu_memory={args.retain_cpu_memory}"]
    trainer = Trainer(load_config(None, overrides))
    build_peak = _peak_mb() - baseline
    n_params = sum(p.numel() for p in trainer.policy.parameters())  # a DTensor's numel is the global one
    order = trainer.epoch_order(torch.Generator().manual_seed(0))
    times, step_peaks = [], []
    for step in range(args.steps + 1):
        index = order[step * args.batch_size:(step + 1) * args.batch_size]
        trainer.dist.barrier()
        start = time.perf_counter()
        trainer.train_step(index)
        trainer.dist.barrier()
        if step > 0:  # the first step allocates gradients and optimiser state
            times.append(time.perf_counter() - start)
        step_peaks.append(_peak_mb() - baseline)
    peak = _peak_mb()
    record = {"rank": trainer.dist.rank, "parameters": n_params, "peak_rss_mb": peak, "baseline_rss_mb": baseline,
              "peak_over_baseline_mb": peak - baseline, "build_peak_over_baseline_mb": build_peak,
              "step_peak_over_baseline_mb": step_peaks, "state_mb": _state_mb(trainer),
              "step_seconds": statistics.median(times), "step_seconds_all": times}
    records = trainer.dist.gather_objects(record)
    if trainer.dist.is_main:
        Path(args.result).write_text(json.dumps(records))
    trainer.close()


def _device() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--retain-cpu-memory", choices=("true", "false"), default="true",
                        help="the trainer's retain_cpu_memory setting for both strategies (default: true, as trained)")
    parser.add_argument("--json", help="output (default: benchmarks/results/fsdp_cpu.json, or "
                        "fsdp_cpu_memory_returned.json under --retain-cpu-memory false)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch
    import transformers

    from gflowgr_core.data.prepared import prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench_fsdp_"))
    prepare("letter", DATA, tmp / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {}
    for strategy in ("ddp", "fsdp"):
        result = tmp / f"{strategy}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--strategy", strategy, "--data", str(tmp / "data"), "--out", str(tmp / "runs"),
               "--result", str(result), "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads",
               str(args.heads), "--intermediate", str(args.intermediate), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--retain-cpu-memory", args.retain_cpu_memory]
        started = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{strategy} run failed:\n{proc.stderr[-4000:]}")
        runs[strategy] = json.loads(result.read_text())
        print(f"{strategy}: {time.time() - started:.0f}s", file=sys.stderr)

    def worst(strategy, key):
        return max(r[key] for r in runs[strategy])

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = {
        "benchmark": "bench_fsdp",
        "device": _device(),
        "backend": "gloo",
        "world_size": 2,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "commit": commit,
        "sizes": {"parameters": runs["ddp"][0]["parameters"], "hidden": args.hidden, "layers": args.layers,
                  "heads": args.heads, "intermediate": args.intermediate, "global_batch": args.batch_size,
                  "timed_steps": args.steps, "stage": "sft", "dtype": "float32", "optimizer": "AdamW",
                  "retain_cpu_memory": args.retain_cpu_memory == "true"},
        "note": "CPU shared with other work: step times are indicative; memory is per process (RSS high-water mark)",
        "runs": runs,
        "summary": {
            "memory_ratio_fsdp_over_ddp": worst("fsdp", "peak_over_baseline_mb") / worst("ddp", "peak_over_baseline_mb"),
            "peak_rss_ratio_fsdp_over_ddp": worst("fsdp", "peak_rss_mb") / worst("ddp", "peak_rss_mb"),
            "state_ratio_fsdp_over_ddp": worst("fsdp", "state_mb") / worst("ddp", "state_mb"),
            "step_time_ratio_fsdp_over_ddp": worst("fsdp", "step_seconds") / worst("ddp", "step_seconds"),
            "ddp_build_peak_over_baseline_mb": worst("ddp", "build_peak_over_baseline_mb"),
            "fsdp_build_peak_over_baseline_mb": worst("fsdp", "build_peak_over_baseline_mb"),
            "ddp_peak_over_baseline_mb": worst("ddp", "peak_over_baseline_mb"),
            "fsdp_peak_over_baseline_mb": worst("fsdp", "peak_over_baseline_mb"),
            "ddp_step_seconds": worst("ddp", "step_seconds"),
            "fsdp_step_seconds": worst("fsdp", "step_seconds"),
        },
    }
    json_path = Path(args.json) if args.json else REPO / "benchmarks" / "results" / (
        "fsdp_cpu.json" if args.retain_cpu_memory == "true" else "fsdp_cpu_memory_returned.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'':6}{'peak-baseline MB':>18}{'state MB':>10}{'step s':>8}")
    for strategy in ("ddp", "fsdp"):
        print(f"{strategy:6}{worst(strategy, 'peak_over_baseline_mb'):18.0f}{worst(strategy, 'state_mb'):10.0f}"
              f"{worst(strategy, 'step_seconds'):8.2f}")
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
