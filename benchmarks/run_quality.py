"""Reproduction grid: train every method on a dataset over seeds 42/43/44 and aggregate the test metrics.

Runs live under a root folder (default ``runs/``)::

    <root>/data/<dataset>/               prepared data (``gflowgr prepare``; created here when missing)
    <root>/<dataset>/<method>/seed<S>/   one training run; finished when its result.json exists
    <root>/<dataset>/ablations/<name>/seed42/

Every run is ``configs/<dataset>/<method>.yaml`` with ``data``, ``out``, ``seed`` and (stage 2)
``init_checkpoint = <root>/<dataset>/sft/seed<S>/best`` overridden, so all stage-2 methods of a seed start
from that seed's SFT checkpoint. Finished runs are skipped, so the grid can be run in chunks
(``--max-minutes``: no new run starts once the budget is spent; a started run finishes). A run folder
without result.json (an interrupted run) is removed and trained again.

The aggregate ``benchmarks/results/quality_<dataset>.json`` holds ``device``, ``versions``, ``seeds``,
``epochs`` and ``steps`` (per method, per finished seed), and ``methods``: each method's ``recall@5``,
``recall@10``, ``ndcg@5``, ``ndcg@10``, ``coverage@10``, ``tail_share@10``, ``mean_pop@10`` and
``train_seconds`` as ``{"mean", "std"}`` over its finished seeds (sample std; 0 for one seed), with
``seeds_done``. For Beauty the table prints the paper's numbers (METHOD.md §6) beside ours, and gains over
SFT for both. ``--ablations`` runs the Beauty ablations (one seed) into ``ablations_beauty.json``.

    python benchmarks/run_quality.py --dataset beauty --dry-run          # what would run
    python benchmarks/run_quality.py --dataset beauty --max-minutes 120  # a chunk of the grid
    python benchmarks/run_quality.py --dataset beauty --ablations
    python benchmarks/run_quality.py --dataset beauty --quick            # CPU end-to-end check (minutes)

``--quick`` trains a tiny model for a few steps on the first 300 users, one seed, under
``<root>/quick`` and writes ``quality_<dataset>_quick.json``: it checks the script, not the method.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import gflowgr_core  # noqa: F401
except ImportError:  # a source checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from common import RESULTS_DIR, environment, format_table, log  # noqa: E402

CONFIGS = REPO / "configs"
DATASETS = ("beauty", "sports", "toys")
METHODS = ("sft", "sft_continue", "dpo", "sdpo", "gflowgr_tb", "gflowgr_db", "gflowgr_subtb")
SEEDS = (42, 43, 44)
METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10", "tail_share@10", "mean_pop@10")
TABLE_METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10", "tail_share@10")
PAPER_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")

# Amazon Beauty, LETTER SIDs (METHOD.md §6): the paper's table, R@5 / R@10 / N@5 / N@10.
PAPER_BEAUTY = {
    "sft": {"recall@5": 0.0344, "recall@10": 0.0540, "ndcg@5": 0.0227, "ndcg@10": 0.0290},
    "sdpo": {"recall@5": 0.0390, "recall@10": 0.0607, "ndcg@5": 0.0259, "ndcg@10": 0.0336},
    "gflowgr_db": {"recall@5": 0.0407, "recall@10": 0.0630, "ndcg@5": 0.0266, "ndcg@10": 0.0337},
    "gflowgr_tb": {"recall@5": 0.0433, "recall@10": 0.0672, "ndcg@5": 0.0286, "ndcg@10": 0.0363},
}
TIGER_BEAUTY = {"recall@5": 0.0454, "recall@10": 0.0648, "ndcg@5": 0.0321, "ndcg@10": 0.0384}

# Beauty ablations (seed 42): name -> (base method, overrides of its YAML). An empty override list is the
# base method's own seed-42 run of the main grid (reused, not trained twice).
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "lambda_gfn=0.1": ("gflowgr_tb", ["gfn.lambda_gfn=0.1"]),
    "lambda_gfn=1": ("gflowgr_tb", []),
    "lambda_gfn=10": ("gflowgr_tb", ["gfn.lambda_gfn=10"]),
    "n_aug=1": ("gflowgr_tb", ["gfn.n_aug=1"]),
    "n_aug=3": ("gflowgr_tb", []),
    "n_aug=5": ("gflowgr_tb", ["gfn.n_aug=5"]),
    "reward-all": ("gflowgr_tb", []),
    "reward-no_r_a": ("gflowgr_tb", ["gfn.reward.use_a=false"]),
    "reward-no_r_cm": ("gflowgr_tb", ["gfn.reward.use_cm=false"]),
    "reward-no_r_sim": ("gflowgr_tb", ["gfn.reward.use_sim=false"]),
    "sampler=cm_curriculum": ("gflowgr_tb", []),
    "sampler=logs": ("gflowgr_tb", ["gfn.sampler=logs"]),
    "sampler=random": ("gflowgr_tb", ["gfn.sampler=random"]),
    "sampler=onpolicy": ("gflowgr_tb", ["gfn.sampler=onpolicy"]),
    "sampler=mixture": ("gflowgr_tb", ["gfn.sampler=mixture"]),
    "support=trie": ("gflowgr_tb", []),
    "support=level": ("gflowgr_tb", ["gfn.policy_support=level"]),
    "support=vocab": ("gflowgr_tb", ["gfn.policy_support=vocab"]),
    "objective=tb": ("gflowgr_tb", []),
    "objective=db": ("gflowgr_db", []),
    "objective=subtb": ("gflowgr_subtb", []),
}
ABLATION_SEED = 42

# --quick: a tiny model, a few steps, 300 users, validation on 50 of them, CPU.
QUICK_USERS = 300
QUICK_OVERRIDES = [
    "model.hidden=32", "model.layers=1", "model.heads=2", "model.kv_heads=2", "model.intermediate=64",
    "model.flow_hidden=32", "device=cpu", "dtype=float32", "batch_size=64", "max_train_examples=640",
    "warmup_steps=2", "eval_every=1", "patience=3", "eval_beams=10", "eval_batch_size=128",
    "valid_max_users=50", "log_every=5",
]
QUICK_SFT = ["max_steps=20"]
QUICK_STAGE2 = ["max_steps=10"]
QUICK_GFN = ["cm.dim=16", "cm.num_blocks=1", "cm.max_epochs=2", "cm.patience=1",
             "gfn.curriculum_pool=20", "gfn.curriculum_random=10"]


def shared_data_dir() -> Path:
    """``$GFLOWGR_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("GFLOWGR_DATA", REPO.parent / "shared" / "data"))


