"""Validation-only tuning of GFlowGR-TB at the demo's budget (MovieLens-100K, CPU).

Every run starts from the demo's best SFT checkpoint and has the demo's stage-2 budget (one epoch over the
same seeded 8,000 training examples in the same batches). Round 1 changes one setting at a time around the
demo's ``gflowgr_tb`` settings (lambda_gfn, reward exponent, n_aug, curriculum range, flow learning rate,
flow warm-up, r_pos on the catalogue's scale); round 2 combines, for each setting whose change raised the
validation NDCG@10, its best value. ``sft`` (the checkpoint itself) and ``sft_continue`` (the same extra
steps of cross-entropy) are the references. Each run is scored on the whole validation split (943 users,
beam 20) under both scorings; the test split is never read (``evaluate_test=false``).

    python benchmarks/tune_demo.py                # reuses runs/demo's data and SFT checkpoint when present
    python benchmarks/report.py                   # renders the table into docs/reproduce.md

Writes ``benchmarks/results/tune_demo_cpu.json`` after every run; a rerun skips runs already recorded with
the same overrides (delete the file to start over).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from gflowgr_core.demo import METHODS, _prepared, demo_configs, stage2_config  # noqa: E402
from gflowgr_core.train.checkpoint import is_complete  # noqa: E402
from gflowgr_core.train.config import load_config  # noqa: E402
from gflowgr_core.train.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SELECT = "ndcg@10"  # the trainer's select_metric, headline scoring
# Round 1: one factor at a time, each a list of (label, overrides) tried beside the demo's settings.
FACTORS: dict[str, list[dict]] = {
    "lambda_gfn": [{"gfn.lambda_gfn": 0.3}, {"gfn.lambda_gfn": 0.1}],
    "reward exponent": [{"gfn.reward.beta": 0.5}, {"gfn.reward.beta": 2.0}],
    "n_aug": [{"gfn.n_aug": 1}, {"gfn.n_aug": 7}],
    "curriculum range": [{"gfn.curriculum_start": 0.5, "gfn.curriculum_end": 0.9},
                         {"gfn.curriculum_start": 0.1, "gfn.curriculum_end": 0.5}],
    "flow lr": [{"gfn.flow_lr": 1e-3}, {"gfn.flow_lr": 3e-2}],
    "flow warm-up": [{"gfn.flow_warmup_steps": 0}, {"gfn.flow_warmup_steps": 30}],
    "r_pos": [{"gfn.reward.r_pos_mode": "catalogue", "gfn.reward.target_share": 0.1},
              {"gfn.reward.r_pos_mode": "catalogue", "gfn.reward.target_share": 0.5}],
}
REPORTED = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10")
log = logging.getLogger("gflowgr")


def label(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "demo settings"


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": "tune_demo", "what": __doc__.strip().splitlines()[0], "select_metric": SELECT,
            "runs": []}


def save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def valid_metrics(metrics: dict) -> dict:
    keys = [p + m for p in ("", "renorm/") for m in REPORTED]
    return {k: float(metrics[k]) for k in keys}


def ensure_sft(work: Path, device: str):
    """The demo's prepared data and configs in ``work``, whose best SFT checkpoint must exist."""
    data = _prepared(work / "data", quick=False)
    configs = demo_configs(work, device=device)
    if not is_complete(Path(configs["sft"].out) / "best"):
        raise SystemExit(f"{Path(configs['sft'].out) / 'best'} is missing: run `gflowgr demo --out {work}` first "
                         f"(its SFT run is the starting point of every tuning run)")
    return data, configs


def tuning_config(work: Path, device: str, stage: str, overrides: dict, out: Path):
    """The demo's stage-2 config of ``stage`` with ``overrides``: whole validation split, test never read."""
    return stage2_config(work, stage, device=device, run_dir=out,
                         extra={**overrides, "valid_max_users": None, "evaluate_test": False})


