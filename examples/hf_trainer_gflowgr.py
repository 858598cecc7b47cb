"""GFlowGR with the Hugging Face Trainer on a slice of Amazon Beauty (LETTER SIDs); runs on a CPU in minutes.

Stage 1 trains SFT, stage 2 fine-tunes the SFT checkpoint with CE + TB over the positive and augmented
items (CM-curriculum sampler, reward r_a + r_cm + r_sim). Both stages are ``GFlowGRTrainer`` runs; the
loss, sampler and reward are the library's own.

    python examples/hf_trainer_gflowgr.py                   # $GFLOWGR_DATA/letter/Beauty, a few minutes on CPU
    python examples/hf_trainer_gflowgr.py --smoke           # a handful of steps (well under a minute)
    python examples/hf_trainer_gflowgr.py --data ../shared/data/letter/Beauty --out runs/hf_example
    python examples/hf_trainer_gflowgr.py --pretrained /path/to/smollm2 --lora-r 8 \\
        --template "A user bought: {history} Next:"     # a pretrained LM (see docs/pretrained.md)
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/hf_trainer_gflowgr.py --out runs/hf_fsdp

Training runs on the GPU when CUDA is available (under ``accelerate launch``: one GPU per rank), on the CPU otherwise,
with ``--cpu``, and always with ``--smoke``. Under a multi-process launch only the main process (rank 0) prints and
logs at INFO; it prepares the data folder while the other ranks wait at a barrier, then they load it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
from pathlib import Path

import torch

from gflowgr_core.data.prepared import PreparedData, prepare
from gflowgr_core.hf_trainer import GFlowGRConfig, GFlowGRTrainer
from gflowgr_core.train.distributed import leave_process_group

DEFAULT_DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "letter" / "Beauty"
TINY_MODEL = ["model.hidden=64", "model.layers=2", "model.heads=2", "model.kv_heads=2", "model.intermediate=128",
              "model.flow_hidden=32"]
FAST_CM = ["cm.dim=32", "cm.num_blocks=1", "cm.max_epochs=5", "cm.progress=false", "cm.verbose=false",
           "gfn.curriculum_pool=50", "gfn.curriculum_random=20"]


def process_rank() -> int:
    """This process's global rank: ``torch.distributed``'s once a process group exists, else ``$RANK`` (set by
    ``accelerate launch`` / ``torchrun`` before anything is initialised), else 0 (a plain script)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """Rank 0: the one process of a launch that prints (and prepares the data folder first)."""
    return process_rank() == 0


def say(*parts) -> None:
    """``print`` on the main process only: every rank of a launch runs this script."""
    if is_main_process():
        print(*parts, flush=True)


def use_cpu(args: argparse.Namespace) -> bool:
    """Train on the CPU with ``--cpu`` or ``--smoke``, or when CUDA is not available; else on the GPU(s)."""
    return bool(args.cpu or args.smoke or not torch.cuda.is_available())


def load_or_prepare(config, source: str, data_dir: Path, max_users: int) -> PreparedData:
    """The prepared data folder: the main process prepares it (unless already there) while the other ranks
    wait at a barrier (``config.main_process_first``, a no-op in one process), then they load what it wrote."""
    with config.main_process_first(local=False, desc="prepare the data folder"):
        if (data_dir / "stats.json").exists():
            return PreparedData.load(data_dir)
        return prepare("letter", source, data_dir, max_users=max_users)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="LETTER Beauty folder (Beauty.inter.json)")
    parser.add_argument("--out", default="runs/hf_example")
    parser.add_argument("--users", type=int, default=500, help="first N users of the file (the slice)")
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--gfn-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrained", default=None, help="local HF checkpoint folder instead of a tiny LM")
    parser.add_argument("--template", default=None, help="prompt template with {history} (pretrained LMs)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: train every weight)")
    parser.add_argument("--lr", type=float, default=None, help="default 3e-3 (tiny LM) or 1e-4 (pretrained)")
    parser.add_argument("--smoke", action="store_true", help="a handful of steps on a small slice (seconds, CPU)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    if not (Path(args.data) / "Beauty.inter.json").is_file():
        raise SystemExit(f"{args.data} has no Beauty.inter.json: pass --data or set GFLOWGR_DATA")
    eval_users, eval_beams, fast_cm = 100, 10, FAST_CM
    if args.smoke:
        args.users, args.sft_steps, args.gfn_steps, args.batch_size = 60, 3, 2, 8
        eval_users, eval_beams, fast_cm = 8, 5, [*FAST_CM, "cm.max_epochs=1"]

    out = Path(args.out)
    data_dir = out / "data"
    lr = args.lr if args.lr is not None else (1e-4 if args.pretrained else 3e-3)
    model = [] if args.pretrained else TINY_MODEL
    common = dict(data_dir=str(data_dir), per_device_train_batch_size=args.batch_size, learning_rate=lr,
                  warmup_steps=5, logging_steps=10, report_to="none", use_cpu=use_cpu(args),
                  eval_max_users=eval_users, eval_beams=eval_beams, save_strategy="no", lora_r=args.lora_r,
                  prompt_template=args.template)

    sft_config = GFlowGRConfig(output_dir=str(out / "sft"), stage="sft", max_steps=args.sft_steps,
                               pretrained=args.pretrained, gflowgr_overrides=model, **common)
    data = load_or_prepare(sft_config, args.data, data_dir, args.users)
    sft = GFlowGRTrainer(sft_config, data)
    sft.train()
    sft_valid = sft.evaluate()
    say("SFT valid:", json.dumps({k: round(v, 4) for k, v in sft_valid.items()}))
    sft.save_model(str(out / "sft" / "final"))

    # The SFT checkpoint carries the template and merged weights; stage 2 adds fresh adapters when asked.
    common["prompt_template"] = None
    gfn = GFlowGRTrainer(GFlowGRConfig(output_dir=str(out / "gflowgr"), stage="gflowgr", max_steps=args.gfn_steps,
                                       init_checkpoint=str(out / "sft" / "final"), objective="tb", n_aug=3,
                                       gfn_sampler="cm_curriculum", gflowgr_overrides=fast_cm, **common), data)
    gfn.train()
    gfn_valid = gfn.evaluate()
    say("GFlowGR valid:", json.dumps({k: round(v, 4) for k, v in gfn_valid.items()}))
    final = out / "gflowgr" / "final"
    gfn.save_model(str(final))
    command = f"gflowgr eval --checkpoint {shlex.quote(str(final))} --data {shlex.quote(str(data_dir))} --split test"
    say(f"checkpoints in {out}; evaluate on test with:\n  {command}")
    return {"sft_valid": sft_valid, "gflowgr_valid": gfn_valid, "checkpoint": str(final), "eval_command": command}


if __name__ == "__main__":
    main()
    leave_process_group()  # under `accelerate launch`: leave the group while the interpreter is whole
