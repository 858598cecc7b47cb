"""A TIGER-style T5 recommender over semantic IDs, trained with SFT + trajectory balance, decoded with stock
``generate`` under the trie constraint.

TIGER (Rajput et al., 2023) feeds the SID tokens of a user's history to a T5 encoder and lets the decoder
write the next item's SID. This script keeps that model exactly as Hugging Face builds it and adds GFlowGR's
trajectory-balance objective from the outside, with the functional API:

1. every training example gets the positive item plus ``--n-aug`` random items as trajectories;
2. the decoder runs on ``[start, c_1, .., c_{L-1}]`` of each trajectory; its last hidden states are the
   decision states ``h[T, L, d]``;
3. ``F.constrained_log_pf(h, w_sid, codes, trie)`` gives ``log P_F`` renormalised over the trie children,
   a small head on the start state gives ``log Z(U)``, the library's ``Reward`` gives ``log R``;
4. ``loss = SFT CE(positive) + lambda * F.trajectory_balance(log_pf, log_z, log_r)``.

Evaluation: ``model.generate`` beam search with :class:`SIDTrieLogitsProcessor` (through
``F.constrained_beam_search``), Recall/NDCG@5/10 over the full catalogue on the test users of the slice.

    python examples/t5_tiger_tb.py                  # a Beauty slice, a few minutes on CPU
    python examples/t5_tiger_tb.py --smoke          # a handful of steps (seconds)
    python examples/t5_tiger_tb.py --data /path/to/letter/Beauty --users 2000 --steps 600
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

import gflowgr_core.functional as F
from gflowgr_core.data.prepared import prepare
from gflowgr_core.decoding import leaves_to_items
from gflowgr_core.metrics import evaluate_rankings
from gflowgr_core.reward import Reward, RewardConfig
from gflowgr_core.samplers import RandomSampler
from gflowgr_core.trajectories import ExampleBatch

DEFAULT_DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "letter" / "Beauty"


def encoder_inputs(history: torch.Tensor, item_tokens: torch.Tensor, eos_id: int, pad_id: int):
    """``(input_ids[B, H*L + 1], attention_mask)``: the history's SID tokens then EOS, left-padded.

    ``history`` is ``[B, H]`` item ids left-padded with ``-1`` (the split's layout), so the real tokens are
    already contiguous at the right.
    """
    B, H = history.shape
    L = item_tokens.shape[1]
    valid = (history >= 0).repeat_interleave(L, dim=1)
    ids = item_tokens[history.clamp_min(0)].reshape(B, H * L).masked_fill(~valid, pad_id)
    ids = torch.cat([ids, torch.full((B, 1), eos_id)], dim=1)
    mask = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1).long()
    return ids, mask


def build_model(vocab_size: int, pad_id: int, eos_id: int, d_model: int, layers: int, seed: int):
    # The stock (tied, output-rescaled) T5 head: F.sid_head_rows folds the d_model**-0.5 factor into w_sid.
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=4 * d_model, d_kv=d_model // 4,
                      num_layers=layers, num_decoder_layers=layers, num_heads=4, dropout_rate=0.1,
                      pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(config)


@torch.no_grad()
def evaluate(model, data, item_tokens, users: int, beams: int, batch: int) -> dict:
    model.eval()
    split = data.split.test
    n = min(users, len(split))
    ranked = []
    for s in range(0, n, batch):
        ids, mask = encoder_inputs(split.history[s:min(n, s + batch)], item_tokens, data.tokens.eos_id,
                                   data.tokens.pad_id)
        out = F.constrained_beam_search(model, data.trie, beams=beams, input_ids=ids, attention_mask=mask,
                                        tokens=data.tokens)
        ranked.append(leaves_to_items(data.trie, out.leaves, out.scores, 10)[0])
    ranked = torch.cat(ranked)
    metrics = evaluate_rankings(ranked, split.target[:n], data.popularity, ks=(5, 10))
    return {**{k: metrics[k] for k in ("recall@5", "recall@10", "ndcg@5", "ndcg@10")}, "eval_users": n}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LETTER folder with Beauty.inter/index.json")
    ap.add_argument("--users", type=int, default=1000, help="users of the slice (prepare(max_users=...))")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64, help="training examples per step")
    ap.add_argument("--n-aug", type=int, default=3, help="augmented (random) trajectories per example")
    ap.add_argument("--lambda-gfn", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--log-z-lr", type=float, default=1e-2, help="learning rate of the log Z head")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--eval-users", type=int, default=300)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--smoke", action="store_true", help="a handful of steps on a small slice")
    args = ap.parse_args(argv)
    if args.smoke:
        args.users, args.steps, args.batch, args.eval_users, args.beams, args.d_model = 120, 3, 8, 8, 5, 32
    if not (args.data / "Beauty.inter.json").is_file():
        raise SystemExit(f"{args.data} has no Beauty.inter.json: pass --data or set GFLOWGR_DATA")
    torch.manual_seed(args.seed)
    t0 = time.time()

    data = prepare("letter", args.data, max_users=args.users)
    print(f"prepared the slice in {time.time() - t0:.1f}s")
    tokens, trie, codes = data.tokens, data.trie, data.catalog.codes
    item_tokens = tokens.encode(codes)  # [n_items, L]
    L = trie.num_levels
    train = data.split.train
    print(f"slice: {args.users} users, {len(train)} training examples, {data.num_items} items, {L}-level SIDs")

    model = build_model(tokens.vocab_size, tokens.pad_id, tokens.eos_id, args.d_model, args.layers, args.seed)
    log_z_head = nn.Sequential(nn.Linear(args.d_model, 64), nn.GELU(), nn.Linear(64, 1))
    reward = Reward(RewardConfig(r_pos=10.0, use_cm=False))
    sampler = RandomSampler(data.num_items)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": args.lr},
                             {"params": log_z_head.parameters(), "lr": args.log_z_lr}])
    gen = torch.Generator().manual_seed(args.seed)
    start_token = torch.full((1,), model.config.decoder_start_token_id)

    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        batch = ExampleBatch.from_split(train, idx)
        aug = sampler.sample(batch, args.n_aug, gen)                        # [B, n_aug]
        items = torch.cat([batch.positive[:, None], aug], dim=1)            # [B, T'] positive first
        B, Tp = items.shape
        traj_codes = codes[items].reshape(B * Tp, L)                        # [T, L]

        ids, mask = encoder_inputs(batch.history, item_tokens, tokens.eos_id, tokens.pad_id)
        enc = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        # One encoder pass per user, shared by its trajectories.
        enc, mask_t = enc.repeat_interleave(Tp, dim=0), mask.repeat_interleave(Tp, dim=0)
        dec_in = torch.cat([start_token.expand(B * Tp, 1), item_tokens[items.reshape(-1), : L - 1]], dim=1)
        h = model.decoder(input_ids=dec_in, encoder_hidden_states=enc,
                          encoder_attention_mask=mask_t).last_hidden_state       # [T, L, d]

        w_sid, bias = F.sid_head_rows(model, tokens)
        log_pf = F.constrained_log_pf(h, w_sid, traj_codes, trie, bias=bias)  # [T, L]
        log_z = log_z_head(h[:, 0]).squeeze(-1)                                  # [T]
        log_r, _ = reward(batch.positive, items, None, codes)                    # [B, T']
        sft = F.sft_cross_entropy(log_pf.view(B, Tp, L)[:, 0])
        tb = F.trajectory_balance(log_pf, log_z, log_r.reshape(-1))
        loss = sft + args.lambda_gfn * tb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  sft {sft.item():.4f}  tb {tb.item():.4f}  "
                  f"log_z {log_z.mean().item():.3f}", flush=True)

    t_eval = time.time()
    metrics = evaluate(model, data, item_tokens, args.eval_users, args.beams, batch=64)
    metrics.update(final_loss=loss.item(), final_sft=sft.item(), final_tb=tb.item(), steps=args.steps,
                   seconds=round(time.time() - t0, 1), eval_seconds=round(time.time() - t_eval, 1))
    print("test metrics:", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    main()
