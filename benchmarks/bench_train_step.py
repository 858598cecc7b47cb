"""Training-step cost: a GFlowGR step against an SFT step on the same batch and the same model.

Each row times :meth:`gflowgr_core.train.trainer.Trainer.train_step` (forward, loss, backward, clip,
AdamW step, LR schedule; the sampler's draw included) on one fixed batch of training examples:

* ``sft``: cross-entropy of the positive's SID codes (one trajectory per example).
* ``gflowgr_tb_random``: CE + TB over the positive and 3 augmented trajectories from the random sampler
  (4 trajectories per example; sampling is cheap, so this is the objective's own cost).
* ``gflowgr_tb_cm_curriculum``: the same with the CM curriculum sampler (the paper's default), whose
  SASRec is trained for one epoch only: its quality does not change the step's cost.

All three start from the same SFT-initialised weights. Models: the 1.3M-parameter Qwen2-style model of
``configs/`` (hidden 128, 4 layers, MLP 512) and a 0.1B-class one (hidden 768, 12 layers, 12 heads, MLP
3072). Median of ``reps`` steps after ``warmup`` steps per method, measured in interleaved rounds (one
step of each method per round, each timed with :func:`common.time_call`). The paper reports
GFlowGR training at about 2.1x SFT at equal sample budget (production model); a step here processes the
same examples in both methods, so ``summary.gflowgr_over_sft_step_time`` is that ratio.

Data: a prepared Beauty folder (``--data``), else Beauty is prepared from ``$GFLOWGR_DATA`` /
``../shared/data`` (all users; ``--quick``: the first 500), else a synthetic prepared dataset (random
sequences, 4 x 256 random SIDs) when the shared data is absent.

    python benchmarks/bench_train_step.py            # GPU, bf16 autocast: results/train_step.json
    python benchmarks/bench_train_step.py --quick    # CPU, small batches: results/train_step_quick.json

``--epoch`` measures packed training (``packing: true``) against per-prefix prompts (``packing: false``) on
the 1.3M model, batch 1,024, in one run: tokens per epoch (processed, padding included, and real), seconds
of a whole SFT epoch (steps of the two layouts interleaved, so a change in machine load hits both alike),
GFlowGR-TB with the CM curriculum over ``--gflowgr-steps`` steps scaled to an epoch, and evaluation users/s
(beam 20) with users batched by history length against the unsorted order. ``--per-prefix-minutes``
bounds the per-prefix side: when it runs out, the per-prefix epoch is the measured steps' mean scaled to
the epoch, and the JSON says how many steps were measured.

Trainers run with the library's defaults, so packed ones with ``pack_sparse: true`` (the JSON's ``pack_sparse``)
and, on a CPU, with ``retain_cpu_memory: true``; the JSON's ``cpu_memory_retained`` says whether that setting
was in effect (``bench_cpu_memory.py`` measures what it changes).

    python benchmarks/bench_train_step.py --epoch    # results/train_epoch_<device>.json
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
from typing import Callable, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (RESULTS_DIR, environment, format_table, is_oom, log, release, time_call,  # noqa: E402
                    write_json)

from gflowgr_core.data.prepared import PreparedData  # noqa: E402
from gflowgr_core.devices import cpu_memory_retained  # noqa: E402

MODELS = {
    "qwen2_1.3M": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 512, "flow_hidden": 128},
    "qwen2_0.1B": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12, "intermediate": 3072,
                   "flow_hidden": 256},
}
METHODS = {
    "sft": ["stage=sft"],
    "gflowgr_tb_random": ["stage=gflowgr", "gfn.objective=tb", "gfn.n_aug=3", "gfn.sampler=random"],
    "gflowgr_tb_cm_curriculum": ["stage=gflowgr", "gfn.objective=tb", "gfn.n_aug=3", "gfn.sampler=cm_curriculum"],
}
# (batch, warmup, reps) per model: full sizes for the GPU, small ones for a CPU check.
FULL = {"qwen2_1.3M": (1024, 5, 30), "qwen2_0.1B": (256, 3, 20)}
QUICK = {"qwen2_1.3M": (32, 2, 9), "qwen2_0.1B": (4, 1, 3)}


def shared_beauty() -> Path:
    """The LETTER Beauty folder: ``data_carry/Beauty`` in the checkout (how a GPU machine without
    ``../shared`` gets it), else ``$GFLOWGR_DATA/letter/Beauty`` (default ``../shared/data``)."""
    carried = HERE.parent / "data_carry" / "Beauty"
    if (carried / "Beauty.inter.json").is_file():
        return carried
    return Path(os.environ.get("GFLOWGR_DATA", HERE.parent.parent / "shared" / "data")) / "letter" / "Beauty"


def synthetic_prepared(out: Path, n_users: int = 2000, n_items: int = 3000, seed: int = 0) -> PreparedData:
    """A prepared dataset of random chronological sequences (5..30 items) over random 4 x 256 SIDs."""
    from gflowgr_core.data.loaders import Interactions
    from gflowgr_core.data.split import leave_one_out
    from gflowgr_core.metrics import item_popularity
    from gflowgr_core.sid.catalog import Catalog
    from gflowgr_core.sid.tokens import SIDTokenMap
    from gflowgr_core.sid.trie import Trie

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 31, (n_users,), generator=g)
    seqs = [torch.randint(0, n_items, (int(n),), generator=g).numpy() for n in lengths]
    inter = Interactions(user_ids=[str(u) for u in range(n_users)], item_ids=[str(i) for i in range(n_items)],
                         sequences=seqs, source="synthetic")
    split = leave_one_out(inter, max_history=20)
    codes = torch.randint(0, 256, (n_items, 4), generator=g)
    catalog = Catalog.from_codes(codes, (256,) * 4, inter.item_ids, collisions="share",
                                 provenance={"source": "synthetic"})
    trie = Trie.build(catalog.codes, catalog.codes_per_level)
    stats = {"source": "synthetic", "num_users": n_users, "num_items": n_items,
             "sid_collisions": catalog.stats()["sid_collisions"], **split.stats()}
    data = PreparedData(split=split, catalog=catalog, trie=trie, tokens=SIDTokenMap.from_scratch(catalog.codes_per_level),
                        popularity=item_popularity(split), item_ids=inter.item_ids, user_ids=inter.user_ids,
                        stats=stats)
    data.save(out)
    return data


def load_data(data: Optional[str], work: Path, quick: bool) -> tuple[Path, PreparedData, str]:
    """The prepared folder to benchmark on, the data, and a label saying what it is."""
    from gflowgr_core.data.prepared import prepare

    if data:
        return Path(data), PreparedData.load(data), f"prepared folder {data}"
    max_users = 500 if quick else None
    out = work / ("beauty_quick" if quick else "beauty")
    if (out / "stats.json").exists():
        return out, PreparedData.load(out), f"Amazon Beauty (LETTER SIDs), {max_users or 'all'} users"
    if (shared_beauty() / "Beauty.inter.json").exists():
        return out, prepare("letter", shared_beauty(), out, max_users=max_users), \
            f"Amazon Beauty (LETTER SIDs), {max_users or 'all'} users"
    out = work / "synthetic"
    log(f"{shared_beauty()} not found: benchmarking on a synthetic prepared dataset")
    return out, synthetic_prepared(out), "synthetic (random sequences and SIDs)"


def make_trainer(data_dir: Path, data: PreparedData, model: dict, method: str, batch: int, device: str,
                 dtype: str, out: Path, init_checkpoint: Optional[Path], extra: Sequence[str] = ()):
    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import Trainer

    overrides = [f"data={data_dir}", f"out={out}", f"device={device}", f"dtype={dtype}", f"batch_size={batch}",
                 "warmup_steps=10", "lr=0.0005", "cm.max_epochs=1", "cm.progress=false", "cm.verbose=false",
                 *[f"model.{k}={v}" for k, v in model.items()], *METHODS[method], *extra]
    if init_checkpoint is not None:
        overrides.append(f"init_checkpoint={init_checkpoint}")
    return Trainer(load_config(None, overrides), data)


def bench_model(name: str, data_dir: Path, data: PreparedData, batch: int, warmup: int, reps: int, device: str,
                dtype: str, work: Path) -> list[dict]:
    """Rows of the three methods on one model; the batch is the same ``batch`` training examples."""
    from gflowgr_core.train.checkpoint import save_policy

    model = MODELS[name]
    index = torch.arange(min(batch, len(data.split.train)))
    sft = make_trainer(data_dir, data, model, "sft", batch, device, dtype, work / f"{name}_sft", None)
    params = sum(p.numel() for p in sft.policy.lm_parameters())  # the LM, without the flow heads
    init = save_policy(sft.policy, work / f"{name}_init")
    trainers = {"sft": sft}
    for method in METHODS:
        if method == "sft":
            continue
        trainers[method] = make_trainer(data_dir, data, model, method, batch, device, dtype, work / f"{name}_{method}",
                                        init)
    # Interleaved rounds (one timed step of each method per round): a change in machine load during the
    # measurement then hits every method alike, which keeps the ratios meaningful on a shared machine.
    rows = {m: {"model": name, "params": int(params), "method": m, "batch": len(index), "dtype": dtype}
            for m in trainers}
    times: dict[str, list[float]] = {m: [] for m in trainers}
    failed: set[str] = set()
    cuda = torch.device(device).type == "cuda"
    peak: dict[str, int] = {m: 0 for m in trainers}

    def step(method: str) -> None:
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times[method].append(time_call(lambda: trainers[method].train_step(index), device, warmup=0,
                                           reps=1)["median_ms"])
            if cuda:  # the step's peak, with every trainer's weights and optimizer state resident
                peak[method] = max(peak[method], torch.cuda.max_memory_allocated(device))
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            failed.add(method)
            rows[method]["error"] = "out of memory"
            release(device)

    for method in trainers:
        for _ in range(warmup):
            if method not in failed:
                step(method)
        times[method].clear()
    for _ in range(reps):
        for method in trainers:
            if method not in failed:
                step(method)
    for method, row in rows.items():
        if method in failed:
            continue
        median = statistics.median(times[method])
        row.update(step_ms=median, min_ms=min(times[method]), max_ms=max(times[method]),
                   examples_per_s=len(index) / (median / 1e3), reps=reps)
        if cuda:
            row["peak_gb"] = peak[method] / 2 ** 30
        log(f"{name} {method}: median {median:.1f} ms over {reps} interleaved steps")
    release(device)
    del trainers
    return list(rows.values())


def summarize(rows: list[dict]) -> dict:
    """Per model: GFlowGR-TB (random sampler) and with the CM curriculum, step time over SFT's, from the
    medians and (``*_min`` keys: the least disturbed steps, the better estimate on a loaded machine) from
    the fastest steps."""
    out: dict = {}
    for stat, suffix in (("step_ms", ""), ("min_ms", "_min")):
        by = {(r["model"], r["method"]): r.get(stat) for r in rows}
        for method, key in (("gflowgr_tb_random", "gflowgr_over_sft_step_time"),
                            ("gflowgr_tb_cm_curriculum", "cm_curriculum_over_sft_step_time")):
            ratios = out.setdefault(key + suffix, {})
            for model in dict.fromkeys(r["model"] for r in rows):
                sft, other = by.get((model, "sft")), by.get((model, method))
                ratios[model] = other / sft if sft and other else None
    return out


def epoch_tokens(trainer, order: torch.Tensor, batch: int, trajectories: int) -> dict:
    """Tokens one epoch feeds the LM in each layout: ``processed`` (padding included) and ``real``."""
    policy = trainer.policy
    L = policy.num_levels
    n_fixed = policy.prompt_prefix.numel() + policy.prompt_suffix.numel()
    out = {"packed_processed": 0, "packed_real": 0, "per_prefix_processed": 0, "per_prefix_real": 0}
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        b = trainer.batch(rows)
        n = (b.history >= 0).sum(1)
        out["per_prefix_processed"] += int(len(rows) * (2 + n_fixed + L * int(n.max()))
                                           + len(rows) * trajectories * (L - 1))
        out["per_prefix_real"] += int((2 + n_fixed + L * n).sum() + len(rows) * trajectories * (L - 1))
        codes = policy.item_codes[b.positive].unsqueeze(1).expand(-1, trajectories, -1)
        lay = policy.packed_layout(b.history, codes, b.window, row_tokens=trainer.cfg.pack_row_tokens)
        out["packed_processed"] += lay.input_ids.numel()
        out["packed_real"] += lay.tokens
    return out


def device_sync(device: str) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA); a no-op on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)


def timed_step(trainer, rows: torch.Tensor, sync: Callable[[], None]) -> float:
    """Seconds of one ``trainer.train_step(rows)``."""
    sync()
    start = time.perf_counter()
    trainer.train_step(rows)
    sync()
    return time.perf_counter() - start


def interleaved_steps(trainers: dict, orders: dict, batch: int, steps: int, n_steps: int, budget_s: float,
                      what: str, sync: Callable[[], None], beside=None) -> dict:
    """``n_steps`` packed steps (``trainers[True]`` on ``orders[True]``), each followed by a per-prefix step
    (``trainers[False]`` on ``orders[False]``) while its ``budget_s`` lasts, and by a step of ``beside`` on the
    packed step's batch (timed under ``"beside"``) when given: every ratio is measured under one load."""
    times = {True: [], False: [], "beside": []}
    for i in range(n_steps):
        lo = (i % steps) * batch
        times[True].append(timed_step(trainers[True], orders[True][lo:lo + batch], sync))
        if beside is not None:
            times["beside"].append(timed_step(beside, orders[True][lo:lo + batch], sync))
        if sum(times[False]) < budget_s:
            times[False].append(timed_step(trainers[False], orders[False][lo:lo + batch], sync))
        if i % 10 == 0:
            last = f"{times[False][-1]:.2f} s" if times[False] else "none"
            log(f"{what} step {i + 1}/{n_steps}: packed {times[True][-1]:.2f} s, per-prefix {last} "
                f"({len(times[False])} measured)")
    return times


