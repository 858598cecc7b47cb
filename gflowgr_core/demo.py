"""``gflowgr demo``: SFT, then continued SFT and GFlowGR-TB with the same extra steps, on MovieLens-100K.

Steps: prepare the MovieLens-100K copy shipped in the ``recbole`` wheel (SIDs built by RQ-KMeans over
collaborative embeddings), train a tiny Qwen2-style model with SFT (early stopping on validation), then
start two runs from its best checkpoint with the same budget (same examples, batches and steps):
``sft_continue`` (more cross-entropy, the control for the extra steps) and ``gflowgr_tb`` (CE + 0.1 · TB over
the positive and 3 curriculum-sampled items, reward R^2 with the positive's share of the catalogue's reward
mass set to 0.5, the first steps training only the log Z / log F heads; settings chosen on validation). All three
are evaluated on the whole test split with trie-constrained beam search under both scorings (the headline
HF-style level log-probs and the ``renorm/`` one); the demo prints a table and writes ``metrics.json``
and ``demo.png``.

The budget (:data:`DATA`, :data:`COMMON`, :data:`SFT`, :data:`STAGE2`) is sized for a few minutes on two
CPU cores: each run trains on a seeded random subset of the training examples (``max_train_examples``),
validates on a seeded subset of the validation users, and tests on every test user. The demo prints the
budget and records it in ``metrics.json``.

Interruption: SIGTERM/SIGINT during a run's training saves its resumable checkpoint (``DIR/<run>/last/``) at
the next step boundary; one during a run's set-up (e.g. SASRec training) stops that run after its first step;
one during data preparation or a final test evaluation lets that finish and stops before the next run.
Either way :func:`run_demo` returns ``status="interrupted"`` with a one-line ``message`` naming what
finished, and running the same command again continues: finished runs with the same settings are reused, an
interrupted one resumes exactly. The demo's own handler sits under the trainer's, so during training a
second signal only repeats the request and a third one stops the process at once.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

from gflowgr_core.data.prepared import PreparedData, prepare
from gflowgr_core.train.checkpoint import is_complete
from gflowgr_core.train.config import TrainConfig, load_config
from gflowgr_core.train.signals import StopRequest
from gflowgr_core.train.trainer import RESUME_FREE_KEYS, Trainer

log = logging.getLogger("gflowgr")

TABLE_METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10")
# Key prefix of each scoring reported by the evaluation: the headline first.
SCORINGS = (("", "HF-style level log-probs (headline)"), ("renorm/", "log-probs renormalised over trie children"))

# Arguments of `prepare`: 3 x 64 RQ-KMeans codes plus a disambiguation level, histories of 20 items.
DATA = {"levels": 3, "codes": 64, "collisions": "suffix", "max_history": 20, "seed": 0, "max_users": None}
# Every run: model, batches, evaluation. Validation (model selection) reads a seeded subset of users; the
# test split is read whole, once per run.
COMMON = {
    "model.hidden": 64, "model.layers": 2, "model.heads": 2, "model.kv_heads": 2, "model.intermediate": 128,
    "model.flow_hidden": 64, "packing": True, "batch_size": 128, "eval_beams": 20, "valid_max_users": 300,
    "log_every": 5, "cm.max_epochs": 2, "cm.patience": 1, "cm.lr": 0.01, "cm.verbose": False, "cm.progress": False,
}
# SASRec (the curriculum sampler's and r_cm's model) at lr 0.01 for 2 epochs: on validation (N@10 .061) it
# beats 3 epochs at the default 1e-3 (.049) for two thirds of the time.
SFT = {"stage": "sft", "epochs": 3, "patience": 1, "lr": 3e-3, "warmup_steps": 40, "max_train_examples": 24000}
# Stage 2, identical for both methods: one epoch over the same seeded subset, in the same batches.
STAGE2 = {"epochs": 1, "patience": 1, "lr": 1e-3, "warmup_steps": 6, "max_train_examples": 8000}
METHODS = {
    "sft_continue": {"stage": "sft_continue"},
    # lambda_gfn, the reward exponent and the catalogue-scaled r_pos were chosen on validation only
    # (benchmarks/tune_demo.py, docs/reproduce.md "Tuning on validation").
    "gflowgr_tb": {"stage": "gflowgr", "gfn.objective": "tb", "gfn.n_aug": 3, "gfn.sampler": "cm_curriculum",
                   "gfn.flow_warmup_steps": 10, "gfn.lambda_gfn": 0.1, "gfn.reward.beta": 2.0,
                   "gfn.reward.r_pos_mode": "catalogue", "gfn.reward.target_share": 0.5},
}
# --quick: a smoke run of every step (CI): 200 users, a few steps per run.
QUICK_DATA = {"max_users": 200}
QUICK = {"valid_max_users": 50, "cm.max_epochs": 1, "epochs": 1, "max_train_examples": 1024,
         "gfn.flow_warmup_steps": 1, "log_every": 1}
QUICK_STAGE2 = {"max_train_examples": 512}


def _quick_warmup(settings: dict) -> int:
    """A quick run's learning-rate warm-up: a tenth of its steps (at least one), about the share of the full
    runs (SFT 40 of 563 steps, stage 2 6 of 63), so that it never outlasts the run."""
    steps = settings["epochs"] * math.ceil(settings["max_train_examples"] / settings["batch_size"])
    return max(1, steps // 10)


def _overrides(*dicts: dict) -> list[str]:
    merged: dict = {}
    for d in dicts:
        merged.update(d)
    # JSON is valid YAML: null, true/false, lists and mappings parse back to what they were.
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool, type(None))) else v}"
            for k, v in merged.items()]


def demo_configs(out: str | Path, device: str = "auto", quick: bool = False) -> dict[str, TrainConfig]:
    """The config of each run of the demo, by row name (``sft`` first; the others start from its best)."""
    out = Path(out)
    sft = {**COMMON, "data": str(out / "data"), "device": device, **SFT, "out": str(out / "sft")}
    if quick:
        sft.update(QUICK)
        sft["warmup_steps"] = _quick_warmup(sft)
    configs = {"sft": load_config(None, _overrides(sft))}
    for name in METHODS:
        configs[name] = stage2_config(out, name, device=device, quick=quick)
    return configs


def stage2_config(out: str | Path, method: str, device: str = "auto", quick: bool = False,
                  extra: Optional[dict] = None, run_dir: str | Path | None = None) -> TrainConfig:
    """The demo's config of stage-2 run ``method`` (a key of :data:`METHODS`) in demo folder ``out``, starting
    from ``out/sft/best``; ``extra`` overrides go on top (e.g. a tuning run's settings) and ``run_dir``
    replaces ``out/<method>``."""
    out = Path(out)
    settings = {**COMMON, "data": str(out / "data"), "device": device, **STAGE2, **METHODS[method]}
    if quick:
        settings.update({**QUICK, **QUICK_STAGE2})
        settings["warmup_steps"] = _quick_warmup(settings)
    settings.update({**(extra or {}), "init_checkpoint": str(out / "sft" / "best"),
                     "out": str(run_dir or out / method)})
    return load_config(None, _overrides(settings))


def budget(configs: dict[str, TrainConfig], data: PreparedData, quick: bool) -> dict:
    """What the demo trains and evaluates on, as recorded in ``metrics.json``."""
    stats = data.stats
    n_train = int(stats["num_train_examples"])
    runs = {}
    for name, cfg in configs.items():
        n = min(cfg.max_train_examples or n_train, n_train)
        runs[name] = {"stage": cfg.stage, "train_examples": n, "max_epochs": cfg.epochs, "patience": cfg.patience,
                      "batch_size": cfg.batch_size, "steps_per_epoch": -(-n // cfg.batch_size), "lr": cfg.lr,
                      "init": "sft/best" if cfg.init_checkpoint else "scratch"}
    first = configs["sft"]
    m = first.model
    return {
        "quick": quick,
        "dataset": "MovieLens-100K (recbole wheel)", "users": int(stats["num_users"]),
        "items": int(stats["num_items"]), "max_history": int(stats["max_history"]),
        "train_examples_available": n_train,
        "subset": "each run trains on a seeded random subset of the training examples (max_train_examples, "
                  f"seed {first.seed}): the same subset for sft_continue and gflowgr_tb, a part of SFT's",
        "model": f"Qwen2-style, {m.layers} layers, hidden {m.hidden}, {m.heads} heads, MLP {m.intermediate}",
        "packing": first.packing, "eval_beams": first.eval_beams, "valid_users": first.valid_max_users,
        "test_users": int(stats["num_test"]), "runs": runs,
    }


def _describe(b: dict) -> list[str]:
    lines = [f"budget: {b['dataset']}, {b['users']} users, {b['items']} items, histories of up to "
             f"{b['max_history']} items, {b['train_examples_available']} training examples; {b['model']}; "
             f"packing {'on' if b['packing'] else 'off'}; validation on {b['valid_users'] or 'all'} seeded users, "
             f"test on all {b['test_users']} users, beam {b['eval_beams']}"]
    for name, r in b["runs"].items():
        epochs = f"up to {r['max_epochs']} epochs (patience {r['patience']})" if r["max_epochs"] > 1 else "1 epoch"
        lines.append(f"  {name:<13} {r['train_examples']} examples (seeded random subset), {epochs} of "
                     f"{r['steps_per_epoch']} steps of {r['batch_size']}, lr {r['lr']}, from {r['init']}")
    return lines


def _same_run(cfg: TrainConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` was (or is being) trained with ``cfg``, up to the keys a resume may change."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return False
    # YAML round trips turn tuples into lists: compare through JSON.
    old = json.loads(json.dumps(load_config(saved).to_dict()))
    new = json.loads(json.dumps(cfg.to_dict()))
    return all(old.get(k) == v for k, v in new.items() if k not in RESUME_FREE_KEYS)


def _finished_result(cfg: TrainConfig, run_dir: Path) -> Optional[dict]:
    path = run_dir / "result.json"
    if not (path.is_file() and _same_run(cfg, run_dir)):
        return None
    result = json.loads(path.read_text())
    return result if result.get("status") == "finished" else None


def _train(cfg: TrainConfig, data: PreparedData, stop: StopRequest) -> dict:
    """``run_training`` with a stop already requested (a signal between runs) passed on to the trainer."""
    trainer = Trainer(cfg, data)
    try:
        if stop.requested:
            trainer.request_stop(stop.reason)
        return trainer.fit()
    finally:
        trainer.close()


def _row(name: str, result: dict, seed: int) -> dict:
    row = {"method": name, "seed": int(seed)}
    for prefix, _ in SCORINGS:
        row.update({prefix + m: float(result["test"][prefix + m]) for m in TABLE_METRICS})
    row.update({"epochs": int(result["epochs"]), "best_epoch": int(result["best_epoch"]),
                "steps": int(result["steps"]), "train_seconds": round(float(result["train_seconds"]), 1)})
    return row


def run_demo(out: str | Path = "runs/demo", device: str = "auto", quick: bool = False) -> dict:
    """Run (or continue) the demo in ``out``.

    Returns:
        ``metrics.json``'s content with ``status="finished"``: ``rows`` (one per method: test metrics under
        both scorings, epochs, steps, training seconds), ``budget``, ``data`` and ``eval`` (one-line
        descriptions), ``collaborative_model`` (SASRec's own test metrics), ``wall_seconds`` of this call and
        ``reused`` (runs finished by an earlier call). Or, after SIGTERM/SIGINT, ``{"status": "interrupted",
        "message", "finished", "interrupted_run", "reason"}``: ``message`` (also printed on stderr) says what
        finished and how to continue.
    """
    start = time.time()
    out = Path(out)
    command = f"gflowgr demo --out {out}" + (" --quick" if quick else "") + \
        (f" --device {device}" if device != "auto" else "")
    with StopRequest() as stop:  # a signal outside training: finish the current step, stop before the next run
        data = _prepared(out / "data", quick)
        configs = demo_configs(out, device=device, quick=quick)
        b = budget(configs, data, quick)
        print("\n".join(_describe(b)), flush=True)
        results: dict[str, dict] = {}
        reused: list[str] = []
        trained = False  # a run trained in this call: the runs after it start from its checkpoint afresh
        for name, cfg in configs.items():
            run_dir = Path(cfg.out)
            done = None if trained else _finished_result(cfg, run_dir)
            if done is not None:
                print(f"{name}: finished earlier with these settings, reusing {run_dir / 'result.json'}")
                results[name] = done
                reused.append(name)
                continue
            if stop.requested:
                return _interrupted(command, results, run_dir, stop.reason, started=False)
            cfg.resume = not trained and is_complete(run_dir / "last") and _same_run(cfg, run_dir)
            trained = True
            if cfg.resume:
                print(f"{name}: resuming from {run_dir / 'last'}")
            result = _train(cfg, data, stop)
            if result["status"] != "finished":
                return _interrupted(command, results, run_dir, result.get("reason"), started=True)
            results[name] = result
        if stop.requested:  # the signal came during the last run's test evaluation: that run finished
            log.info("%s received after the last run finished: writing the results", stop.reason)
    rows = [_row(name, r, configs[name].seed) for name, r in results.items()]
    metrics = {
        "status": "finished",
        "data": (f"MovieLens-100K, {b['users']} users, {b['items']} items; each run on a seeded random subset of "
                 f"the {b['train_examples_available']} training examples ("
                 + ", ".join(f"{n} {r['train_examples']}" for n, r in b["runs"].items()) + ")"),
        "eval": (f"test split, all {b['test_users']} users, trie-constrained beam search (beam {b['eval_beams']}); "
                 "headline: HF-style level log-probs; renorm/: log-probs renormalised over trie children"),
        "budget": b, "rows": rows,
        "collaborative_model": (results["gflowgr_tb"].get("collaborative_model") or {}).get("test"),
        "wall_seconds": round(time.time() - start, 1), "reused": reused,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_table(rows))
    cm = metrics["collaborative_model"] or {}
    if cm:
        print(f"collaborative model (SASRec, the reward's teacher, full-catalogue scores): test recall@10 "
              f"{cm.get('recall@10', float('nan')):.4f}, ndcg@10 {cm.get('ndcg@10', float('nan')):.4f}")
    plot_demo(out, rows, quick=quick)
    print(f"wrote {out / 'metrics.json'} and {out / 'demo.png'} ({metrics['wall_seconds']:.0f} s)")
    return metrics


def _prepared(data_dir: Path, quick: bool) -> PreparedData:
    """The demo's prepared MovieLens-100K in ``data_dir``: loaded when it was prepared with these settings."""
    settings = {**DATA, **(QUICK_DATA if quick else {})}
    stats_path = data_dir / "stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if stats.get("max_history") == settings["max_history"] and stats.get("max_users") == settings["max_users"] \
                and stats.get("sid_codes_per_level", [None])[0] == settings["codes"]:
            data = PreparedData.load(data_dir)
            print(f"MovieLens-100K: prepared earlier in {data_dir}")
            return data
        print(f"{data_dir} was prepared with other settings: preparing it again")
    data = prepare("ml100k", None, data_dir, **settings)
    print(f"MovieLens-100K: {data.stats['num_users']} users, {data.stats['num_items']} items, "
          f"{data.stats['num_train_examples']} training examples, SID levels {data.stats['sid_codes_per_level']}")
    return data


def _interrupted(command: str, results: dict, run_dir: Path, reason: Optional[str], started: bool) -> dict:
    """The one-line account of a stopped demo (printed on stderr) and the summary :func:`run_demo` returns."""
    run = run_dir.name
    where = f"during {run} (its resumable state is in {run_dir / 'last'})" if started else f"before {run} started"
    message = (f"demo interrupted ({reason or 'stop requested'}) {where}; finished: {', '.join(results) or 'no run'}; "
               f"run `{command}` again to continue")
    print(message, file=sys.stderr, flush=True)
    return {"status": "interrupted", "message": message, "finished": list(results), "interrupted_run": run,
            "reason": reason}


def format_table(rows: list[dict]) -> str:
    """The printed result: one block per scoring, one line per method."""
    lines = []
    for prefix, label in SCORINGS:
        lines += ["", f"test metrics, {label}:",
                  f"{'method':<14}" + "".join(f"{m:>13}" for m in TABLE_METRICS)]
        lines += [f"{r['method']:<14}" + "".join(f"{r[prefix + m]:>13.4f}" for m in TABLE_METRICS) for r in rows]
    return "\n".join(lines)


def _train_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec and "ce" in rec:  # the positive's CE: the term every method has, comparable
            steps.append(rec["step"])
            losses.append(rec["ce"])
    return steps, losses


def _valid_curve(run_dir: Path, metric: str = "ndcg@10") -> tuple[list[int], list[float]]:
    """The validation ``metric`` at each evaluated epoch of a run (its log's epoch records)."""
    steps, values = [], []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line).get("eval", {})
        if metric in rec.get("valid", {}):
            steps.append(rec["step"])
            values.append(rec["valid"][metric])
    return steps, values


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values: the trend of a noisy per-step loss."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


