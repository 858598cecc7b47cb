"""How much of a GFlowGR batch's branch tokens a prefix-merged (trie) layout would save, on full Beauty.

The packed layout gives every trajectory its own branch tokens ``c_1 .. c_{L-1}``. Trajectories of one example
whose SIDs share a prefix could share those tokens' hidden states (the same visible tokens, the same
positions). This counts, for batches drawn by the GFlowGR-TB stage with the CM curriculum sampler (the
positive and 3 augmentations, as in ``bench_train_step.py --epoch``), the branch tokens of the packed layout
and the distinct (example, prefix) pairs a merged layout would need, at several points of the curriculum
(``--progress``: the sampler picks easy, low-CM-score items at 0 and hard ones at 1). The CM (SASRec) trains for
``--cm-epochs`` epochs, 1 by default as in ``bench_train_step.py``; a better-trained CM may pick items that share
prefixes more often.

    python benchmarks/bench_branch_sharing.py --data /tmp/beauty_prep --cm-epochs 100 \
        --out benchmarks/results/branch_sharing_trained_cm_cpu.json    # CM trained to early stopping

    python benchmarks/bench_branch_sharing.py --data /tmp/beauty_prep     # results/branch_sharing_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import MODELS, make_trainer  # noqa: E402
from common import RESULTS_DIR, environment, log, write_json  # noqa: E402

from gflowgr_core.data.prepared import PreparedData  # noqa: E402
from gflowgr_core.data.windows import window_order  # noqa: E402
from gflowgr_core.train.checkpoint import save_policy  # noqa: E402


def branch_counts(codes: torch.Tensor) -> tuple[int, int]:
    """``(branch tokens, distinct (example, prefix) pairs)`` of trajectories ``codes[B, T, L]``."""
    B, T, L = codes.shape
    example = torch.arange(B)[:, None].expand(B, T).reshape(-1, 1)
    distinct = sum(int(torch.unique(torch.cat([example, codes[:, :, :level].reshape(-1, level)], 1), dim=0).shape[0])
                   for level in range(1, L))
    return B * T * (L - 1), distinct


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared Beauty folder (gflowgr prepare)")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--cm-epochs", type=int, default=1,
                   help="SASRec epochs at most (early stopping may end it sooner; default 1)")
    p.add_argument("--progress", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                   help="training progress values at which the curriculum sampler draws (default 0 0.5 1)")
    p.add_argument("--out", default=str(RESULTS_DIR / "branch_sharing_cpu.json"))
    args = p.parse_args(argv)
    env = environment("cpu")
    data_dir = Path(args.data)
    data = PreparedData.load(data_dir)
    batch = 1024
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = MODELS["qwen2_1.3M"]
        sft = make_trainer(data_dir, data, model, "sft", batch, "cpu", "float32", work / "sft", None)
        init = save_policy(sft.policy, work / "init")
        gfn = make_trainer(data_dir, data, model, "gflowgr_tb_cm_curriculum", batch, "cpu", "float32", work / "gfn",
                           init, [f"cm.max_epochs={args.cm_epochs}"])
        order = window_order(gfn.train_index, gfn.windows, torch.Generator().manual_seed(0))
        report = gfn.cm_report or {}
        cm = {k: report.get(k) for k in ("best_epoch", "epochs_run", "valid", "test")}
        log(f"CM: {cm}")
        rows = []
        for progress in args.progress:
            gfn.stage.sampler.set_progress(progress)
            for i in range(args.batches):
                trajectories = gfn.stage.draw(gfn.ctx, gfn.batch(order[i * batch:(i + 1) * batch]), gfn.generator)
                tokens, distinct = branch_counts(trajectories.codes.cpu())
                rows.append({"progress": progress, "batch": i, "examples": trajectories.num_examples,
                             "trajectories_per_example": trajectories.per_example, "branch_tokens": tokens,
                             "distinct_prefixes": distinct, "saved_share": 1 - distinct / tokens})
                log(f"progress {progress} batch {i}: {tokens} branch tokens, {distinct} distinct prefixes")
    summary = {}
    for progress in args.progress:
        at = [r for r in rows if r["progress"] == progress]
        total, distinct = sum(r["branch_tokens"] for r in at), sum(r["distinct_prefixes"] for r in at)
        summary[f"progress_{progress:g}"] = {"branch_tokens": total, "distinct_prefixes": distinct,
                                             "saved_share": 1 - distinct / total}
    payload = {**env, "data": str(data_dir), "sampler": "cm_curriculum", "n_aug": 3, "batch_size": batch,
               "cm_max_epochs": args.cm_epochs, "cm": cm, "rows": rows, "summary": summary}
    write_json(Path(args.out), payload)
    for key, value in summary.items():
        print(f"{env['device']}: {key}, {args.batches} batches of {batch}: a prefix-merged layout would save "
              f"{value['saved_share']:.2%} of the branch tokens")
    print(f"-> {args.out}")
    return payload


if __name__ == "__main__":
    main()