def epoch_row(method: str, times: list[float], packing: bool, batch: int, steps: int, tokens: dict) -> dict:
    """One table row: the epoch's seconds (summed over a whole epoch, else the mean step scaled to it)."""
    whole = len(times) >= steps
    mean = statistics.mean(times)
    kind = "packed" if packing else "per_prefix"
    return {"method": method, "packing": packing, "batch": batch, "steps_per_epoch": steps,
            "steps_measured": len(times), "whole_epoch": whole,
            "epoch_s": sum(times) if whole else mean * steps, "mean_step_s": mean,
            "median_step_s": statistics.median(times),
            "tokens_processed_per_epoch": tokens[f"{kind}_processed"], "tokens_real_per_epoch": tokens[f"{kind}_real"]}


# Evaluation variants: the reference is the path before length batching and the beam tree (unsorted batches,
# the prompt cache copied into every beam).
EVAL_VARIANTS = (("reference", False, False), ("sorted", True, False), ("sorted_tree", True, True))


def bench_evaluation(policy, trie, history: torch.Tensor, sync: Callable[[], None], repeats: int = 2) -> list[dict]:
    """Beam 20 over the same users for every :data:`EVAL_VARIANTS` entry, ``repeats`` rounds round-robin (a
    change in machine load touches all variants alike), after one untimed warm-up call."""
    from gflowgr_core.decoding.search import beam_search

    policy.eval()
    with torch.no_grad():
        beam_search(policy, trie, history[:8], beams=20, topk=20)
    seconds = {name: [] for name, _, _ in EVAL_VARIANTS}
    for _ in range(repeats):
        for name, sort, shared in EVAL_VARIANTS:
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                beam_search(policy, trie, history, beams=20, topk=20, batch_size=256, sort_by_length=sort,
                            shared_prompt=shared)
            sync()
            seconds[name].append(time.perf_counter() - start)
            log(f"evaluation {name}: {len(history) / seconds[name][-1]:.1f} users/s")
    return [{"variant": name, "sort_by_length": sort, "shared_prompt": shared, "users": len(history), "beams": 20,
             "batch_size": 256, "repeats": repeats, "seconds": sum(seconds[name]),
             "users_per_s": len(history) * repeats / sum(seconds[name])} for name, sort, shared in EVAL_VARIANTS]


