"""The ``gflowgr`` command line: prepare data, train a stage, evaluate a checkpoint, run the demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from gflowgr_core.data.formats import FORMATS


def _prepare(args: argparse.Namespace) -> int:
    from gflowgr_core.data.prepared import prepare

    data = prepare(args.format, args.path, args.out, levels=args.levels, codes=args.codes,
                   collisions=args.collisions, kcore=args.kcore, max_history=args.max_history,
                   embeddings=args.embeddings, seed=args.seed, max_users=args.max_users,
                   user_col=args.user_col, item_col=args.item_col, time_col=args.time_col)
    keys = ("num_users", "num_items", "num_interactions", "items_without_interactions", "num_train_examples",
            "num_valid", "num_test", "dropped_users", "sid_levels", "sid_codes_per_level", "sid_collisions",
            "trie_nodes_per_level")
    print(json.dumps({k: data.stats[k] for k in keys}, indent=2))
    print(f"prepared dataset written to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from gflowgr_core.train.config import load_config
    from gflowgr_core.train.trainer import run_training, summary_table

    if args.print_config:  # the merged config of this command line, as a YAML file would hold it; no run
        import yaml

        config = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    config = load_config(args.config, args.overrides, device_check=True)
    result = run_training(config)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel run: rank 0 reports for all
        return 0
    # A clean, resumable stop (SIGTERM/SIGINT) also exits 0; its message says how to continue.
    if args.json:  # for scripts: the summary result.json holds, on stdout
        print(json.dumps(result, indent=2))
        if result.get("status") == "interrupted":
            print(result["message"], file=sys.stderr)
    else:
        print(summary_table(result))
    return 0


# Metrics of the printed `gflowgr eval` table (the JSON, --json or --out, has every key).
EVAL_TABLE_METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "coverage@10")


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gflowgr_core.evaluation import checkpoint_data_dir, evaluate_checkpoint
    from gflowgr_core.train.checkpoint import COMPLETE_MARKER

    data_dir = checkpoint_data_dir(args.checkpoint, args.data)
    metrics = evaluate_checkpoint(args.checkpoint, split=args.split, data=data_dir, beams=args.beams,
                                  device=args.device)
    # The file names what was evaluated, so that a metrics file found later still says what it measures.
    marker = Path(args.checkpoint) / COMPLETE_MARKER
    saved = json.loads(marker.read_text()) if marker.is_file() else {}
    report = {"split": args.split, "checkpoint": str(Path(args.checkpoint).resolve()),
              "checkpoint_step": saved.get("step"), "checkpoint_epoch": saved.get("epoch"),
              "data": str(Path(data_dir).resolve()), "beams": args.beams, "users": int(metrics["num_examples"]),
              "metrics": metrics}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.split} split of {report['data']}, {report['users']} users, checkpoint {report['checkpoint']}, "
          f"beam {args.beams}")
    print(f"{'scoring':<10}" + "".join(f"{m:>13}" for m in EVAL_TABLE_METRICS))
    for prefix, name in (("", "headline"), ("renorm/", "renorm")):
        print(f"{name:<10}" + "".join(f"{metrics[prefix + m]:>13.4f}" for m in EVAL_TABLE_METRICS))
    if args.out:
        print(f"metrics written to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gflowgr_core.demo import run_demo

    result = run_demo(args.out, device=args.device, quick=args.quick)
    # An interrupted demo has printed what finished and how to resume; its exit status says it stopped.
    return 0 if result["status"] == "finished" else 1


def _version() -> str:
    """The installed distribution's version (the package's own when it runs from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gflowgr")
    except PackageNotFoundError:
        from gflowgr_core import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gflowgr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="load interactions, split, build SIDs and the trie; write DIR")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="letter: X.inter.json + X.index.json; p5: user_sequence.txt; csv: one (user, item[, time]) "
                        "event per row; minionerec: train/valid/test.csv rows (history_item_id + item_id) + "
                        "X.index.json; ml100k: MovieLens-100K from the recbole wheel")
    p.add_argument("--path", default=None, help="data file or folder (not needed for ml100k)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--levels", type=int, default=None,
                   help="SID levels built by RQ-KMeans (default 3; letter/minionerec read theirs from the index)")
    p.add_argument("--codes", type=int, default=None,
                   help="codes per level built by RQ-KMeans (default 256; letter/minionerec: from the index)")
    p.add_argument("--user-col", default=None, help="csv: the user column (default: user_id, user, uid, ...)")
    p.add_argument("--item-col", default=None, help="csv: the item column (default: item_id, item, asin, ...)")
    p.add_argument("--time-col", default=None,
                   help="csv: the timestamp column (default: timestamp, time, date, ...; none: file order)")
    p.add_argument("--collisions", choices=("share", "suffix"), default=None,
                   help="colliding SIDs: share a leaf, or get a disambiguating level "
                        "(default: share for letter, suffix for built SIDs)")
    p.add_argument("--kcore", type=int, default=0, help="k-core filter (0 = off, for pre-filtered data)")
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--embeddings", default=None, help=".npy item embeddings (default: from interactions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-users", type=int, default=None, help="keep only the first N users (quick runs)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="run one training stage from a YAML config")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. gfn.n_aug=5 stage=gflowgr (every key: docs/config.md)")
    p.add_argument("--print-config", action="store_true",
                   help="print the merged config (defaults, file, overrides) as YAML and exit without training")
    p.add_argument("--json", action="store_true",
                   help="print the result summary (out/result.json) as JSON instead of the end-of-run table")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint with trie-constrained beam search")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--data", default=None, help="prepared data folder (default: the one the run used)")
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None,
                   help="write the metrics as JSON to this file, with the split, checkpoint and data they measure")
    p.add_argument("--json", action="store_true", help="print that JSON instead of the table")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="MovieLens-100K: SFT then GFlowGR-TB, table + metrics.json + plot")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel workers: only rank 0 reports progress
        level = logging.WARNING
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as exc:
        if args.verbose:
            raise
        # A bad file, folder, value or config key: the message says what and where; no traceback.
        print(f"gflowgr {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from gflowgr_core.data.loaders import DataError
    from gflowgr_core.train.config import ConfigError

    return (ConfigError, DataError, FileNotFoundError, NotADirectoryError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