@dataclass
class RunSpec:
    """One training run of the grid.

    Attributes:
        name: method name (or ablation name) shown in tables.
        method: the YAML under ``configs/<dataset>/`` it starts from.
        seed: training seed.
        out: run folder (finished when ``out/result.json`` exists).
        dataset: the dataset folder under ``configs/``.
        overrides: ``key=value`` overrides applied to the YAML, in order.
        needs: run folders whose ``best/`` checkpoint this run starts from.
    """

    name: str
    method: str
    seed: int
    out: Path
    dataset: str
    overrides: list[str] = field(default_factory=list)
    needs: list[Path] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return CONFIGS / self.dataset / f"{self.method}.yaml"

    def done(self) -> bool:
        return (self.out / "result.json").exists()

    def status(self) -> str:
        """``done``, ``stale`` (folder without result.json: retrained) or ``pending``."""
        if self.done():
            return "done"
        return "stale" if self.out.exists() else "pending"

    def command(self) -> str:
        """The equivalent ``gflowgr train`` command line."""
        return " ".join(["gflowgr train --config", str(self.config_path), *self.overrides])


def data_dir(root: Path, dataset: str, quick: bool) -> Path:
    return root / "data" / (f"{dataset}_quick" if quick else dataset)


def _base_overrides(root: Path, dataset: str, method: str, seed: int, out: Path, quick: bool,
                    extra: Sequence[str]) -> list[str]:
    overrides = [f"data={data_dir(root, dataset, quick)}", f"out={out}", f"seed={seed}"]
    if method != "sft":
        overrides.append(f"init_checkpoint={root / dataset / 'sft' / f'seed{seed}' / 'best'}")
    if quick:
        overrides += QUICK_OVERRIDES + (QUICK_SFT if method == "sft" else QUICK_STAGE2)
        if method.startswith("gflowgr"):
            overrides += QUICK_GFN
    return overrides + list(extra)