def run(cfg, data) -> tuple[dict, float, dict]:
    start = time.perf_counter()
    trainer = Trainer(cfg, data)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if result["status"] != "finished":
        raise SystemExit(f"run {cfg.out} did not finish: {result.get('message')}")
    best = max(result["history"], key=lambda r: r["valid"][SELECT])
    last_log = {}
    log_path = Path(cfg.out) / "log.jsonl"
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec or "train_loss" in rec:
            last_log = rec
    return valid_metrics(best["valid"]), time.perf_counter() - start, last_log


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/demo", help="the demo's folder (data and sft/best are reused)")
    p.add_argument("--out", default=str(RESULTS / "tune_demo_cpu.json"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work, out = Path(args.work), Path(args.out)
    data, configs = ensure_sft(work, args.device)
    payload = load_results(out)
    payload.update(environment(args.device))
    payload["sizes"] = {"dataset": "MovieLens-100K", "valid_users": int(data.stats["num_valid"]),
                        "stage2_train_examples": configs["gflowgr_tb"].max_train_examples,
                        "stage2_epochs": configs["gflowgr_tb"].epochs, "batch_size": configs["gflowgr_tb"].batch_size,
                        "beams": configs["gflowgr_tb"].eval_beams, "start": str(Path(configs["sft"].out) / "best")}
    payload["demo_gflowgr_tb"] = METHODS["gflowgr_tb"]
    tmp = work / "tune"
    done = {(r["stage"], json.dumps(r["overrides"], sort_keys=True)) for r in payload["runs"]}

    def record(round_: str, factor: str, stage: str, overrides: dict) -> dict:
        key = (stage, json.dumps(overrides, sort_keys=True))
        if key in done:
            return next(r for r in payload["runs"] if (r["stage"], json.dumps(r["overrides"], sort_keys=True)) == key)
        name = f"{stage}_{len(payload['runs']):02d}"
        cfg = tuning_config(work, args.device, stage, overrides, tmp / name)
        metrics, seconds, last = run(cfg, data)
        row = {"round": round_, "factor": factor, "stage": stage, "overrides": overrides, "setting": label(overrides),
               "valid": metrics, "seconds": round(seconds, 1),
               "last_log": {k: v for k, v in last.items() if k in ("ce", "gfn", "log_z", "tb_residual") or "share" in k}}
        payload["runs"].append(row)
        done.add(key)
        save(out, payload)
        print(f"{stage:<13} {label(overrides):<60} valid {SELECT} {metrics[SELECT]:.4f}  "
              f"renorm/{SELECT} {metrics['renorm/' + SELECT]:.4f}  ({seconds:.0f} s)", flush=True)
        return row

    if not any(r["stage"] == "sft" for r in payload["runs"]):
        cfg = tuning_config(work, args.device, "sft_continue", {}, tmp / "sft_eval")
        trainer = Trainer(cfg, data)
        metrics = valid_metrics(trainer.evaluate("valid"))
        trainer.close()
        payload["runs"].append({"round": "reference", "factor": "-", "stage": "sft", "overrides": {},
                                "setting": "the SFT checkpoint, no stage 2", "valid": metrics, "seconds": 0.0})
        save(out, payload)
    record("reference", "-", "sft_continue", {})
    base = record("reference", "-", "gflowgr_tb", {})
    best_per_factor = {}
    for factor, variants in FACTORS.items():
        rows = [record("1", factor, "gflowgr_tb", v) for v in variants]
        top = max(rows, key=lambda r: r["valid"][SELECT])
        if top["valid"][SELECT] > base["valid"][SELECT]:
            best_per_factor[factor] = top["overrides"]
    combined = {}
    for overrides in best_per_factor.values():
        combined.update(overrides)
    if len(best_per_factor) > 1:
        record("2", "+".join(best_per_factor), "gflowgr_tb", combined)
    save(out, payload)
    return payload


if __name__ == "__main__":
    main()
