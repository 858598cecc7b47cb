"""MiniOneRec-format data through TRL: GRPO with SID log-probs and trie-constrained rollouts, then GFlowNet
fine-tuning with the same reward functions, then constrained beam search with an invalid-item count.

    python examples/minionerec_grpo_gflownet.py                # $GFLOWGR_DATA/minionerec/Office_Products
    python examples/minionerec_grpo_gflownet.py --smoke        # seconds
    python examples/minionerec_grpo_gflownet.py --data DIR     # a folder with X.index.json and CSV splits

Reads MiniOneRec's files as they are: ``*.index.json`` (``{"item_id": ["<a_60>", "<b_159>", "<c_203>"]}``) and
the split CSVs (``history_item_sid``: a Python-literal list of SID strings; ``item_sid``: the target). Training
prompts come from ``train.csv`` (``valid.csv`` when the folder has no train split, as in the public sample),
evaluation from ``test.csv`` (else ``valid.csv``). Prompts use MiniOneRec's RL template. The model is a tiny Qwen2
from config over a word-level tokenizer with the SID tokens added (no download); swap in your SFT checkpoint
and its tokenizer for real runs (docs/use_from_trl.md).

Printed at the end: Recall/NDCG@K of the constrained beam search and the number of beams that are not catalogue
items (always 0 with the constraint; the same search without it is shown for comparison).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from ast import literal_eval
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gflowgr_core.integrations.trl import (GFlowNetConfig, GFlowNetTrainer, SIDGRPOTrainer,  # noqa: E402
                                           SIDVocabulary, remove_constrained_generation, sid_codes_from_strings)
from gflowgr_core.model.policy import build_tiny_causal_lm  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("GFLOWGR_DATA", ROOT.parent / "shared" / "data")) / "minionerec" / \
    "Office_Products"
#: MiniOneRec's RL prompt (SidDataset): the history's SID strings in a sentence, the answer after "Response:".
PROMPT = ("### User Input: \nThe user has interacted with items {history} in chronological order. "
          "Can you predict the next possible item that the user may expect?\n\n### Response:\n")


def read_split(path: Path, limit: int | None = None) -> list[dict]:
    """Rows of a MiniOneRec split CSV as ``{"prompt", "target", "history"}`` (errors name the file and line)."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                history = literal_eval(row["history_item_sid"])
                target = row["item_sid"].strip()
            except (KeyError, ValueError, SyntaxError) as exc:
                raise SystemExit(f"{path}:{line}: expected history_item_sid (a list literal) and item_sid: {exc}")
            out.append({"prompt": PROMPT.format(history=", ".join(history)), "target": target,
                        "history": history})
            if limit is not None and len(out) >= limit:
                break
    return out


