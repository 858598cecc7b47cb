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

The aggregate ``benchmarks/results/quality_<dataset>.json`` (rewritten after every finished run) holds
``device``, ``versions``, ``seeds``, ``epochs`` and ``steps`` (per method, per finished seed), ``methods``:
each method's test metrics (:data:`METRICS`: the headline scoring, i.e. HF's level log-probs, and the
``renorm/`` scoring renormalised over trie children, with their top-20 agreement) and ``train_seconds``
as ``{"mean", "std"}`` over its finished seeds (sample std; 0 for one seed), with ``seeds_done``;
``runs``: one entry per finished run (epochs, steps, best epoch, train and wall seconds, the validation
curve, the run's whole config); ``reference``: the collaborative model's (SASRec's) own test metrics for
each seed whose runs trained one. A PNG beside it plots validation NDCG@10 per epoch per method and the
final test bars. For Beauty the table prints the paper's numbers (METHOD.md §6) beside ours, and gains over
SFT for both. ``--ablations`` runs the Beauty ablations (one seed) into ``ablations_beauty.json``.

    python benchmarks/run_quality.py --dataset beauty --dry-run          # what would run
    python benchmarks/run_quality.py --dataset beauty --max-minutes 120  # a chunk of the grid
    python benchmarks/run_quality.py --dataset beauty --ablations
    python benchmarks/run_quality.py --dataset beauty --quick            # CPU end-to-end check (minutes)
    python benchmarks/run_quality.py --dataset beauty --data DIR         # raw files from DIR (Beauty: the
                                                                         # folder of Beauty.inter/index.json)

``--sft-from RUN_DIR --resume`` takes a finished run trained with the grid SFT's config and seed (the selected
setting of ``tune_quality.py --stage sft``, which never read test) as the grid's SFT run: it is copied and
resumed, so it only reads test, instead of being trained again.

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
from common import RESULTS_DIR, environment, format_table, log, write_json  # noqa: E402
from quality_records import (RANK_FILES, archive_run, checkpoint_digest, records_root, restore_run,  # noqa: E402
                             run_ranks, saved_sasrec)
from quality_stats import compare_methods, load_ranks, mean_intervals, per_user_metrics, seed_mean  # noqa: E402

CONFIGS = REPO / "configs"
DATASETS = ("beauty", "sports", "toys")
METHODS = ("sft", "sft_continue", "dpo", "sdpo", "gflowgr_tb", "gflowgr_db", "gflowgr_subtb")
SEEDS = (42, 43, 44)
HEADLINE_METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10", "tail_share@10", "mean_pop@10")
# The evaluation's second scoring (log-probs renormalised over trie children) and the agreement of the two.
RENORM_METRICS = ("renorm/recall@5", "renorm/recall@10", "renorm/ndcg@5", "renorm/ndcg@10", "renorm/coverage@10")
METRICS = HEADLINE_METRICS + RENORM_METRICS + ("scoring_agreement@20",)
TABLE_METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10", "tail_share@10",
                 "renorm/recall@10", "renorm/ndcg@10")
CURVE_METRICS = ("ndcg@10", "renorm/ndcg@10")
PAPER_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")

# Amazon Beauty, LETTER SIDs (METHOD.md §6): the paper's table, R@5 / R@10 / N@5 / N@10.
PAPER_BEAUTY = {
    "sft": {"recall@5": 0.0344, "recall@10": 0.0540, "ndcg@5": 0.0227, "ndcg@10": 0.0290},
    "sdpo": {"recall@5": 0.0390, "recall@10": 0.0607, "ndcg@5": 0.0259, "ndcg@10": 0.0336},
    "gflowgr_db": {"recall@5": 0.0407, "recall@10": 0.0630, "ndcg@5": 0.0266, "ndcg@10": 0.0337},
    "gflowgr_tb": {"recall@5": 0.0433, "recall@10": 0.0672, "ndcg@5": 0.0286, "ndcg@10": 0.0363},
}
TIGER_BEAUTY = {"recall@5": 0.0454, "recall@10": 0.0648, "ndcg@5": 0.0321, "ndcg@10": 0.0384}
# Published Recall@10 / NDCG@10 on exactly this split (LETTER's Beauty: 22,363 users, leave-one-out, history 20).
PUBLISHED_BEAUTY = {
    "LETTER-TIGER (LETTER's paper)": {"recall@10": 0.0672, "ndcg@10": 0.0364},
    "TIGER (re-run by HG-Rec)": {"recall@10": 0.0775, "ndcg@10": 0.0418},
    "LETTER (re-run by HG-Rec)": {"recall@10": 0.0797, "ndcg@10": 0.0426},
    "HG-Rec (3-level SIDs)": {"recall@10": 0.0872, "ndcg@10": 0.0473},
}

