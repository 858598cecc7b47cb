"""Validation-only tuning of GFlowGR on a grid dataset (Beauty's CPU protocol).

Every setting is one stage-2 run of the grid's budget (same SFT checkpoint, seed, examples, epochs and steps
as ``benchmarks/run_quality.py``'s runs) with the named overrides on top of the method's YAML, scored on the
grid's validation subset under both scorings; ``evaluate_test=false``, so the test split is never decoded.
The grid's own finished runs of the tuning seed (``sft``, ``sft_continue``, ``sdpo``, ``gflowgr_tb``) are the
reference rows, read from their validation history only.

    python benchmarks/tune_quality.py --dataset beauty --config-dir configs/beauty_cpu --tag cpu \
        --root /work/runs --sft-seed 42                        # every setting of TUNING not yet run
    python benchmarks/tune_quality.py ... --settings teacher   # only these
    python benchmarks/report.py --section tuning_quality       # renders the table into docs/reproduce.md

Runs live under ``<root>/<dataset>/tune/<setting>/seed<S>``; each finished one is recorded (result, config,
env; no checkpoint) under ``benchmarks/results/tune_<dataset>_<tag>_runs/`` and the table
``benchmarks/results/tune_<dataset>_<tag>.json`` is rewritten, so tuning resumes on a new machine.

``--stage lr`` tries gentler stage-2 learning rates for each compared method (``LR_TUNING``); each method keeps
its best rate on validation, the YAML's included (``selected_by_method`` in ``tune_<dataset>_lr_<tag>.json``).

``--stage sft`` tunes the SFT the grid starts from instead (``SFT_TUNING``): every setting trains from scratch
with its overrides on top of ``sft.yaml``, selected on the same validation users, test never read; its table
is ``tune_<dataset>_sft_<tag>.json`` and its reference row the grid's own SFT run.

Stage-2 tuning records the digest of the SFT checkpoint it started from (``sft_checkpoint``) and refuses to
go on once the grid's SFT is another one. ``--round N`` tunes again from the grid's current SFT in a round of its
own: runs under ``<root>/<dataset>/tune_round<N>/``, table ``tune_<dataset>_<tag>_round<N>.json``, so no row of
an earlier round (another SFT) is mixed in or mistaken for a finished run:

    python benchmarks/tune_quality.py ... --round 2 --settings share0p1 share0p5 flowlr0p001

A round >= 2 runs only the ``--settings`` it is given.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from gflowgr_core.devices import resolve_device  # noqa: E402
from quality_records import archive_run, checkpoint_digest, restore_run, run_ranks  # noqa: E402
from quality_stats import compare_methods, per_user_metrics  # noqa: E402
from run_quality import (DATASETS, RESULTS_DIR, RunSpec, _base_overrides, _evaluate_ranks, _outdated,  # noqa: E402
                         _slug, ensure_data, output_path, plan_grid, records_root, run_record, run_specs)

SELECT = "ndcg@10"
SEED = 42
REPORTED = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10")
# The reward that makes trajectory balance a distillation of the collaborative model: R(x) = the CM's softmax
# over the catalogue (divided by its top entry), no r_a or r_sim (TB's fixed point is P_F(x | U) ∝ R(x)), at the
# lambda_gfn it was first run with: the settings below vary one factor of it, whatever the YAMLs now hold.
TEACHER = ["gfn.reward.cm_norm=softmax", "gfn.reward.cm_temperature=1.0", "gfn.reward.use_a=false",
           "gfn.reward.use_sim=false", "gfn.reward.r_pos_mode=fixed", "gfn.reward.beta=1.0", "gfn.lambda_gfn=0.1"]
# The setting shipped before Beauty was tuned (picked on MovieLens-100K): r_a + r_cm + r_sim, the positive's share
# of the reward mass 0.5, beta 2, lambda 0.1.
SHIPPED = ["gfn.reward.cm_norm=sigmoid_z", "gfn.reward.use_a=true", "gfn.reward.use_sim=true",
           "gfn.reward.r_pos_mode=catalogue", "gfn.reward.target_share=0.5", "gfn.reward.beta=2.0",
           "gfn.lambda_gfn=0.1"]
POSITIVE_SHARE = ["gfn.reward.use_a=true", "gfn.reward.r_pos_mode=catalogue"]
# name (also the run folder's and the record's name) -> (method, overrides on top of configs/<...>/<method>.yaml),
# in the order they are run.
TUNING: dict[str, tuple[str, list[str]]] = {
    "shipped": ("gflowgr_tb", SHIPPED),
    "teacher": ("gflowgr_tb", TEACHER),
    "teacher_lambda1": ("gflowgr_tb", [*TEACHER, "gfn.lambda_gfn=1.0"]),
    "teacher_naug7": ("gflowgr_tb", [*TEACHER, "gfn.n_aug=7"]),
    "teacher_tau0p5": ("gflowgr_tb", [*TEACHER, "gfn.reward.cm_temperature=0.5"]),
    "teacher_tau2": ("gflowgr_tb", [*TEACHER, "gfn.reward.cm_temperature=2.0"]),
    "teacher_lambda0p3": ("gflowgr_tb", [*TEACHER, "gfn.lambda_gfn=0.3"]),
    "teacher_lambda3": ("gflowgr_tb", [*TEACHER, "gfn.lambda_gfn=3.0"]),
    # The sampler's curriculum: hard items (close to the user's taste) from the start, or easy ones throughout.
    "teacher_curriculum_hard": ("gflowgr_tb", [*TEACHER, "gfn.curriculum_start=0.5", "gfn.curriculum_end=0.9"]),
    "teacher_curriculum_easy": ("gflowgr_tb", [*TEACHER, "gfn.curriculum_start=0.1", "gfn.curriculum_end=0.5"]),
    # The flow heads' learning rate (log F, log Z) and their warm-up alone.
    "teacher_flowlr0p1": ("gflowgr_tb", [*TEACHER, "gfn.flow_lr=0.1"]),
    "teacher_flowwarmup0": ("gflowgr_tb", [*TEACHER, "gfn.flow_warmup_steps=0"]),
    # Round 2 (--round 2, from the grid's current SFT): one factor at a time on top of the YAML as it is (round 1's
    # pick), so the grid's own gflowgr_tb run is their base. The positive's share of the reward mass on top of the
    # teacher: r_a calibrated per user so that the held-out item holds this share of R's mass over the catalogue
    # (the teacher alone gives it its softmax share); and the flow heads' learning rate below round 1's.
    "share0p1": ("gflowgr_tb", [*POSITIVE_SHARE, "gfn.reward.target_share=0.1"]),
    "share0p5": ("gflowgr_tb", [*POSITIVE_SHARE, "gfn.reward.target_share=0.5"]),
    "flowlr0p001": ("gflowgr_tb", ["gfn.flow_lr=0.001"]),
}
# The SFT of the CPU protocol (configs/beauty_cpu/sft.yaml: cosine over 20 epochs) peaks at epoch 10 and then
# overfits while the learning rate is still high: a schedule that ends sooner; then, since that one still peaks
# two epochs before its end, regularisation (residual dropout, weight decay); a wider model.
# Validation every epoch so that each setting's best epoch is found, not the nearest even one.
SFT_TUNING: dict[str, tuple[str, list[str]]] = {
    "sft_cosine10": ("sft", ["epochs=10", "eval_every=1"]),
    "sft_cosine10_drop0p1": ("sft", ["epochs=10", "eval_every=1", "model.hidden_dropout=0.1"]),
    "sft_cosine10_drop0p2": ("sft", ["epochs=10", "eval_every=1", "model.hidden_dropout=0.2"]),
    "sft_cosine14_drop0p1": ("sft", ["epochs=14", "eval_every=1", "model.hidden_dropout=0.1"]),
    "sft_cosine12_wd0p1": ("sft", ["epochs=12", "eval_every=1", "weight_decay=0.1"]),
    "sft_wide192_cosine12": ("sft", ["epochs=12", "eval_every=1", "model.hidden=192", "model.intermediate=768"]),
}
# Stage 2's learning rate, per method: the grid gives every method lr 5e-4 (chosen for the first SFT), and from the
# SFT at its validation peak continued SFT and S-DPO lose validation NDCG@10 in their first epoch while GFlowGR
# gains; a gentler rate may suit the baselines better. Each method keeps whichever rate (the YAML's or a row's)
# scores highest on validation (``selected_by_method``); the budget (examples, steps, epochs) is unchanged.
LR_TUNING: dict[str, tuple[str, list[str]]] = {
    f"{method}_lr{name}": (method, [f"lr={rate}"])
    for name, rate in (("1e-4", 0.0001), ("2e-4", 0.0002)) for method in ("sft_continue", "sdpo", "gflowgr_tb")}
STAGE2 = ("sft", "sft_continue", "sdpo", "gflowgr_tb")
STAGES = {"gflowgr": (TUNING, STAGE2), "sft": (SFT_TUNING, ("sft",)), "lr": (LR_TUNING, STAGE2)}
# Rows every other row is compared with, paired over the validation users: the baseline to beat and, for stage 2,
# the setting the one-factor changes start from.
PAIRED_WITH = {"gflowgr": ("sft_continue", "teacher", "gflowgr_tb"), "sft": ("sft",),
               "lr": ("gflowgr_tb", "sft_continue")}
PAIRED_METRICS = ("ndcg@10", "recall@10", "renorm/ndcg@10")
log = logging.getLogger("gflowgr")


def plan_tuning(dataset: str, root: Path, names: list[str], config_dir: Optional[Path], sft_seed: int,
                extra: list[str], settings: Optional[dict] = None, round_: int = 1) -> list[RunSpec]:
    """One run per setting name of ``settings`` (default ``TUNING``): a stage-2 setting starts from the grid's
    SFT checkpoint of ``sft_seed``, an SFT setting trains from scratch. Round 1's runs live under
    ``<root>/<dataset>/tune/``, a later round's under ``tune_round<N>/``."""
    settings = TUNING if settings is None else settings
    unknown = [n for n in names if n not in settings]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; known: {', '.join(map(repr, settings))}")
    specs = []
    for name in names:
        method, overrides = settings[name]
        out = root / dataset / ("tune" if round_ == 1 else f"tune_round{round_}") / _slug(name) / f"seed{SEED}"
        needs = [] if method == "sft" else [root / dataset / "sft" / f"seed{sft_seed}"]
        specs.append(RunSpec(name=name, method=method, seed=SEED, out=out, dataset=dataset, config_dir=config_dir,
                             needs=needs,
                             overrides=_base_overrides(root, dataset, method, SEED, out, False,
                                                       [*extra, *overrides, "evaluate_test=false"], sft_seed)))
    return specs


