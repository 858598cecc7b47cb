"""Committed records of the quality grid's finished runs, so a grid survives the machine it ran on.

Run folders live outside the repository (``--root``) and are lost with the machine. After a run finishes, its
record goes under ``benchmarks/results/<results stem>_runs/<name>_seed<S>/`` and is committed with the results
JSON: ``result.json``, ``env.json``, ``config.yaml``, ``ranks.npz`` (each test user's rank of the held-out item
under both scorings, for the paired tests), ``valid_ranks.npz`` (the same for the best epoch's validation users,
for the tuning's paired tests), ``sasrec.json`` (the collaborative model's own report, when the run
trained one) and, for SFT only, its ``best/`` checkpoint (~6 MB: the start of every stage-2 run) with a
``best.sha256`` manifest. On a new machine :func:`restore_run` puts a record back into its run folder (the
checkpoint only after its hashes match), so finished runs are skipped and stage 2 starts from the same SFT.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from quality_stats import load_ranks, save_ranks

RECORD_FILES = ("result.json", "env.json", "config.yaml")
MAX_CHECKPOINT_BYTES = 10 * 2 ** 20


def records_root(results_path: Path) -> Path:
    """``quality_beauty_cpu.json`` -> ``quality_beauty_cpu_runs/``."""
    return results_path.with_name(f"{results_path.stem}_runs")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_digest(folder: Path) -> str:
    """One SHA-256 over every file of a checkpoint folder (names and contents): which SFT a stage-2 run started
    from, comparable between a run folder and its committed record."""
    return hashlib.sha256(json.dumps(_manifest(folder), sort_keys=True).encode()).hexdigest()


def archive_run(out: Path, record: Path, keep_checkpoint: bool,
                sasrec: Optional[dict] = None) -> None:
    """Copy a finished run's record from ``out`` to ``record``, its per-user ranks included (again only when its
    result changed)."""
    if (record / "result.json").exists() and \
            (record / "result.json").read_bytes() == (out / "result.json").read_bytes():
        return
    record.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (out / name).exists():
            shutil.copyfile(out / name, record / name)
    for split, (_, kept) in RANK_FILES.items():  # this run's ranks, never an earlier run's of the same name
        (record / kept).unlink(missing_ok=True)
        run_ranks(out, record, split=split)
    if sasrec is not None:
        (record / "sasrec.json").write_text(json.dumps(sasrec, indent=1, default=str) + "\n")
    if keep_checkpoint:
        best = out / "best"
        if not best.is_dir():
            raise SystemExit(f"{out} finished without a best/ checkpoint, which every stage-2 run starts from")
        size = sum(p.stat().st_size for p in best.rglob("*") if p.is_file())
        if size > MAX_CHECKPOINT_BYTES:
            raise SystemExit(f"{best} holds {size / 2 ** 20:.1f} MB, over the {MAX_CHECKPOINT_BYTES // 2 ** 20} MB a "
                             f"committed checkpoint may take: keep it elsewhere and retrain it on a new machine")
        if (record / "best").exists():
            shutil.rmtree(record / "best")
        shutil.copytree(best, record / "best")
        (record / "best.sha256").write_text(json.dumps(_manifest(record / "best"), indent=1) + "\n")


def restore_run(out: Path, record: Path) -> bool:
    """Put a committed record back into the run folder ``out`` when that run is not finished there.

    Returns whether it restored. A checkpoint is restored only when every file matches its manifest hash;
    a mismatch raises (a corrupted or hand-edited record must not silently seed stage 2). Only a missing run
    folder is restored (a new machine): a folder here is this machine's run, finished, interrupted (a
    retraining stopped with its session resumes from its ``last/``) or still training (another process may be
    writing it), and its record must not overwrite it."""
    if out.exists() or not (record / "result.json").exists():
        return False
    if (record / "best").exists():
        want = json.loads((record / "best.sha256").read_text())
        have = _manifest(record / "best")
        if have != want:
            bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise SystemExit(f"{record / 'best'}: files {bad} do not match {record / 'best.sha256'}; the committed "
                             f"checkpoint is damaged (git checkout it again, or delete the record to retrain)")
        out.mkdir(parents=True)
        shutil.copytree(record / "best", out / "best")
    out.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (record / name).exists():
            shutil.copyfile(record / name, out / name)
    return True


# split -> (the run's own ranks file, relative to its folder; the record's copy)
RANK_FILES = {"test": ("test_ranks.pt", "ranks.npz"), "valid": ("best/valid_ranks.pt", "valid_ranks.npz")}


def run_ranks(out: Path, record: Path, evaluate: Optional[Callable[[Path], dict]] = None,
              split: str = "test") -> Optional[dict]:
    """The run's per-user ranks on ``split`` (``{"headline": int64[n], "renorm/": ...}``; validation: the best
    epoch's, on the run's validation users): from the run's own file (``out/test_ranks.pt``,
    ``out/best/valid_ranks.pt``; then saved into the record), else the record's copy (``ranks.npz``,
    ``valid_ranks.npz``), else ``evaluate(best_dir)`` when the run's checkpoint is at hand (runs finished before
    ranks were saved); ``None`` when none of them is."""
    import numpy as np
    import torch

    own, kept = RANK_FILES[split]
    if (out / own).exists():
        ranks = {k: v.numpy().astype(np.int64) for k, v in torch.load(out / own)["ranks"].items()}
        if not (record / kept).exists():
            save_ranks(record / kept, ranks)
        return ranks
    if (record / kept).exists():
        return load_ranks(record / kept)
    if evaluate is not None and (out / "best").exists():
        ranks = evaluate(out / "best")
        save_ranks(record / kept, ranks)
        return ranks
    return None


def saved_sasrec(record: Path) -> Optional[dict]:
    """The collaborative model's report kept in the record, ``None`` when there is none."""
    path = record / "sasrec.json"
    return json.loads(path.read_text()) if path.exists() else None