# Beauty ablations (seed 42): name -> (base method, overrides of its YAML). An empty override list is the
# base method's own seed-42 run of the main grid (reused, not trained twice).
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "lambda_gfn=0.1": ("gflowgr_tb", []),
    "lambda_gfn=1": ("gflowgr_tb", ["gfn.lambda_gfn=1"]),
    "lambda_gfn=10": ("gflowgr_tb", ["gfn.lambda_gfn=10"]),
    "n_aug=1": ("gflowgr_tb", ["gfn.n_aug=1"]),
    "n_aug=3": ("gflowgr_tb", []),
    "n_aug=5": ("gflowgr_tb", ["gfn.n_aug=5"]),
    "reward-all": ("gflowgr_tb", []),
    # The paper's reward: r_pos fixed at 1, no exponent (the shipped configs use the validation-picked ones).
    "reward-paper": ("gflowgr_tb", ["gfn.reward.r_pos_mode=fixed", "gfn.reward.beta=1.0"]),
    # Without r_a there is no r_pos to scale to the catalogue: r_pos_mode goes back to fixed.
    "reward-no_r_a": ("gflowgr_tb", ["gfn.reward.use_a=false", "gfn.reward.r_pos_mode=fixed"]),
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
        config_dir: the folder of the method YAMLs (default ``configs/<dataset>``; e.g. ``configs/beauty_cpu``
            for the CPU protocol).
    """

    name: str
    method: str
    seed: int
    out: Path
    dataset: str
    overrides: list[str] = field(default_factory=list)
    needs: list[Path] = field(default_factory=list)
    config_dir: Optional[Path] = None

    @property
    def config_path(self) -> Path:
        return Path(self.config_dir or CONFIGS / self.dataset) / f"{self.method}.yaml"

    def resumable(self) -> bool:
        """An unfinished run that saved ``out/last/`` (the trainer's resumable state)."""
        return not self.done() and (self.out / "last").is_dir()

    def done(self) -> bool:
        return (self.out / "result.json").exists()

    def config_diff(self) -> dict:
        """``{key: value the run used}`` for every config key whose value in the run's ``config.yaml`` differs from
        what its YAML and overrides give now (a YAML edited after the run, e.g. by the tuning), ignoring
        ``UNCOMPARED_KEYS``. A run counts when it finished or is resumable (its ``last/`` would continue it with
        the old config); empty otherwise, or when it wrote no config."""
        from gflowgr_core.train.config import load_config

        if not ((self.done() or self.resumable()) and (self.out / "config.yaml").exists()):
            return {}
        ran = _flatten(load_config(self.out / "config.yaml").to_dict())
        planned = _flatten(load_config(self.config_path, self.overrides).to_dict())
        return {k: ran.get(k, "<absent>") for k in sorted(ran.keys() | planned.keys())
                if k not in UNCOMPARED_KEYS and ran.get(k, "<absent>") != planned.get(k, "<absent>")}

    def config_changes(self) -> list[str]:
        """The keys of :meth:`config_diff`."""
        return list(self.config_diff())

    def ran_with(self) -> list[str]:
        """``key=value`` of :meth:`config_diff`: how the finished run differs from its YAML as that reads now."""
        return [f"{k}={v}" for k, v in self.config_diff().items()]

    def status(self) -> str:
        """``done``, ``changed`` (finished with another config than the planned one), ``resumable``, ``stale``
        (folder without result.json: retrained) or ``pending``."""
        if self.done():
            return "changed" if self.config_changes() else "done"
        if self.resumable():
            return "resumable"
        return "stale" if self.out.exists() else "pending"

    def command(self) -> str:
        """The equivalent ``gflowgr train`` command line."""
        return " ".join(["gflowgr train --config", str(self.config_path), *self.overrides])


# Config keys that change neither the trained weights nor the validation that selects them: where this machine
# keeps data and runs, resuming, logging, and whether the test split is decoded after training.
UNCOMPARED_KEYS = ("data", "out", "init_checkpoint", "resume", "evaluate_test", "log_every", "handle_signals",
                   "save_every_steps")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "mixture":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_dir(root: Path, dataset: str, quick: bool) -> Path:
    return root / "data" / (f"{dataset}_quick" if quick else dataset)


def _base_overrides(root: Path, dataset: str, method: str, seed: int, out: Path, quick: bool,
                    extra: Sequence[str], sft_seed: Optional[int] = None) -> list[str]:
    overrides = [f"data={data_dir(root, dataset, quick)}", f"out={out}", f"seed={seed}"]
    if method != "sft":
        sft_from = seed if sft_seed is None else sft_seed
        overrides.append(f"init_checkpoint={root / dataset / 'sft' / f'seed{sft_from}' / 'best'}")
    if quick:
        overrides += QUICK_OVERRIDES + (QUICK_SFT if method == "sft" else QUICK_STAGE2)
        if method.startswith("gflowgr"):
            overrides += QUICK_GFN
    return overrides + scoped_overrides(extra, method)


def scoped_overrides(extra: Sequence[str], method: str) -> list[str]:
    """The overrides of ``extra`` that apply to ``method``: ``key=value`` to every run, ``sft:key=value``
    to SFT only and ``stage2:key=value`` to every run after SFT (the scope prefix is removed)."""
    out = []
    for item in extra:
        scope, sep, rest = item.partition(":")
        if sep and scope in ("sft", "stage2") and "=" in rest and "=" not in scope:
            if (scope == "sft") == (method == "sft"):
                out.append(rest)
        else:
            out.append(item)
    return out


def plan_grid(dataset: str, methods: Sequence[str], seeds: Sequence[int], root: Path, quick: bool = False,
              extra: Sequence[str] = (), config_dir: Optional[Path] = None,
              sft_seed: Optional[int] = None, single_seed: Sequence[str] = ()) -> list[RunSpec]:
    """The runs of ``methods`` x ``seeds``, seed-major (a seed's SFT first, then its stage-2 methods), so a
    partly run grid already holds complete seeds. SFT is added for every seed a stage-2 method needs.
    ``config_dir`` holds the method YAMLs (default ``configs/<dataset>``). ``sft_seed``: every stage-2 run
    starts from that one SFT run (trained once) and its seed varies only stage 2; by default each seed
    trains its own SFT. ``single_seed``: methods run at the first seed only (secondary rows of a grid)."""
    unplanned = [m for m in single_seed if m not in methods]
    if unplanned:
        raise SystemExit(f"--single-seed names {unplanned}, which are not among --methods {list(methods)}")
    _check_names(dataset, methods)
    root = Path(root) / "quick" if quick else Path(root)
    wanted = list(dict.fromkeys(["sft", *methods] if any(m != "sft" for m in methods) else methods))
    specs = []
    for seed in seeds:
        sft_from = seed if sft_seed is None else sft_seed
        for method in wanted:
            if method == "sft" and seed != sft_from:
                continue
            if method in single_seed and seed != seeds[0]:
                continue
            out = root / dataset / method / f"seed{seed}"
            needs = [] if method == "sft" else [root / dataset / "sft" / f"seed{sft_from}"]
            specs.append(RunSpec(name=method, method=method, seed=seed, out=out, dataset=dataset, needs=needs,
                                 overrides=_base_overrides(root, dataset, method, seed, out, quick, extra, sft_seed),
                                 config_dir=config_dir))
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


def run_record(records: Path, name: str, seed: int) -> Path:
    """The committed record of run ``name`` at ``seed`` under a results file's records folder
    (:func:`quality_records.records_root`)."""
    return records / f"{_slug(name)}_seed{seed}"


def _check_names(dataset: str, methods: Sequence[str]) -> None:
    if dataset not in DATASETS:
        raise SystemExit(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {METHODS}")


def ensure_data(dataset: str, root: Path, quick: bool = False, source: Optional[Path] = None):
    """Load ``<root>/data/<dataset>`` or prepare it (``gflowgr prepare`` settings of the dataset's YAML
    header) from ``source``, the folder of the dataset's raw files (Beauty: ``Beauty.inter.json`` and
    ``Beauty.index.json``; Sports/Toys: ``user_sequence.txt``), by default the one under the shared data;
    ``quick`` keeps the first 300 users (and 32 codes per built level)."""
    from gflowgr_core.data.prepared import PreparedData, prepare

    root = Path(root) / "quick" if quick else Path(root)
    out = data_dir(root, dataset, quick)
    if (out / "stats.json").exists():
        return PreparedData.load(out)
    max_users = QUICK_USERS if quick else None
    if dataset == "beauty":
        path = Path(source) if source is not None else shared_data_dir() / "letter" / "Beauty"
        _require(path / "Beauty.inter.json")
        _require(path / "Beauty.index.json")
        return prepare("letter", path, out, max_users=max_users)
    path = Path(source) if source is not None else shared_data_dir() / "amazon14" / dataset.capitalize()
    _require(path / "user_sequence.txt")
    return prepare("p5", path, out, levels=3, codes=32 if quick else 256, collisions="suffix", seed=0,
                   max_users=max_users)


def _require(path: Path) -> None:
    if not path.exists():
        raise SystemExit(f"{path} not found: pass --data with the folder of the dataset's files, set "
                         f"GFLOWGR_DATA to the folder holding letter/ and amazon14/, or prepare the data "
                         f"yourself into <root>/data/ with `gflowgr prepare`")


def run_specs(specs: Sequence[RunSpec], data=None, max_minutes: Optional[float] = None,
              train_fn: Optional[Callable] = None, device: str = "auto",
              on_finished: Optional[Callable[[RunSpec], None]] = None, resume: bool = False,
              retrain_changed: bool = False) -> dict:
    """Train the unfinished runs in order, within ``max_minutes`` (no new run starts after it).

    A finished run is skipped unless its config differs from the planned one (:meth:`RunSpec.config_changes`)
    or it starts from a run retrained here: then ``retrain_changed`` trains it again (its folder is removed;
    its committed record is replaced when it finishes), and without it the call stops, naming the runs and
    keys, before training anything: results of two settings must not be aggregated as one.

    ``resume``: an unfinished run that saved ``out/last/`` continues from it (``resume=true``: the same weights
    as an uninterrupted run) instead of being removed and trained again; so a grid stopped with its session
    goes on where it stopped.
    Returns ``{"trained": [...], "skipped": [...], "not_started": [...]}`` (run folders as strings).
    ``train_fn(config, data) -> result`` defaults to :func:`gflowgr_core.train.trainer.run_training`.
    Each run's ``env.json`` gets the device and versions before it trains and its ``wall_seconds`` after;
    ``on_finished(spec)`` is called after each run that finished (e.g. to rewrite the aggregate). A run
    stopped by a signal (``status == "interrupted"``, resumable from its ``last/``) ends the loop.
    """
    from gflowgr_core.devices import resolve_device
    from gflowgr_core.train.config import load_config

    if train_fn is None:
        from gflowgr_core.train.trainer import run_training
        train_fn = run_training
    start = time.time()
    report = {"trained": [], "skipped": [], "not_started": []}
    outdated = _outdated(specs)
    if outdated and not retrain_changed:
        lines = [f"  {out}: {why}" for out, why in outdated.items()]
        raise SystemExit("these finished runs do not match their configs, or the SFT checkpoint under them, as "
                         "they are now:\n" + "\n".join(lines) + "\npass --retrain-changed to train them again, or "
                         "restore the configs and checkpoints they ran with")
    seen: set[Path] = set()
    stopped = False
    for spec in specs:
        if spec.out in seen:  # an ablation that reuses a run of the grid
            continue
        seen.add(spec.out)
        if spec.done() and spec.out not in outdated:
            report["skipped"].append(str(spec.out))
            continue
        if stopped or (max_minutes is not None and time.time() - start > 60 * max_minutes):
            report["not_started"].append(str(spec.out))
            continue
        missing = [str(n) for n in spec.needs if not (n / "result.json").exists()]
        if missing:
            report["not_started"].append(str(spec.out))
            log(f"skipping {spec.out}: it starts from {missing}, which did not finish")
            continue
        overrides = list(spec.overrides)
        if spec.out in outdated:
            log(f"training {spec.out} again: {outdated[spec.out]}")
            shutil.rmtree(spec.out)
        elif resume and spec.resumable():
            log(f"resuming the interrupted run {spec.out} from its last/ checkpoint")
            overrides.append("resume=true")
        elif spec.out.exists():
            log(f"removing the interrupted run {spec.out} (no result.json) and training it again")
            shutil.rmtree(spec.out)
        config = load_config(spec.config_path, overrides)
        spec.out.mkdir(parents=True, exist_ok=True)
        env = environment(resolve_device(config.device))
        env["resumed"] = config.resume
        if config.resume and (spec.out / "env.json").exists():  # the processes the run continues, kept
            env["earlier"] = json.loads((spec.out / "env.json").read_text())
        env["starts_from"] = starts_from(spec)
        (spec.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        log(f"[{time.time() - start:7.0f}s] training {spec.name} seed {spec.seed} -> {spec.out}")
        t0 = time.time()
        result = train_fn(config, data) or {}
        # Of this process only: a resumed run's earlier processes were stopped before they could record theirs
        # (its result's train_seconds covers every part).
        env["wall_seconds"] = time.time() - t0
        (spec.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        if result.get("status") == "interrupted":
            log(f"{spec.out} was interrupted ({result.get('reason')}); no new run starts")
            report["not_started"].append(str(spec.out))
            stopped = True
            continue
        report["trained"].append(str(spec.out))
        if on_finished is not None and spec.done():
            on_finished(spec)
    return report


def adopt_run(spec: RunSpec, source: Path) -> bool:
    """Start ``spec``'s run from the finished run ``source`` trained with the same config and seed elsewhere
    (the tuning's selected SFT setting, which never read test), instead of training it again.

    ``source`` is copied to ``spec.out`` without its ``result.json``; resuming it (``resume=true``) finds the
    training done and only evaluates its best checkpoint on test, the step the tuning skipped. Refused when
    ``source`` is unfinished, kept no ``last/`` or differs from ``spec``'s planned config in a compared key
    (:data:`UNCOMPARED_KEYS` may differ: where it ran, whether it read test). Returns False, copying nothing,
    when ``spec``'s run already finished with its planned config or is resumable (an adoption under way)."""
    from gflowgr_core.train.config import load_config

    source = Path(source)
    if spec.status() in ("done", "resumable"):
        return False
    twin = RunSpec(name=spec.name, method=spec.method, seed=spec.seed, out=source, dataset=spec.dataset,
                   overrides=spec.overrides, config_dir=spec.config_dir)
    if not twin.done() or not (source / "last").is_dir() or not (source / "config.yaml").exists():
        raise SystemExit(f"{source} is not a finished run with its config.yaml and last/ checkpoint: it cannot "
                         f"stand in for {spec.out}")
    diff = twin.config_diff()
    if diff:
        planned = _flatten(load_config(spec.config_path, spec.overrides).to_dict())
        raise SystemExit(f"{source} was trained with another config than {spec.name} seed {spec.seed} plans: " +
                         ", ".join(f"{k}: {v!r} there, {planned.get(k, '<absent>')!r} planned"
                                   for k, v in diff.items()))
    if spec.out.exists():
        shutil.rmtree(spec.out)
    shutil.copytree(source, spec.out, ignore=lambda folder, names: ["result.json"] if Path(folder) == source else [])
    env_path = spec.out / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    env_path.write_text(json.dumps({**env, "adopted_from": str(source)}, indent=2) + "\n")
    return True


def _outdated(specs: Sequence[RunSpec]) -> dict[Path, str]:
    """``{run folder: why}`` for the finished (or resumable) runs to train again from scratch, in plan order so
    that a run's needs come first: their config changed, or a run they start from is trained again (outdated,
    or unfinished: being retrained), or its checkpoint is not the one they started from (``env.json``'s
    ``starts_from``; a run that recorded none counts as started from another). A resumable run is included
    because resuming it would finish it with the old config or start."""
    outdated: dict[Path, str] = {}
    digests: dict[Path, str] = {}
    for spec in specs:
        if not (spec.done() or spec.resumable()) or spec.out in outdated:
            continue
        changed = spec.config_changes()
        retrained = [str(n) for n in spec.needs if n in outdated or not (n / "result.json").exists()]
        started = _started_from(spec)
        for n in spec.needs:  # each SFT checkpoint hashed once, not once per run that starts from it
            if str(n) not in retrained and n not in digests:
                digests[n] = checkpoint_digest(n / "best")
        moved = [str(n) for i, n in enumerate(spec.needs) if str(n) not in retrained and
                 (i >= len(started) or started[i] != digests[n])]
        if changed:
            outdated[spec.out] = f"config changed ({', '.join(changed)})"
        elif retrained:
            outdated[spec.out] = f"starts from {', '.join(retrained)}, which is trained again"
        elif moved:
            outdated[spec.out] = f"started from another checkpoint than {', '.join(moved)} holds now"
    return outdated


def starts_from(spec: RunSpec) -> list[dict]:
    """What a run records (``env.json``) of the checkpoints it starts from, in the order of its needs: their
    content digests, since an SFT retrained in the same folder is another start and the runs that started from
    the earlier one are outdated (:func:`_outdated`)."""
    return [{"checkpoint": str(n / "best"), "sha256": checkpoint_digest(n / "best")} for n in spec.needs]


def _started_from(spec: RunSpec) -> list[Optional[str]]:
    """The digests of the checkpoints a finished run started from, as its ``env.json`` recorded them."""
    path = spec.out / "env.json"
    env = json.loads(path.read_text()) if path.exists() else {}
    return [entry.get("sha256") for entry in env.get("starts_from", [])]


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def _run_config(spec: RunSpec) -> Optional[dict]:
    """The whole config the run trained with (its ``config.yaml``), ``None`` when it was not written."""
    import yaml

    path = spec.out / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _run_entry(spec: RunSpec, res: dict, env: dict) -> dict:
    """Epochs, steps, times, validation curve and config of one finished run."""
    curve = [{"epoch": r["epoch"], **{m: r["valid"][m] for m in CURVE_METRICS if m in r["valid"]}}
             for r in res.get("history", []) if isinstance(r.get("valid"), dict)]
    return {"name": spec.name, "seed": spec.seed, "out": str(spec.out), "epochs": res.get("epochs"),
            "steps": res.get("steps"), "best_epoch": res.get("best_epoch"),
            "train_seconds": res.get("train_seconds"), "wall_seconds": env.get("wall_seconds"),
            "valid_curve": curve, "config": _run_config(spec)}


def sasrec_report(spec: RunSpec, data=None) -> Optional[dict]:
    """The own report (``train_report``: valid/test metrics, epochs, seconds) of the collaborative model a
    finished run trained with, read from the cached model file; ``None`` when the run used none.

    Looks where :func:`gflowgr_core.collaborative.load_or_train_sasrec` caches (``$GFLOWGR_CACHE/cm``) and
    where the trainer has kept it beside the prepared data (``<data>/cm/sasrec_seed<S>_<split hash>.pt``).
    A file saved without its report is evaluated on the test split instead.
    """
    import dataclasses

    from gflowgr_core.collaborative import (SASRec, default_cache_dir, evaluate_sasrec, sasrec_cache_name,
                                            split_fingerprint)
    from gflowgr_core.data.prepared import PreparedData
    from gflowgr_core.train.config import load_config

    if not (spec.out / "config.yaml").exists():
        return None
    cfg = load_config(spec.out / "config.yaml")
    if data is None:
        if not (Path(cfg.data) / "stats.json").exists():
            return None
        data = PreparedData.load(cfg.data)
    cm = dataclasses.replace(cfg.cm, seed=cfg.seed)
    candidates = [default_cache_dir() / sasrec_cache_name(data.split, cm),
                  Path(cfg.data) / "cm" / f"sasrec_seed{cfg.seed}_{split_fingerprint(data.split.train)[:12]}.pt"]
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        return None
    model = SASRec.load(path)
    report = getattr(model, "train_report", None)
    if report is None:
        report = {"test": evaluate_sasrec(model, data.split.test, data.popularity, cm.eval_ks,
                                          cm.eval_batch_size, cm.exclude_history)}
    return {**report, "file": str(path)}


def aggregate(specs: Sequence[RunSpec], seeds: Sequence[int], data=None,
              record_of: Optional[Callable[[RunSpec], Path]] = None) -> dict:
    """Mean and std over the finished seeds of each run name in ``specs`` (test split of each run's best
    checkpoint). Names without a finished run are left out of ``methods`` and listed in ``missing``. A
    finished run the grid would train again (:func:`_outdated`: another config, or another SFT under it) is
    not aggregated, so one file never mixes two settings; ``outdated`` names those runs and why.
    ``runs`` describes every aggregated run; ``reference.sasrec`` holds the collaborative model's own test
    metrics over the seeds whose runs trained one (``data``: the prepared dataset, loaded when omitted).

    ``record_of(spec)``: the run's committed record (:mod:`quality_records`); with it, every finished run is
    archived there, and ``comparisons`` holds the paired bootstrap over test users of ``gflowgr_tb`` minus
    each other method (per-user metrics averaged over each method's seeds; :mod:`quality_stats`)."""
    results: dict[str, dict[int, dict]] = {}
    devices, versions = set(), None
    runs, sasrec = [], {}
    outdated = _outdated(specs)
    for spec in specs:
        results.setdefault(spec.name, {})
        if not spec.done() or spec.out in outdated:
            continue
        res = json.loads((spec.out / "result.json").read_text())
        results[spec.name][spec.seed] = res
        env_path = spec.out / "env.json"
        env = json.loads(env_path.read_text()) if env_path.exists() else {}
        if env:
            devices.add(env["device"])
            versions = versions or env.get("versions")
        else:
            devices.add(str(res.get("device", "unknown")))
        if any(r["out"] == str(spec.out) for r in runs):  # an ablation reusing a run of the grid
            continue
        runs.append(_run_entry(spec, res, env))
        report = sasrec_report(spec, data)
        if record_of is not None:
            archive_run(spec.out, record_of(spec), keep_checkpoint=spec.method == "sft", sasrec=report)
            report = report or saved_sasrec(record_of(spec))
        if spec.seed not in sasrec and report is not None:
            sasrec[spec.seed] = report
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
    reference = {}
    if sasrec:
        done = sorted(sasrec)
        entry = {metric: _mean_std([sasrec[s]["test"][metric] for s in done])
                 for metric in HEADLINE_METRICS if all(metric in sasrec[s].get("test", {}) for s in done)}
        entry["train_seconds"] = _mean_std([float(sasrec[s].get("seconds", float("nan"))) for s in done])
        entry["epochs"] = [sasrec[s].get("epochs_run") for s in done]
        entry["config"] = sasrec[done[0]].get("config")
        entry["seeds_done"] = done
        reference["sasrec"] = entry
    device = sorted(devices)[0] if len(devices) == 1 else (sorted(devices) or None)
    comparisons, intervals = ({}, {}) if record_of is None else paired_comparisons(specs, results, data, record_of)
    return {"device": device, "versions": versions, "seeds": list(seeds), "epochs": epochs, "steps": steps,
            "methods": methods, "missing": missing, "reference": reference, "runs": runs,
            "comparisons": comparisons, "intervals": intervals,
            "outdated": {str(out): why for out, why in outdated.items()}}


COMPARED = "gflowgr_tb"


def paired_comparisons(specs: Sequence[RunSpec], results: dict, data,
                       record_of: Callable[[RunSpec], Path]) -> tuple[dict, dict]:
    """``({"gflowgr_tb-<method>": {metric: {"diff", "ci95", "p", ...}}}, {method: {metric: [lo, hi]}})``: the
    paired comparisons and each method's 95% interval over users, from the per-user test ranks of every
    finished run (seed-averaged per method); methods whose runs lack ranks are left out (and logged)."""
    per_user: dict[str, list] = {}
    for spec in specs:
        if spec.seed not in results.get(spec.name, {}):
            continue
        expected = results[spec.name][spec.seed]["test"]
        ranks = run_ranks(spec.out, record_of(spec), lambda best: _evaluate_ranks(best, data, expected))
        if ranks is None:
            log(f"{spec.name} seed {spec.seed}: no per-user test ranks (neither saved nor a checkpoint to "
                f"evaluate): left out of the paired comparisons")
            per_user[spec.name] = None
            continue
        if per_user.get(spec.name, []) is not None:
            per_user.setdefault(spec.name, []).append(per_user_metrics(ranks))
    means = {name: seed_mean(v) for name, v in per_user.items() if v}
    pairs = [(COMPARED, other) for other in means if other != COMPARED]
    return compare_methods(means, pairs), mean_intervals(means)


def protocol_comparisons(path: Path, agg: dict, other: Path) -> dict:
    """Each method of this results file (``path``, aggregate ``agg``) minus the same method in ``other``, a
    results file of another protocol on the same test users (e.g. the trie-support pair against the headline
    grid): ``{"against": other's name, "comparisons": {"<m> (<this stem>)-<m> (<other stem>)": {metric: ...}}}``,
    paired over users on the seeds both files finished, from the per-user ranks in their committed records.
    A method missing from ``other``, without a common seed or without ranks is left out (and logged)."""
    if not other.exists():
        raise SystemExit(f"--paired-with {other}: no such results file")
    theirs = json.loads(other.read_text()).get("methods", {})
    kept = RANK_FILES["test"][1]
    comparisons = {}
    for name, entry in agg["methods"].items():
        seeds = sorted(set(entry["seeds_done"]) & set(theirs.get(name, {}).get("seeds_done", [])))
        files = {p: [run_record(records_root(p), name, s) / kept for s in seeds] for p in (path, other)}
        missing = [str(f) for group in files.values() for f in group if not f.exists()]
        if not seeds or missing:
            log(f"{name}: left out of the comparison with {other.name} "
                f"({'no seed finished in both' if not seeds else 'no ranks: ' + ', '.join(missing)})")
            continue
        labels = {p: f"{name} ({p.stem})" for p in (path, other)}
        per_user = {labels[p]: seed_mean([per_user_metrics(load_ranks(f)) for f in group])
                    for p, group in files.items()}
        comparisons.update(compare_methods(per_user, [(labels[path], labels[other])]))
    return {"against": other.name, "comparisons": comparisons}


def _evaluate_ranks(best: Path, data, expected: dict, split: str = "test") -> dict:
    """Per-user ranks on ``split`` of a checkpoint that finished before runs saved them (validation: on the
    run's ``valid_max_users`` users); its metrics must equal the ones the run reported (else the ranks would
    not be the run's), which also checks that evaluation is deterministic."""
    import numpy as np

    from gflowgr_core.data.prepared import PreparedData
    from gflowgr_core.evaluation import evaluate_policy, evaluation_users, item_key_of
    from gflowgr_core.train.checkpoint import load_policy
    from gflowgr_core.train.config import load_config

    cfg = load_config(best / "config.yaml")
    data = data if data is not None else PreparedData.load(cfg.data)
    index = evaluation_users(len(getattr(data.split, split)), cfg.valid_max_users if split == "valid" else None)
    log(f"evaluating {best} on {split} once more for its per-user ranks ({len(index):,} users)")
    ranks: dict = {}
    metrics = evaluate_policy(load_policy(best, device="cpu"), data, split, index=index, beams=cfg.eval_beams,
                              batch_size=cfg.eval_batch_size, backend=cfg.backend, item_key=item_key_of(data),
                              ranks_out=ranks)
    for key in ("recall@10", "ndcg@10", "renorm/recall@10", "renorm/ndcg@10"):
        if key in expected and abs(metrics[key] - expected[key]) > 1e-9:
            raise SystemExit(f"{best}: {split} {key} is {metrics[key]:.6f} now but the run reported "
                             f"{expected[key]:.6f}: the per-user ranks would not be the run's")
    return {(prefix or "headline"): r.numpy().astype(np.int64) for prefix, r in ranks.items()}


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
    for name, entry in agg.get("reference", {}).items():
        row = {"method": f"{name} (reference)", "seeds": len(entry["seeds_done"]),
               "train_s": entry["train_seconds"]["mean"]}
        row.update({m: f"{entry[m]['mean']:.4f}±{entry[m]['std']:.4f}" for m in TABLE_METRICS if m in entry})
        rows.append(row)
    columns = ["method", "seeds", *TABLE_METRICS]
    if paper is not None:
        columns += ["paper recall@10", "paper ndcg@10", "ours N@10 vs SFT", "paper N@10 vs SFT"]
    columns.append("train_s")
    return format_table(rows, columns)


def plot_quality(agg: dict, path: Path) -> Optional[Path]:
    """PNG of the grid: validation NDCG@10 per epoch per method (stage-2 runs drawn from the SFT epoch they
    start at), and the test bars (R@10 and N@10 under both scorings, the collaborative model beside them).
    ``None`` (with a message) when matplotlib is not installed or nothing finished."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    if not agg["methods"]:
        return None
    seed = agg["seeds"][0]
    runs = {r["name"]: r for r in agg["runs"] if r["seed"] == seed}
    sft_curve = {c["epoch"]: c["ndcg@10"] for c in runs["sft"]["valid_curve"] if "ndcg@10" in c} \
        if "sft" in runs else {}
    start = max(runs["sft"]["best_epoch"] or 0, 0) if "sft" in runs else 0
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    for name, run in runs.items():
        points = [(c["epoch"], c["ndcg@10"]) for c in run["valid_curve"] if "ndcg@10" in c]
        if name != "sft":  # drawn from the SFT checkpoint it starts from
            points = ([(0, sft_curve[start])] if start in sft_curve else []) + points
            points = [(start + e, v) for e, v in points]
        if points:
            left.plot(*zip(*points), marker=".", label=name)
    left.set_xlabel("epoch (stage-2 runs start at the best SFT epoch)")
    left.set_ylabel("validation NDCG@10 (HF scoring)")
    left.set_title(f"validation, seed {seed}")
    left.legend(fontsize=8)
    bars = [("recall@10", "R@10"), ("ndcg@10", "N@10"), ("renorm/recall@10", "R@10 renorm"),
            ("renorm/ndcg@10", "N@10 renorm")]
    rows = list(agg["methods"].items()) + [(f"{n} (ref.)", e) for n, e in agg.get("reference", {}).items()]
    intervals = agg.get("intervals") or {}
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(rows))]
        means = [e[key]["mean"] if key in e else 0.0 for _, e in rows]
        # the 95% interval over test users where per-user ranks exist, else the std over seeds
        lows, highs = [], []
        for (name, e), m in zip(rows, means):
            ci = intervals.get(name, {}).get(key)
            spread = (m - ci[0], ci[1] - m) if ci else ((e[key]["std"],) * 2 if key in e else (0.0, 0.0))
            lows.append(max(spread[0], 0.0))
            highs.append(max(spread[1], 0.0))
        drawn = right.bar(xs, means, width, yerr=[lows, highs], capsize=2, label=label)
        right.bar_label(drawn, labels=[f"{m:.4f}" if m else "" for m in means], fontsize=6, rotation=90,
                        padding=3)
    right.set_xticks(range(len(rows)))
    right.set_xticklabels([f"{n}\n(seeds {', '.join(map(str, e.get('seeds_done', [])))})" if e.get("seeds_done")
                           else n for n, e in rows], fontsize=8)
    right.set_title("test: mean over finished seeds, 95% interval over users")
    target = next(iter(((agg.get("paper") or {}).get("published_same_split") or {}).items()), None)
    if target is not None:  # the first published row on this split: the figure to beat
        for key, style in (("recall@10", "--"), ("ndcg@10", ":")):
            if key in target[1]:
                right.axhline(target[1][key], color="grey", linestyle=style, linewidth=1,
                              label=f"{target[0]} {key}")
    right.set_ylim(0, max(e[k]["mean"] for _, e in rows for k, _ in bars if k in e) * 1.3)
    right.legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle(f"{'--quick pipeline check, not results: ' if agg.get('quick') else ''}{agg['device']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def output_path(dataset: str, quick: bool, ablations: bool, results_dir: Path = RESULTS_DIR, tag: str = "") -> Path:
    stem = f"{'ablations' if ablations else 'quality'}_{dataset}{f'_{tag}' if tag else ''}"
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
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder of the dataset's raw files, used when <root>/data/<dataset> is not prepared yet "
                        "(Beauty: Beauty.inter.json and Beauty.index.json; default: under $GFLOWGR_DATA or "
                        "../shared/data)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON and the PNG go")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help="folder of the method YAMLs (default: configs/<dataset>; configs/beauty_cpu is the CPU "
                        "protocol)")
    p.add_argument("--sft-seed", type=int, default=None,
                   help="train SFT once with this seed and start every stage-2 seed from it (default: one SFT "
                        "per seed)")
    p.add_argument("--single-seed", nargs="+", default=[], choices=METHODS, metavar="METHOD",
                   help="methods trained at the first of --seeds only (e.g. the secondary baselines of a grid)")
    p.add_argument("--tag", default="", help="suffix of the results file: quality_<dataset>_<tag>.json")
    p.add_argument("--retrain-changed", action="store_true",
                   help="train again the finished runs whose config changed since (e.g. a YAML the tuning "
                        "updated) and the runs that start from them; without it such runs stop the grid")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted runs from their last/ checkpoint instead of training them again")
    p.add_argument("--sft-from", default=None, metavar="RUN_DIR",
                   help="a finished run trained with the grid SFT's config and seed (e.g. the selected setting of "
                        "tune_quality.py --stage sft): it becomes the grid's SFT run, which then only reads test "
                        "(with --resume; refused when the configs differ)")
    p.add_argument("--paired-with", default=None, metavar="RESULTS_JSON",
                   help="another protocol's results file on the same test users (e.g. "
                        "benchmarks/results/quality_beauty_cpu.json): each method is also compared with the same "
                        "method there, paired over users on the seeds both finished (JSON key protocol_comparisons)")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides applied to every run (after the YAML); sft:key=value only to SFT, "
                        "stage2:key=value only to the runs after SFT")
    return p


def main(argv: Optional[list[str]] = None, train_fn: Optional[Callable] = None) -> dict:
    """Run (a chunk of) the grid and write the aggregate; returns the aggregate dict."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root)
    if args.quick and args.paired_with is not None:
        raise SystemExit("--paired-with reads the committed run records of both files; --quick commits none")
    seeds = [args.seeds[0]] if args.quick else args.seeds
    ablations = args.ablations is not None
    if ablations:
        if args.dataset != "beauty":
            raise SystemExit("the ablations are defined on beauty only")
        specs = plan_ablations(args.dataset, root, args.quick, args.overrides, args.ablations or None)
        seeds = [ABLATION_SEED]
    else:
        specs = plan_grid(args.dataset, args.methods, seeds, root, args.quick, args.overrides,
                          None if args.config_dir is None else Path(args.config_dir), args.sft_seed, args.single_seed)
    if args.dry_run:
        ddir = data_dir(root / "quick" if args.quick else root, args.dataset, args.quick)
        print(f"data: {ddir} ({'ready' if (ddir / 'stats.json').exists() else 'prepared on first run'})")
        outdated = _outdated(specs)  # finished, but trained again (another config, or another SFT under it)
        status = {s.out: "outdated" if s.out in outdated else s.status() for s in specs}
        print(format_table([{"run": s.name, "seed": s.seed, "status": status[s.out], "out": str(s.out)}
                            for s in specs], ["run", "seed", "status", "out"]))
        for out, why in outdated.items():
            print(f"outdated: {out}: {why}")
        printed: set[Path] = set()
        for s in specs:
            if status[s.out] != "done" and s.out not in printed:
                printed.add(s.out)
                print(s.command())
        return {}
    paper = PAPER_BEAUTY if args.dataset == "beauty" and not ablations else None
    path = output_path(args.dataset, args.quick, ablations, Path(args.results_dir), args.tag)
    # --quick runs keep their records beside the runs: a pipeline check commits no checkpoint.
    records = root / "quick" / "records" if args.quick else records_root(path)

    def record_of(spec: RunSpec) -> Path:
        return run_record(records, spec.name, spec.seed)

    for spec in specs:  # finished runs of earlier machines: skipped, and SFT's checkpoint seeds stage 2
        if restore_run(spec.out, record_of(spec)):
            log(f"restored the finished run {spec.out} from {record_of(spec)}")

    def write_outputs(data=None) -> dict:
        agg = aggregate(specs, seeds, data, record_of)
        agg["quick"] = args.quick
        if args.quick:
            agg["note"] = ("--quick: a 1-layer 32-wide model, a few steps, the first 300 users; a check that the "
                           "script runs end to end, not a result")
        agg["root"] = str(root)
        agg["overrides"] = list(args.overrides)
        if args.paired_with is not None:
            agg["protocol_comparisons"] = protocol_comparisons(path, agg, Path(args.paired_with))
        if paper is not None:
            agg["paper"] = {"gflowgr_paper_letter_sids": PAPER_BEAUTY, "tiger_paper": TIGER_BEAUTY,
                            "published_same_split": PUBLISHED_BEAUTY}
        if ablations:
            agg["ablations"] = {name: {"base": ABLATIONS[name][0], "overrides": ABLATIONS[name][1]}
                                for name in agg["methods"]}
        write_json(path, agg)
        plot_quality(agg, path.with_suffix(".png"))
        return agg

    data = None
    if not args.aggregate_only:
        if args.sft_from is not None:
            sft = [s for s in specs if s.method == "sft"]
            if not args.resume or len(sft) != 1:
                raise SystemExit("--sft-from stands one finished run in for the grid's one SFT run and resumes it: "
                                 "pass --resume, and --sft-seed when several seeds are planned")
            if adopt_run(sft[0], Path(args.sft_from)):
                log(f"{sft[0].out} starts from the finished run {args.sft_from}: it only reads test")
        data = ensure_data(args.dataset, root, args.quick, None if args.data is None else Path(args.data))
        # The aggregate is rewritten after every finished run, so a grid cut short still leaves its results.
        report = run_specs(specs, data, args.max_minutes, train_fn, on_finished=lambda spec: write_outputs(data),
                           resume=args.resume, retrain_changed=args.retrain_changed)
        log(f"trained {len(report['trained'])}, skipped (finished) {len(report['skipped'])}, "
            f"not started {len(report['not_started'])}")
    agg = write_outputs(data)
    if agg["methods"]:
        print(f"{args.dataset}: test split, best validation checkpoint, mean±std over finished seeds "
              f"({agg['device']})")
        print(quality_table(agg, paper))
    if agg["missing"]:
        print(f"not finished yet: {', '.join(agg['missing'])}")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return agg


if __name__ == "__main__":
    main()