def validation_row(spec: RunSpec, overrides: list[str]) -> dict:
    """The best validation epoch of a finished run (both scorings), its curve, steps, train time and the learning
    rate it ran with."""
    res = json.loads((spec.out / "result.json").read_text())
    config = spec.out / "config.yaml"
    lr = yaml.safe_load(config.read_text()).get("lr") if config.exists() else None
    history = [r for r in res.get("history", []) if isinstance(r.get("valid"), dict)]
    if not history:
        raise SystemExit(f"{spec.out}/result.json has no validation history")
    best = max(history, key=lambda r: r["valid"][SELECT])
    keys = [p + m for p in ("", "renorm/") for m in REPORTED]
    return {"setting": spec.name, "method": spec.method, "overrides": overrides,
            "valid": {k: float(best["valid"][k]) for k in keys if k in best["valid"]},
            "best_epoch": best["epoch"], "epochs": res.get("epochs"), "steps": res.get("steps"),
            "train_seconds": res.get("train_seconds"), "lr": lr,
            "curve": [{"epoch": r["epoch"], SELECT: r["valid"][SELECT]} for r in history]}


def add_paired(rows: list[dict], ranks: dict[str, dict], bases: tuple[str, ...]) -> None:
    """Give every row ``paired[base][metric]`` (:func:`quality_stats.paired_bootstrap`: row minus base over the
    validation users, 95% interval, p) for each base row in ``bases`` that has per-user ranks."""
    per_user = {name: per_user_metrics(r) for name, r in ranks.items()}
    for row in rows:
        name = row["setting"]
        if name not in per_user:
            continue
        pairs = [(name, base) for base in bases if base != name and base in per_user]
        if pairs:
            found = compare_methods(per_user, pairs, PAIRED_METRICS)
            row["paired"] = {base: found[f"{name}-{base}"] for _, base in pairs}