def plan_grid(dataset: str, methods: Sequence[str], seeds: Sequence[int], root: Path, quick: bool = False,
              extra: Sequence[str] = ()) -> list[RunSpec]:
    """The runs of ``methods`` x ``seeds``, seed-major (a seed's SFT first, then its stage-2 methods), so a
    partly run grid already holds complete seeds. SFT is added for every seed a stage-2 method needs."""
    _check_names(dataset, methods)
    root = Path(root) / "quick" if quick else Path(root)
    wanted = list(dict.fromkeys(["sft", *methods] if any(m != "sft" for m in methods) else methods))
    specs = []
    for seed in seeds:
        for method in wanted:
            out = root / dataset / method / f"seed{seed}"
            needs = [] if method == "sft" else [root / dataset / "sft" / f"seed{seed}"]
            specs.append(RunSpec(name=method, method=method, seed=seed, out=out, dataset=dataset, needs=needs,
                                 overrides=_base_overrides(root, dataset, method, seed, out, quick, extra)))
    return specs


def plan_ablations(dataset: str, root: Path, quick: bool = False, extra: Sequence[str] = (),
                   names: Optional[Sequence[str]] = None) -> list[RunSpec]:
    """The ablation runs (seed 42) after the SFT run they start from; ablations without overrides point at
    the main grid's run of their base method."""
    names = list(names or ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown ablation(s) {unknown}; known: {', '.join(ABLATIONS)}")
    base_methods = list(dict.fromkeys(ABLATIONS[n][0] for n in names if not ABLATIONS[n][1]))
    specs = plan_grid(dataset, ["sft", *base_methods], [ABLATION_SEED], root, quick, extra)
    by_method = {s.method: s for s in specs}
    groot = Path(root) / "quick" if quick else Path(root)
    for name in names:
        method, overrides = ABLATIONS[name]
        if not overrides:
            base = by_method[method]
            specs.append(RunSpec(name=name, method=method, seed=ABLATION_SEED, out=base.out, dataset=dataset,
                                 overrides=base.overrides, needs=base.needs))
            continue
        out = groot / dataset / "ablations" / _slug(name) / f"seed{ABLATION_SEED}"
        specs.append(RunSpec(name=name, method=method, seed=ABLATION_SEED, out=out, dataset=dataset,
                             needs=[groot / dataset / "sft" / f"seed{ABLATION_SEED}"],
                             overrides=_base_overrides(groot, dataset, method, ABLATION_SEED, out, quick,
                                                       [*extra, *overrides])))
    return specs


def _slug(name: str) -> str:
    return name.replace("=", "_").replace(".", "p")


def _check_names(dataset: str, methods: Sequence[str]) -> None:
    if dataset not in DATASETS:
        raise SystemExit(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {METHODS}")


def ensure_data(dataset: str, root: Path, quick: bool = False):
    """Load ``<root>/data/<dataset>`` or prepare it from the shared data (``gflowgr prepare`` settings of
    the dataset's YAML header); ``quick`` keeps the first 300 users (and 32 codes per built level)."""
    from gflowgr_core.data.prepared import PreparedData, prepare

    root = Path(root) / "quick" if quick else Path(root)
    out = data_dir(root, dataset, quick)
    if (out / "stats.json").exists():
        return PreparedData.load(out)
    src = shared_data_dir()
    max_users = QUICK_USERS if quick else None
    if dataset == "beauty":
        path = src / "letter" / "Beauty"
        _require(path / "Beauty.inter.json")
        return prepare("letter", path, out, max_users=max_users)
    path = src / "amazon14" / dataset.capitalize()
    _require(path / "user_sequence.txt")
    return prepare("p5", path, out, levels=3, codes=32 if quick else 256, collisions="suffix", seed=0,
                   max_users=max_users)


def _require(path: Path) -> None:
    if not path.exists():
        raise SystemExit(f"{path} not found: set GFLOWGR_DATA to the folder holding letter/ and amazon14/, "
                         f"or prepare the data yourself into <root>/data/ with `gflowgr prepare`")


def run_specs(specs: Sequence[RunSpec], data=None, max_minutes: Optional[float] = None,
              train_fn: Optional[Callable] = None, device: str = "auto") -> dict:
    """Train the unfinished runs in order, within ``max_minutes`` (no new run starts after it).

    Returns ``{"trained": [...], "skipped": [...], "not_started": [...]}`` (run folders as strings).
    ``train_fn(config, data) -> result`` defaults to :func:`gflowgr_core.train.trainer.run_training`.
    """
    from gflowgr_core.train.config import load_config

    if train_fn is None:
        from gflowgr_core.devices import resolve_device
        from gflowgr_core.train.trainer import run_training
        train_fn = run_training
    else:
        from gflowgr_core.devices import resolve_device
    start = time.time()
    report = {"trained": [], "skipped": [], "not_started": []}
    seen: set[Path] = set()
    for spec in specs:
        if spec.out in seen:  # an ablation that reuses a run of the grid
            continue
        seen.add(spec.out)
        if spec.done():
            report["skipped"].append(str(spec.out))
            continue
        if max_minutes is not None and time.time() - start > 60 * max_minutes:
            report["not_started"].append(str(spec.out))
            continue
        missing = [str(n) for n in spec.needs if not (n / "result.json").exists()]
        if missing:
            report["not_started"].append(str(spec.out))
            log(f"skipping {spec.out}: it starts from {missing}, which did not finish")
            continue
        if spec.out.exists():
            log(f"removing the interrupted run {spec.out} (no result.json) and training it again")
            shutil.rmtree(spec.out)
        config = load_config(spec.config_path, spec.overrides)
        spec.out.mkdir(parents=True, exist_ok=True)
        env = environment(resolve_device(config.device))
        (spec.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        log(f"[{time.time() - start:7.0f}s] training {spec.name} seed {spec.seed} -> {spec.out}")
        train_fn(config, data)
        report["trained"].append(str(spec.out))
    return report


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def aggregate(specs: Sequence[RunSpec], seeds: Sequence[int]) -> dict:
    """Mean and std over the finished seeds of each run name in ``specs`` (test split of each run's best
    checkpoint). Names without a finished run are left out of ``methods`` and listed in ``missing``."""
    results: dict[str, dict[int, dict]] = {}
    devices, versions = set(), None
    for spec in specs:
        results.setdefault(spec.name, {})
        if not spec.done():
            continue
        res = json.loads((spec.out / "result.json").read_text())
        results[spec.name][spec.seed] = res
        env_path = spec.out / "env.json"
        if env_path.exists():
            env = json.loads(env_path.read_text())
            devices.add(env["device"])
            versions = versions or env.get("versions")
        else:
            devices.add(str(res.get("device", "unknown")))
    methods, epochs, steps, missing = {}, {}, {}, []
    for name, per_seed in results.items():
        if not per_seed:
            missing.append(name)
            continue
        done = sorted(per_seed)
        entry = {}
        for metric in METRICS:
            values = [per_seed[s]["test"][metric] for s in done if metric in per_seed[s]["test"]]
            if values:
                entry[metric] = _mean_std(values)
        entry["train_seconds"] = _mean_std([per_seed[s]["train_seconds"] for s in done])
        entry["seeds_done"] = done
        methods[name] = entry
        epochs[name] = [per_seed[s]["epochs"] for s in done]
        steps[name] = [per_seed[s]["steps"] for s in done]
    device = sorted(devices)[0] if len(devices) == 1 else (sorted(devices) or None)
    return {"device": device, "versions": versions, "seeds": list(seeds), "epochs": epochs, "steps": steps,
            "methods": methods, "missing": missing}


def quality_table(agg: dict, paper: Optional[dict] = None) -> str:
    """Our mean ± std per method, with the paper's numbers and both gains over SFT when ``paper`` is given."""
    rows = []
    ours_sft = agg["methods"].get("sft")
    for name, entry in agg["methods"].items():
        row = {"method": name, "seeds": len(entry["seeds_done"])}
        for metric in TABLE_METRICS:
            if metric in entry:
                row[metric] = f"{entry[metric]['mean']:.4f}±{entry[metric]['std']:.4f}"
        if paper is not None:
            p = paper.get(name)
            for metric in ("recall@10", "ndcg@10"):
                row[f"paper {metric}"] = p[metric] if p else None
            if ours_sft is not None and name != "sft":
                gain = entry["ndcg@10"]["mean"] / max(ours_sft["ndcg@10"]["mean"], 1e-12) - 1.0
                row["ours N@10 vs SFT"] = f"{100 * gain:+.1f}%"
            if p is not None and name != "sft":
                row["paper N@10 vs SFT"] = f"{100 * (p['ndcg@10'] / paper['sft']['ndcg@10'] - 1):+.1f}%"
        row["train_s"] = entry["train_seconds"]["mean"]
        rows.append(row)
    columns = ["method", "seeds", *TABLE_METRICS]
    if paper is not None:
        columns += ["paper recall@10", "paper ndcg@10", "ours N@10 vs SFT", "paper N@10 vs SFT"]
    columns.append("train_s")
    return format_table(rows, columns)


def output_path(dataset: str, quick: bool, ablations: bool, results_dir: Path = RESULTS_DIR) -> Path:
    stem = f"{'ablations' if ablations else 'quality'}_{dataset}"
    return Path(results_dir) / f"{stem}{'_quick' if quick else ''}.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="beauty")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--root", default="runs", help="folder of prepared data and runs (default: runs)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; train nothing")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; aggregate finished runs")
    p.add_argument("--ablations", nargs="*", default=None, metavar="NAME",
                   help="run the Beauty ablations (all, or the NAMEs given) instead of the grid")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, few steps, 300 users, one seed, CPU: an end-to-end check of this script")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (after the YAML)")
    return p


def main(argv: Optional[list[str]] = None, train_fn: Optional[Callable] = None) -> dict:
    """Run (a chunk of) the grid and write the aggregate; returns the aggregate dict."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    ablations = args.ablations is not None
    if ablations:
        if args.dataset != "beauty":
            raise SystemExit("the ablations are defined on beauty only")
        specs = plan_ablations(args.dataset, root, args.quick, args.overrides, args.ablations or None)
        seeds = [ABLATION_SEED]
    else:
        specs = plan_grid(args.dataset, args.methods, seeds, root, args.quick, args.overrides)
    if args.dry_run:
        ddir = data_dir(root / "quick" if args.quick else root, args.dataset, args.quick)
        print(f"data: {ddir} ({'ready' if (ddir / 'stats.json').exists() else 'prepared on first run'})")
        print(format_table([{"run": s.name, "seed": s.seed, "status": s.status(), "out": str(s.out)}
                            for s in specs], ["run", "seed", "status", "out"]))
        printed: set[Path] = set()
        for s in specs:
            if s.status() != "done" and s.out not in printed:
                printed.add(s.out)
                print(s.command())
        return {}
    if not args.aggregate_only:
        data = ensure_data(args.dataset, root, args.quick)
        report = run_specs(specs, data, args.max_minutes, train_fn)
        log(f"trained {len(report['trained'])}, skipped (finished) {len(report['skipped'])}, "
            f"not started {len(report['not_started'])}")
    agg = aggregate(specs, seeds)
    agg["quick"] = args.quick
    agg["root"] = str(root)
    paper = PAPER_BEAUTY if args.dataset == "beauty" and not ablations else None
    if paper is not None:
        agg["paper"] = {"gflowgr_paper_letter_sids": PAPER_BEAUTY, "tiger_paper": TIGER_BEAUTY}
    if ablations:
        agg["ablations"] = {name: {"base": ABLATIONS[name][0], "overrides": ABLATIONS[name][1]}
                            for name in agg["methods"]}
    path = output_path(args.dataset, args.quick, ablations, Path(args.results_dir))
    from common import write_json
    write_json(path, agg)
    if agg["methods"]:
        print(f"{args.dataset}: test split, best validation checkpoint, mean±std over finished seeds "
              f"({agg['device']})")
        print(quality_table(agg, paper))
    if agg["missing"]:
        print(f"not finished yet: {', '.join(agg['missing'])}")
    print(f"wrote {path}")
    return agg


if __name__ == "__main__":
    main()