def build_tokenizer(rows: list[dict], index_path: Path):
    """A word-level tokenizer over the prompt words, plus every SID token of the index (added tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2}
    for word in PROMPT.replace("{history}", "").replace(":", " : ").replace("?", " ? ").replace(".", " . ").split():
        vocab.setdefault(word, len(vocab))
    vocab.setdefault(",", len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    hf.padding_side = "left"
    return hf


def exact_match_reward(completions, target, **_):
    """MiniOneRec's rule reward: 1 when the completion is the target item's SID, else 0."""
    got = sid_codes_from_strings(completions)
    want = sid_codes_from_strings(target)
    return (got == want).all(1).float().tolist()


def prefix_reward(completions, target, **_):
    """0.1 per leading SID level shared with the target (a dense signal for a tiny model)."""
    got = sid_codes_from_strings(completions)
    want = sid_codes_from_strings(target)
    return (0.1 * (got == want).long().cumprod(1).sum(1).float()).tolist()


@torch.no_grad()
def evaluate(model, tok, vocab: SIDVocabulary, rows: list[dict], catalogue: set[str], beams: int, k: int,
             constrained: bool = True, batch: int = 16) -> dict:
    """Beam search (``num_beams = num_return_sequences = beams``), MiniOneRec style: decode, check each beam
    against the catalogue's SID strings, Recall/NDCG@k of the target among the first k valid beams."""
    model.eval()
    hits = ndcg = 0.0
    invalid = total = 0
    for start in range(0, len(rows), batch):
        part = rows[start:start + batch]
        enc = tok([r["prompt"] for r in part], return_tensors="pt", padding=True)
        P = enc["input_ids"].shape[1]
        procs = [vocab.processor(prompt_length=P)] if constrained else []
        out = model.generate(**enc, num_beams=beams, num_return_sequences=beams, do_sample=False,
                             max_new_tokens=vocab.num_levels + 1, logits_processor=procs, length_penalty=0.0,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, P:], skip_special_tokens=True)
        for i, r in enumerate(part):
            ranked = []
            for text in texts[i * beams:(i + 1) * beams]:
                total += 1
                sid = "".join(text.split())
                if sid not in catalogue:
                    invalid += 1
                elif sid not in ranked:
                    ranked.append(sid)
            if r["target"] in ranked[:k]:
                pos = ranked.index(r["target"])
                hits += 1
                ndcg += 1.0 / math.log2(pos + 2)
    n = max(len(rows), 1)
    return {f"recall@{k}": hits / n, f"ndcg@{k}": ndcg / n, "invalid_items": invalid, "beams_total": total}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with *.index.json and split CSVs")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a few rows (seconds)")
    ap.add_argument("--train-rows", type=int, default=512)
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--gfn-steps", type=int, default=40)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="completions per step (prompts x generations)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--objective", default="tb", choices=("tb", "db", "subtb"))
    ap.add_argument("--out", type=Path, default=Path("outputs") / "minionerec_trl")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_rows, args.eval_rows, args.grpo_steps, args.gfn_steps = 8, 6, 2, 2
        args.generations, args.batch, args.beams, args.hidden = 2, 4, 4, 32

    from datasets import Dataset
    from trl import GRPOConfig

    indexes = sorted(args.data.glob("*.index.json"))
    if not indexes:
        raise SystemExit(f"{args.data} has no *.index.json: pass --data or set GFLOWGR_DATA")
    train_file = args.data / "train.csv" if (args.data / "train.csv").is_file() else args.data / "valid.csv"
    eval_file = args.data / "test.csv" if (args.data / "test.csv").is_file() else args.data / "valid.csv"
    for f in (train_file, eval_file):
        if not f.is_file():
            raise SystemExit(f"{args.data} has no {f.name}")
    t0 = time.time()
    train_rows = read_split(train_file, args.train_rows)
    eval_rows = read_split(eval_file, args.eval_rows)
    tok = build_tokenizer(train_rows, indexes[0])
    vocab, item_ids = SIDVocabulary.from_index(tok, indexes[0], add_missing_tokens=True)
    index = json.loads(indexes[0].read_text(encoding="utf-8"))
    catalogue = {"".join(v) for v in index.values()}
    model = build_tiny_causal_lm(len(tok), hidden=args.hidden, layers=2, heads=4, kv_heads=2, arch="qwen2",
                                 seed=args.seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    print(f"catalogue: {len(item_ids)} items, {vocab.trie.num_leaves} distinct SIDs, levels "
          f"{vocab.codes_per_level}; {len(train_rows)} training prompts from {train_file.name}")

    ds = Dataset.from_list([{"prompt": r["prompt"], "target": r["target"]} for r in train_rows])
    common = dict(per_device_train_batch_size=args.batch, num_generations=args.generations,
                  max_completion_length=vocab.num_levels + 1, report_to="none", use_cpu=not torch.cuda.is_available(),
                  bf16=False, logging_steps=max(1, args.grpo_steps // 4), save_strategy="no", seed=args.seed,
                  temperature=1.0, disable_tqdm=True)
    # [1] GRPO: TRL's loss, with SID-row log-probs (trie support) and constrained rollouts.
    grpo = SIDGRPOTrainer(model=model, reward_funcs=[exact_match_reward, prefix_reward],
                          args=GRPOConfig(output_dir=str(args.out / "grpo"), max_steps=args.grpo_steps,
                                          learning_rate=1e-3, **common),
                          train_dataset=ds, processing_class=tok, sid_vocab=vocab, sid_support="trie")
    grpo.train()
    # [2] GFlowNet: the same model, data and reward functions; the loss is a balance objective.
    gfn = GFlowNetTrainer(model=model, reward_funcs=[exact_match_reward, prefix_reward],
                          args=GFlowNetConfig(output_dir=str(args.out / "gflownet"), max_steps=args.gfn_steps,
                                              learning_rate=1e-3, flow_learning_rate=1e-2,
                                              gfn_objective=args.objective, reward_eps=1e-2, sft_weight=1.0,
                                              sft_column="target", **common),
                          train_dataset=ds, processing_class=tok, sid_vocab=vocab)
    gfn.train()
    remove_constrained_generation(model)
    # [3] evaluation: constrained beam search (and the same search without the constraint, for comparison)
    k = min(10, args.beams)
    metrics = evaluate(model, tok, vocab, eval_rows, catalogue, args.beams, k, constrained=True)
    free = evaluate(model, tok, vocab, eval_rows, catalogue, args.beams, k, constrained=False)
    grpo_logs = [h for h in grpo.state.log_history if "loss" in h]
    gfn_logs = [h for h in gfn.state.log_history if "gfn/balance" in h]
    metrics.update({"unconstrained_invalid_items": free["invalid_items"],
                    "grpo_reward": grpo_logs[-1].get("reward") if grpo_logs else None,
                    "gfn_balance": gfn_logs[-1]["gfn/balance"] if gfn_logs else None,
                    "gfn_log_z": gfn_logs[-1]["gfn/log_z"] if gfn_logs else None,
                    "seconds": round(time.time() - t0, 1)})
    print(f"constrained beam search ({args.beams} beams, {len(eval_rows)} users from {eval_file.name}): "
          f"recall@{k} {metrics[f'recall@{k}']:.4f}  ndcg@{k} {metrics[f'ndcg@{k}']:.4f}  "
          f"invalid items {metrics['invalid_items']} / {metrics['beams_total']}")
    print(f"same search without the trie: invalid items {free['invalid_items']} / {free['beams_total']}")
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