def selected_by_method(rows: list[dict]) -> dict[str, str]:
    """Per method with a tuning row, the setting (a tuning row, or the grid run named after the method: its YAML as
    it is) with the highest validation ``SELECT``."""
    tuned = {r["method"] for r in rows if r["setting"] != r["method"]}
    return {m: max((r for r in rows if r["method"] == m), key=lambda r: r["valid"][SELECT])["setting"]
            for m in sorted(tuned)}


def check_references_kept(path: Path, references: list[dict]) -> None:
    """Refuses to rewrite the learning-rate table at ``path`` once a grid run it holds as a reference has been
    retrained with another rate (or is being retrained): the rate a method was tuned against would vanish from
    the record of its choice. A grid retrained after the choice is recorded in this table as it stands."""
    if not path.exists():
        return
    now = {r["method"]: r.get("lr") for r in references}
    for row in json.loads(path.read_text()).get("references", []):
        if row["method"] not in now or now[row["method"]] != row.get("lr"):
            have = "no finished run" if row["method"] not in now else f"lr {now[row['method']]}"
            raise SystemExit(f"{path} holds the grid's {row['method']} at lr {row.get('lr')} as a reference and "
                             f"the grid now has {have}: this table is the record of that choice; tune again under "
                             f"another --tag (or --results-dir)")