def epoch_summary(rows: list[dict], gfn_times: dict, evals: list[dict], tokens: dict) -> dict:
    by = {(r["method"], r["packing"]): r for r in rows}
    ev = {e["variant"]: e for e in evals}
    return {
        "sft_epoch_speedup_packed_vs_per_prefix": by[("sft", False)]["epoch_s"] / by[("sft", True)]["epoch_s"],
        # GFlowGR-TB over SFT from steps interleaved on the same batches: the two phases' epoch_s were timed
        # at different moments, so their ratio would mostly measure a change in machine load.
        "gflowgr_tb_step_over_packed_sft_step_interleaved": (statistics.median(gfn_times[True])
                                                             / statistics.median(gfn_times["beside"])),
        "eval_speedup_sorted_tree_vs_reference": ev["sorted_tree"]["users_per_s"] / ev["reference"]["users_per_s"],
        "eval_speedup_sorted_vs_reference": ev["sorted"]["users_per_s"] / ev["reference"]["users_per_s"],
        "sft_tokens_ratio_per_prefix_over_packed": (tokens["sft"]["per_prefix_processed"]
                                                    / tokens["sft"]["packed_processed"]),
    }


def bench_epoch(data_dir: Path, data: PreparedData, batch: int, gflowgr_steps: int, per_prefix_minutes: float,
                eval_users: int, device: str, dtype: str, work: Path, sft_steps: Optional[int] = None,
                gflowgr_per_prefix_minutes: Optional[float] = None) -> dict:
    """Packed vs per-prefix training and evaluation against its reference path, in one run."""
    from gflowgr_core.data.windows import window_order
    from gflowgr_core.train.checkpoint import save_policy

    model = MODELS["qwen2_1.3M"]
    sync = device_sync(device)

    def trainer(method: str, packing: bool, init: Optional[Path]):
        return make_trainer(data_dir, data, model, method, batch, device, dtype, work / f"{method}_{packing}", init,
                            [f"packing={str(packing).lower()}"])

    sft = {True: trainer("sft", True, None), False: trainer("sft", False, None)}
    init = save_policy(sft[True].policy, work / "init")
    order = window_order(sft[True].train_index, sft[True].windows, torch.Generator().manual_seed(0))
    orders = {True: order,
              False: sft[False].train_index[torch.randperm(len(order), generator=torch.Generator().manual_seed(0))]}
    steps = math.ceil(len(order) / batch)
    tokens = {"sft": epoch_tokens(sft[True], order, batch, 1), "gflowgr": epoch_tokens(sft[True], order, batch, 1 + 3)}
    log(f"tokens per epoch: {tokens}")

    for t in sft.values():  # one untimed warm-up step each (allocator, kernels)
        t.train_step(order[:batch])
    sft_times = interleaved_steps(sft, orders, batch, steps, steps if sft_steps is None else min(sft_steps, steps),
                                  per_prefix_minutes * 60, "sft", sync)
    gfn = {p: trainer("gflowgr_tb_cm_curriculum", p, init) for p in (True, False)}
    for t in gfn.values():
        t.train_step(order[:batch])
    gfn_budget = per_prefix_minutes / 4 if gflowgr_per_prefix_minutes is None else gflowgr_per_prefix_minutes
    gfn_times = interleaved_steps(gfn, orders, batch, steps, gflowgr_steps, gfn_budget * 60,
                                  "gflowgr_tb_cm_curriculum", sync, beside=sft[True])
    rows = [epoch_row("sft", sft_times[p], p, batch, steps, tokens["sft"]) for p in (True, False)]
    rows += [epoch_row("gflowgr_tb_cm_curriculum", gfn_times[p], p, batch, steps, tokens["gflowgr"])
             for p in (True, False)]

    valid = data.split.valid
    users = torch.randperm(len(valid), generator=torch.Generator().manual_seed(0))[:eval_users]
    evals = bench_evaluation(sft[True].policy, sft[True].trie, valid.history[users].to(device), sync)
    return {"rows": rows, "eval": evals, "tokens": tokens, "summary": epoch_summary(rows, gfn_times, evals, tokens),
            "model": "qwen2_1.3M", "model_config": model, "row_tokens": sft[True].cfg.pack_row_tokens,
            "pack_sparse": sft[True].cfg.pack_sparse}


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized batches and few repetitions")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--data", default=None, help="a prepared dataset folder (default: Beauty, prepared here)")
    p.add_argument("--work", default=None, help="scratch folder for prepared data and checkpoints")
    p.add_argument("--out", default=None, help="JSON path (default: results/train_step[_quick].json)")
    p.add_argument("--epoch", action="store_true", help="packed vs per-prefix epochs and evaluation (see above)")
    p.add_argument("--gflowgr-steps", type=int, default=30, help="--epoch: GFlowGR-TB steps scaled to an epoch")
    p.add_argument("--per-prefix-minutes", type=float, default=120.0,
                   help="--epoch: time budget of the per-prefix SFT steps")
    p.add_argument("--gflowgr-per-prefix-minutes", type=float, default=None,
                   help="--epoch: time budget of the per-prefix GFlowGR-TB steps (default: a quarter of "
                        "--per-prefix-minutes)")
    p.add_argument("--eval-users", type=int, default=2000, help="--epoch: validation users decoded")
    p.add_argument("--sft-steps", type=int, default=None,
                   help="--epoch: packed SFT steps to time (default: the whole epoch); fewer are scaled to it")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if args.epoch:
        return main_epoch(args, device, dtype)
    sizes = QUICK if args.quick else FULL
    load_start = os.getloadavg()[0]
    env = environment(device)  # before the run: the commit and tree it measures
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        data_dir, data, data_label = load_data(args.data, work, args.quick)
        rows = []
        for name in args.models:
            batch, warmup, reps = sizes[name]
            rows += bench_model(name, data_dir, data, batch, warmup, reps, device, dtype, work / "runs")
    # Other processes on a shared CPU slow every step; the 1-minute load average tells how much.
    load = {"start": load_start, "end": os.getloadavg()[0], "logical_cores": os.cpu_count()}
    payload = {**env, "device_kind": torch.device(device).type, "quick": args.quick, "data": data_label,
               "load_average_1m": load, "cpu_memory_retained": cpu_memory_retained(),
               "notes": ("CPU figures (small batches, float32): a check of the script and a rough ratio, not the "
                         "GPU numbers." if torch.device(device).type == "cpu" else
                         "GPU, bf16 autocast."),
               "rows": rows, "summary": summarize(rows)}
    out = Path(args.out) if args.out else RESULTS_DIR / ("train_step_quick.json" if args.quick else "train_step.json")
    write_json(out, payload)
    print(f"{env['device']}; {data_label}")
    print(format_table(rows, ["model", "params", "method", "batch", "dtype", "step_ms", "min_ms", "examples_per_s"]))
    print(f"1-minute load average: {load['start']:.1f} at start, {load['end']:.1f} at end "
          f"({load['logical_cores']} logical cores)")
    print(f"GFlowGR-TB / SFT step time: {payload['summary']}")
    print(f"wrote {out}")
    return payload


