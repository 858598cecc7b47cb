"""Does the packed epoch order change what SFT learns? ``batch_order: windows`` against ``shuffled``.

Each packed batch equals the per-prefix one (``tests/test_packing.py``), but the default order does not:
``windows`` keeps each trunk window's examples together, so a batch of 1,024 Beauty examples holds whole
windows of a few hundred users, where ``shuffled`` (the per-prefix path's order) draws 1,024 examples
uniformly. This script trains SFT with both orders from the same seeds, under the same budget of epochs, on
the same validation subset, and reports validation NDCG@10 per epoch and the test metrics of each best
validation checkpoint.

    gflowgr prepare --format letter --path ../shared/data/letter/Beauty --out /tmp/beauty_prep
    nohup python benchmarks/bench_batch_order.py --data /tmp/beauty_prep > batch_order.log 2>&1 &

Runs go in order of ``--seeds`` (each seed: every order), so an interrupted grid still pairs its orders.
Finished runs (``WORK/ORDER/seedS/result.json``) are read back on a rerun, and an interrupted one resumes from
its ``last/`` checkpoint. The JSON is rewritten after every run (``"complete": false`` until the last).
Writes ``benchmarks/results/batch_order_cpu.json`` (``--quick``: a tiny model on 300 users,
``batch_order_quick.json``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS_DIR, environment, format_table, log, write_json  # noqa: E402

ORDERS = ("windows", "shuffled")
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
QUICK_MODEL = ["model.hidden=32", "model.layers=2", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
               "model.flow_hidden=16"]


def shared_beauty() -> Path:
    return HERE.parent.parent / "shared" / "data" / "letter" / "Beauty"


def prepared_data(data: Optional[str], work: Path, quick: bool):
    """The prepared folder and its data: ``--data``, else Beauty prepared from the shared folder."""
    from gflowgr_core.data.prepared import PreparedData, prepare

    if data and not quick:
        return Path(data), PreparedData.load(data)
    out = work / ("beauty_quick" if quick else "beauty")
    if (out / "stats.json").exists():
        return out, PreparedData.load(out)
    source = shared_beauty()
    if not (source / "Beauty.inter.json").exists():
        raise SystemExit(f"no prepared data: pass --data, or provide {source}")
    return out, prepare("letter", source, out, max_users=300 if quick else None)


def run_overrides(args, data_dir: Path, order: str, seed: int, out: Path) -> list[str]:
    """Config overrides of one run: the SFT YAML's model and optimiser, this script's budget and order."""
    overrides = [f"data={data_dir}", f"out={out}", f"seed={seed}", f"batch_order={order}", "device=cpu",
                 f"epochs={args.epochs}", "max_steps=null", "eval_every=1", f"patience={args.epochs + 1}",
                 f"valid_max_users={args.valid_users}", f"warmup_steps={args.warmup_steps}",
                 f"batch_size={args.batch_size}", "log_every=1000"]
    if args.quick:
        overrides += QUICK_MODEL
    return overrides + list(args.set)


def train_one(args, data_dir: Path, data, order: str, seed: int) -> dict:
    """Train one run (or read its result back) and return its row."""
    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import Trainer

    out = args.work / order / f"seed{seed}"
    result_path = out / "result.json"
    overrides = run_overrides(args, data_dir, order, seed, out)
    if result_path.exists():
        log(f"{order} seed {seed}: finished earlier, reading {result_path}")
        result = json.loads(result_path.read_text())
    else:
        resume = (out / "last").exists()
        log(f"{order} seed {seed}: training{' (resuming from last/)' if resume else ''}")
        cfg = load_config(args.config, overrides + [f"resume={str(resume).lower()}"])
        result = Trainer(cfg, data).fit()
        if result["status"] != "finished":
            raise SystemExit(f"{order} seed {seed} stopped ({result['status']}); rerun to resume it")
    valid = [round(float(h["valid"][args.select]), 6) for h in result["history"]]
    return {"order": order, "seed": seed, "epochs": result["epochs"], "steps": result["steps"],
            "best_epoch": result["best_epoch"], "best_valid": result["best_valid"],
            "seconds_per_epoch": result["seconds_per_epoch"], f"valid_{args.select}_per_epoch": valid,
            "train_loss_per_epoch": [round(float(h["train_loss"]), 6) for h in result["history"]],
            "test": {m: result["test"][m] for m in METRICS}, "overrides": overrides}


def summarize(rows: Sequence[dict]) -> dict:
    """Mean test metrics per order, the shuffled - windows gap, and the spread between seeds of one order."""
    out = {}
    for order in ORDERS:
        mine = [r for r in rows if r["order"] == order]
        if not mine:
            continue
        out[order] = {"seeds": [r["seed"] for r in mine],
                      **{m: statistics.mean(r["test"][m] for r in mine) for m in METRICS},
                      "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in mine)}
        if len(mine) > 1:
            out[order]["seed_range"] = {m: max(r["test"][m] for r in mine) - min(r["test"][m] for r in mine)
                                        for m in METRICS}
    if all(o in out for o in ORDERS):
        paired = sorted({r["seed"] for r in rows if r["order"] == "windows"}
                        & {r["seed"] for r in rows if r["order"] == "shuffled"})
        test = {(r["order"], r["seed"]): r["test"] for r in rows}
        out["paired_seeds"] = paired
        out["windows_minus_shuffled"] = {
            m: statistics.mean(test["windows", s][m] - test["shuffled", s][m] for s in paired) for m in METRICS}
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="prepared folder (gflowgr prepare); default: Beauty from ../shared")
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "beauty" / "sft.yaml"),
                    help="SFT config whose model and optimiser the runs use")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every run (no early stopping)")
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--valid-users", type=int, default=None, help="fixed seeded validation subset")
    ap.add_argument("--select", default="ndcg@10", help="validation metric that picks each run's best epoch")
    ap.add_argument("--work", type=Path, default=None, help="run folders (default runs/batch_order[_quick])")
    ap.add_argument("--quick", action="store_true", help="pipeline check: tiny model, 300 users, 2 epochs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = ap.parse_args(argv)
    full, quick = {"seeds": [42, 43], "epochs": 6, "warmup_steps": 100, "valid_users": 5000}, \
        {"seeds": [42], "epochs": 2, "warmup_steps": 2, "valid_users": 50}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.batch_size == 1024:
        args.batch_size = 64
    args.work = args.work or Path("runs") / ("batch_order_quick" if args.quick else "batch_order")
    args.out = args.out or RESULTS_DIR / ("batch_order_quick.json" if args.quick else "batch_order_cpu.json")

    data_dir, data = prepared_data(args.data, args.work, args.quick)
    env = environment("cpu")
    plan = [(order, seed) for seed in args.seeds for order in args.orders]
    rows: list[dict] = []
    payload: dict = {}
    for i, (order, seed) in enumerate(plan):
        rows.append(train_one(args, data_dir, data, order, seed))
        payload = {**env, "data": str(data_dir), "num_train_examples": int(len(data.split.train.user)),
                   "config": args.config, "epochs": args.epochs, "batch_size": args.batch_size,
                   "valid_users": args.valid_users, "select_metric": args.select,
                   "complete": i == len(plan) - 1, "runs": rows, "summary": summarize(rows)}
        write_json(args.out, payload)
    table = [{"order": r["order"], "seed": r["seed"], "best_epoch": r["best_epoch"],
              "best_valid": r["best_valid"], **r["test"], "s/epoch": r["seconds_per_epoch"]} for r in rows]
    print(format_table(table, ["order", "seed", "best_epoch", "best_valid", *METRICS, "s/epoch"]))
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