LABELS = {"sft": "SFT (CE)", "sft_continue": "continued SFT (CE)", "gflowgr_tb": "GFlowGR-TB (CE + TB)"}
COLORS = {"sft": "tab:gray", "sft_continue": "tab:blue", "gflowgr_tb": "tab:orange"}
# Where the stage-2 curves coincide (e.g. while GFlowGR's flow warm-up trains only log Z / log F), the dashed
# line on top lets the solid one show through.
LINESTYLES = {"gflowgr_tb": "--"}
BAR_METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")  # coverage has its own panel: another scale


def demo_figure(out: Path, rows: list[dict], quick: bool = False):
    """The demo's figure (a matplotlib ``Figure``) from the runs' logs in ``out/<method>/log.jsonl`` and the test
    ``rows``: SFT's training CE and validation NDCG@10; the stage-2 runs' CE over their own steps, with their
    validation NDCG@10 in the legend; the headline test metrics and, on its own axis, coverage@10, with the value
    on every bar. The title names the seeds of the runs that finished (the rows), not the planned ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ((ax_sft, ax_stage2), (ax_bar, ax_cov)) = plt.subplots(2, 2, figsize=(13, 9),
                                                                 gridspec_kw={"width_ratios": [1.5, 1]})
    names = [row["method"] for row in rows]
    for name in names:
        steps, losses = _train_curve(out / name)
        valid_steps, valid = _valid_curve(out / name)
        if name == "sft":
            ax_sft.plot(steps, losses, color=COLORS["sft"], marker="o" if len(steps) < 20 else None,
                        label="training CE of the positive")
            if valid:  # validation NDCG@10 per epoch on its own axis: another scale than the loss
                ax_valid = ax_sft.twinx()
                ax_valid.plot(valid_steps, valid, color="tab:green", marker="s", label="validation NDCG@10")
                ax_valid.set_ylabel("validation NDCG@10", color="tab:green")
                for x, y in zip(valid_steps, valid):
                    ax_valid.annotate(f"{y:.4f}", (x, y), textcoords="offset points", xytext=(0, 6),
                                      ha="center", fontsize=8, color="tab:green")
                handles = ax_sft.get_legend_handles_labels()
                extra = ax_valid.get_legend_handles_labels()
                ax_sft.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right")
            continue
        # Raw per-step CE faint, its trend bold: the two stage-2 runs cross often and would hide each other.
        label = LABELS.get(name, name) + (f", valid NDCG@10 {valid[-1]:.4f}" if valid else "")
        color = COLORS.get(name)
        ax_stage2.plot(steps, losses, color=color, alpha=0.3, linewidth=1)
        ax_stage2.plot(steps, _moving_average(losses, max(1, len(steps) // 8)), color=color, linewidth=2,
                       linestyle=LINESTYLES.get(name, "-"), marker="o" if len(steps) < 20 else None, label=label)
    ax_sft.set_xlabel("SFT step")
    ax_sft.set_ylabel("training cross-entropy of the positive")
    ax_sft.set_title("stage 1: SFT from scratch")
    ax_stage2.set_xlabel("stage-2 step (both runs start from SFT's best checkpoint)")
    ax_stage2.set_ylabel("training cross-entropy of the positive")
    for ax in (ax_sft, ax_stage2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax_stage2.set_title("stage 2: same examples, batches and steps")
    if len(names) > 1:
        ax_stage2.legend(fontsize=8)

    width = 0.8 / len(rows)
    for ax, metrics in ((ax_bar, BAR_METRICS), (ax_cov, ("coverage@10",))):
        xs = range(len(metrics))
        for i, row in enumerate(rows):
            bars = ax.bar([x + (i - (len(rows) - 1) / 2) * width for x in xs], [row[m] for m in metrics], width,
                          label=LABELS.get(row["method"], row["method"]), color=COLORS.get(row["method"]))
            ax.bar_label(bars, fmt="%.4f", fontsize=7, padding=2)  # the printed table's precision
        ax.set_xticks(list(xs), metrics)
        ax.margins(y=0.15)  # room for the value labels above the tallest bar
    ax_bar.set_title("test metrics (trie-constrained beam search, headline scoring)")
    ax_bar.legend(fontsize=8, loc="upper left")
    ax_cov.set_title("test coverage@10 (catalogue share)")
    seeds = sorted({row["seed"] for row in rows if "seed" in row})
    fig.suptitle(f"gflowgr demo, MovieLens-100K{' (--quick)' if quick else ''}: seed"
                 f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds)) or 'unknown'} finished for "
                 f"{', '.join(names)}")
    fig.tight_layout()
    return fig


def plot_demo(out: Path, rows: list[dict], quick: bool = False) -> Path:
    """:func:`demo_figure` written as ``out/demo.png``."""
    import matplotlib.pyplot as plt

    fig = demo_figure(out, rows, quick=quick)
    path = out / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