def main_epoch(args, device: str, dtype: str) -> dict:
    load_start = os.getloadavg()[0]
    env = environment(device)  # before the run: the commit and tree it measures
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        data_dir, data, data_label = load_data(args.data, work, args.quick)
        result = bench_epoch(data_dir, data, 1024, args.gflowgr_steps, args.per_prefix_minutes, args.eval_users,
                             device, dtype, work / "runs", sft_steps=args.sft_steps,
                             gflowgr_per_prefix_minutes=args.gflowgr_per_prefix_minutes)
    load = {"start": load_start, "end": os.getloadavg()[0], "logical_cores": os.cpu_count()}
    payload = {**env, "device_kind": torch.device(device).type, "dtype": dtype, "data": data_label,
               "num_train_examples": len(data.split.train), "load_average_1m": load,
               "cpu_memory_retained": cpu_memory_retained(), **result}
    kind = torch.device(device).type
    out = Path(args.out) if args.out else RESULTS_DIR / f"train_epoch_{kind}{'_quick' if args.quick else ''}.json"
    write_json(out, payload)
    print(f"{env['device']}; {data_label}; {dtype}")
    print(format_table(result["rows"], ["method", "packing", "batch", "steps_measured", "whole_epoch", "epoch_s",
                                        "median_step_s", "tokens_processed_per_epoch"]))
    print(format_table(result["eval"], ["variant", "sort_by_length", "shared_prompt", "users", "beams", "users_per_s"]))
    print(f"summary: {result['summary']}")
    print(f"1-minute load average: {load['start']:.1f} at start, {load['end']:.1f} at end")
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