def sft_checkpoint(grid: list[RunSpec], path: Path) -> Optional[str]:
    """The digest of the grid SFT checkpoint stage-2 tuning starts from, the one recorded in ``path`` by its
    first runs. Refuses when the grid's SFT has changed since: rows from two SFTs, and reference rows
    retrained from the new one, must not share a table."""
    sft = next(s for s in grid if s.method == "sft")
    recorded = json.loads(path.read_text()).get("sft_checkpoint") if path.exists() else None
    current = checkpoint_digest(sft.out / "best") if sft.done() else None
    if recorded is not None and current is not None and current != recorded:
        raise SystemExit(f"{path} holds stage-2 settings tuned from the SFT checkpoint {recorded[:12]}, and the "
                         f"grid's SFT ({sft.out / 'best'}) is now {current[:12]}: tune from it under another --tag "
                         f"(or --results-dir) rather than mixing the two")
    return recorded or current


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="beauty")
    p.add_argument("--stage", choices=list(STAGES), default="gflowgr",
                   help="tune GFlowGR's stage 2 (TUNING, from the grid's SFT), every stage-2 method's learning rate "
                        "(LR_TUNING, from the grid's SFT) or the SFT itself (SFT_TUNING, from scratch)")
    p.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                   help=f"settings to run (default: all of the stage): {', '.join(map(repr, TUNING))}; "
                        f"--stage lr: {', '.join(map(repr, LR_TUNING))}; --stage sft: {', '.join(map(repr, SFT_TUNING))}")
    p.add_argument("--root", default="runs", help="folder of prepared data and runs (as run_quality.py)")
    p.add_argument("--config-dir", default=None, metavar="DIR", help="folder of the method YAMLs")
    p.add_argument("--sft-seed", type=int, default=SEED, help="the grid's SFT run every setting starts from")
    p.add_argument("--tag", default="", help="suffix of the results files, as run_quality.py's --tag")
    p.add_argument("--round", type=int, default=1, metavar="N",
                   help="tuning round (default 1): a round >= 2 tunes from the grid's current SFT with its own run "
                        "folders (tune_round<N>/) and table (..._round<N>.json), apart from earlier rounds")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; rewrite the table")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every setting")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.round < 1:
        raise SystemExit(f"--round must be 1 or more, got {args.round}")
    if args.round > 1 and not args.settings and not args.aggregate_only:
        raise SystemExit(f"--round {args.round}: name the settings it runs (--settings); by default a round would "
                         f"run every setting again, earlier rounds' included")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root, results = Path(args.root), Path(args.results_dir)
    config_dir = None if args.config_dir is None else Path(args.config_dir)
    settings, references = STAGES[args.stage]
    tuned_methods = {method for method, _ in settings.values()}
    suffix = (("" if args.stage == "gflowgr" else f"_{args.stage}") + (f"_{args.tag}" if args.tag else "")
              + ("" if args.round == 1 else f"_round{args.round}"))
    path = results / f"tune_{args.dataset}{suffix}.json"
    records = records_root(path)
    grid_records = records_root(output_path(args.dataset, False, False, results, args.tag))
    grid = plan_grid(args.dataset, list(references), [SEED], root, extra=args.overrides, config_dir=config_dir,
                     sft_seed=args.sft_seed)
    unknown = sorted(set(args.settings or []) - set(settings))
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown} for --stage {args.stage}; known: {', '.join(settings)}")
    # Every setting is planned: the table lists all finished ones, whichever this call trains.
    specs = plan_tuning(args.dataset, root, list(settings), config_dir, args.sft_seed, list(args.overrides),
                        settings, args.round)
    for spec in grid:
        restore_run(spec.out, run_record(grid_records, spec.name, spec.seed))
    for spec in specs:
        restore_run(spec.out, records / _slug(spec.name))
    start = None if args.stage == "sft" else sft_checkpoint(grid, path)

    def write_table() -> dict:
        payload = {"benchmark": "tune_quality", "what": __doc__.strip().splitlines()[0],
                   **environment(resolve_device("auto")), "dataset": args.dataset, "select_metric": SELECT,
                   "seed": SEED, "stage": args.stage, "round": args.round,
                   "sft_seed": args.sft_seed, "config_dir": str(config_dir or f"configs/{args.dataset}"),
                   "overrides": list(args.overrides), "references": [], "runs": []}
        if start is not None:
            payload["sft_checkpoint"] = start
        ranks: dict[str, dict] = {}
        # A learning-rate row competes with the grid run as "the YAML as it is": a grid run trained with another
        # config or from another SFT checkpoint is not that, and is left out until retrained.
        stale = _outdated(grid) if args.stage == "lr" else {}
        for kind, group, record_of in (("references", grid, lambda s: run_record(grid_records, s.name, s.seed)),
                                       ("runs", specs, lambda s: records / _slug(s.name))):
            for spec in group:
                if not spec.done() or spec.out in stale:
                    continue
                if kind == "runs":
                    archive_run(spec.out, record_of(spec), keep_checkpoint=False)
                row = validation_row(spec, spec.ran_with() if kind == "references" else settings[spec.name][1])
                payload[kind].append(row)
                found = run_ranks(spec.out, record_of(spec), split="valid",
                                  evaluate=lambda best, row=row: _evaluate_ranks(best, None, row["valid"], "valid"))
                if found is not None:
                    ranks[spec.name] = found
        add_paired(payload["references"] + payload["runs"], ranks, PAIRED_WITH[args.stage])
        # The grid's budget every row starts from (tuning rows differ from it only in their overrides).
        done = [s for s in grid if (s.method == "sft") == (args.stage == "sft") and s.done()
                and (s.out / "config.yaml").exists()]
        done.sort(key=lambda s: s.method not in tuned_methods)  # the tuned method's own run gives its rate
        if done:
            cfg = yaml.safe_load((done[0].out / "config.yaml").read_text())
            payload["budget"] = {k: cfg.get(k) for k in ("epochs", "batch_size", "lr", "warmup_steps",
                                                         "valid_max_users", "eval_beams")}
        if args.stage == "lr":  # each method's own best rate, its YAML's (the grid run) included
            check_references_kept(path, payload["references"])
            payload["selected_by_method"] = selected_by_method(payload["references"] + payload["runs"])
        elif payload["runs"]:
            # Round 1 picks among its own rows (the YAMLs then held the setting being replaced). A later round's rows
            # compete with the grid's run of the tuned method's YAML as it is, trained from the same SFT: it stays
            # selected (its method's name) unless a row beats it.
            pool = payload["runs"] + ([r for r in payload["references"] if r["setting"] in tuned_methods]
                                      if args.round > 1 else [])
            payload["selected"] = max(pool, key=lambda r: r["valid"][SELECT])["setting"]
        write_json(path, payload)
        return payload

    if not args.aggregate_only:
        data = ensure_data(args.dataset, root)
        wanted = [s for s in specs if args.settings is None or s.name in args.settings]
        run_specs(wanted, data, on_finished=lambda spec: write_table(), resume=True)
    payload = write_table()
    for r in payload["references"] + payload["runs"]:
        print(f"{r['setting']:<22} valid {SELECT} {r['valid'][SELECT]:.4f}  renorm/{SELECT} "
              f"{r['valid']['renorm/' + SELECT]:.4f}  coverage@10 {r['valid']['coverage@10']:.3f}  "
              f"(best epoch {r['best_epoch']})")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
