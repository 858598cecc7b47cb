"""SASRec on a prepared dataset (full Beauty by default): valid/test Recall@10 / NDCG@10 and wall time.

One run per call, merged into the results file under its ``--label``, so two implementations are compared
run by run on the same machine (one at a time, never concurrently). ``--reference-module`` trains with
another copy of ``gflowgr_core/collaborative.py`` (e.g. the one of an earlier commit, written with
``git show <commit>:gflowgr_core/collaborative.py > FILE``) instead of the installed one; ``--commit``
then records that commit.

    gflowgr prepare --format letter --path ../shared/data/letter/Beauty --out /tmp/beauty_prep
    python benchmarks/bench_sasrec_beauty.py --data /tmp/beauty_prep --label whole_sequence
    python benchmarks/bench_sasrec_beauty.py --data /tmp/beauty_prep --label per_prefix \\
        --reference-module /tmp/collaborative_old.py --commit 137460e

Writes ``benchmarks/results/sasrec_beauty_cpu.json`` (``--out`` to change it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, log, write_json  # noqa: E402

from gflowgr_core.data.prepared import PreparedData  # noqa: E402

SHOWN = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def load_module(path: str | None):
    if path is None:
        from gflowgr_core import collaborative
        return collaborative
    spec = importlib.util.spec_from_file_location("collaborative_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="prepared dataset folder (gflowgr prepare)")
    parser.add_argument("--label", required=True, help="name of this run in the results file")
    parser.add_argument("--reference-module", help="train with this copy of collaborative.py")
    parser.add_argument("--commit", help="commit the reference module was taken from")
    parser.add_argument("--out", default=str(RESULTS_DIR / "sasrec_beauty_cpu.json"))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="SASRecConfig overrides, e.g. max_epochs=2 (default config otherwise)")
    args = parser.parse_args()

    module = load_module(args.reference_module)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    config = module.SASRecConfig(**{"device": "cpu", "progress": False, "verbose": True, **overrides})
    data = PreparedData.load(args.data)
    split = data.split
    sizes = {**split.stats(), "threads": torch.get_num_threads()}
    if hasattr(module, "whole_sequence_rows"):
        rows = module.whole_sequence_rows(split.train)
        sizes["train_rows"] = int(rows.history.shape[0])
        sizes["train_targets"] = int((rows.labels >= 0).sum())
    else:
        sizes["train_rows"] = sizes["train_targets"] = len(split.train)
    log(f"{args.label}: {sizes}")

    header = environment("cpu")  # taken before the run: the commit and load it started with
    load_before = os.getloadavg()
    started = time.perf_counter()
    model = module.train_sasrec(split, config)
    wall = time.perf_counter() - started
    report = model.train_report
    run = {
        "label": args.label,
        "implementation": args.reference_module or "gflowgr_core.collaborative (installed)",
        "commit": args.commit or header["versions"]["git_commit"],
        "sizes": sizes,
        "config": report["config"],
        "best_epoch": report["best_epoch"],
        "epochs_run": report["epochs_run"],
        "wall_seconds": wall,
        "seconds_per_epoch": wall / max(report["epochs_run"], 1),
        "load_average_1_5_15min_before": list(load_before),
        "load_average_1_5_15min_after": list(os.getloadavg()),
        "valid": {k: report["valid"][k] for k in SHOWN if k in report["valid"]},
        "test": {k: report["test"][k] for k in SHOWN if k in report["test"]},
        "epochs": [{k: v for k, v in e.items() if k in ("epoch", "train_loss", "seconds", "valid_recall@10",
                                                        "valid_ndcg@10")} for e in report["epochs"]],
    }
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.exists() else {}
    payload.update({
        "benchmark": "sasrec_beauty",
        "data": str(args.data),
        "what": "SASRec trained with the given SASRecConfig (defaults unless 'config' says otherwise) on the "
                "leave-one-out split; full-catalogue ranking, nothing excluded; best-validation-epoch weights",
        **header,
    })
    payload.setdefault("runs", {})[args.label] = run
    write_json(out, payload)
    log(f"{args.label}: valid {run['valid']}  test {run['test']}  {wall:.0f} s, {report['epochs_run']} epochs "
        f"-> {out}")


if __name__ == "__main__":
    main()
