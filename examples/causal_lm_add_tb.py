"""Adding GFlowGR's trajectory-balance objective to a plain Hugging Face causal-LM training script.

The script below is an ordinary next-token training loop for a decoder-only recommender over semantic-ID
tokens (prompt = the SID tokens of the user's history then ``SEP``; target = the next item's SID then
``EOS``; the loss is the model's own ``labels`` cross-entropy). The lines marked ``# [GFlowGR]`` are all it
takes to add the GFlowNet objective:

* each example also gets ``--n-aug`` augmented items, written as extra rows with the same prompt
  (their labels are ``-100``: the cross-entropy stays on the positive only);
* the decision hidden states of every row's SID come from ``output_hidden_states``, and
  ``F.constrained_log_pf`` turns them into ``log P_F`` renormalised over the trie children;
* ``log Z(U)`` is a small head on the ``SEP`` state, ``log R`` comes from the library's ``Reward``;
* ``loss = CE + lambda * F.trajectory_balance(log_pf, log_z, log_r)``.

Decoding uses stock ``model.generate`` beam search with :class:`SIDTrieLogitsProcessor`, so every
recommendation is a catalogue item; Recall/NDCG@5/10 on the slice's test users are printed at the end.
(The library's ``SIDPolicy`` shares one prompt pass between a user's trajectories; this script keeps the
plain-HF shape instead.)

    python examples/causal_lm_add_tb.py              # a Beauty slice, a few minutes on CPU
    python examples/causal_lm_add_tb.py --smoke      # a handful of steps (seconds)
    python examples/causal_lm_add_tb.py --lambda-gfn 0   # the same script without the GFlowNet term
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

import gflowgr_core.functional as F
from gflowgr_core.data.prepared import prepare
from gflowgr_core.decoding import leaves_to_items
from gflowgr_core.metrics import evaluate_rankings
from gflowgr_core.model.policy import build_tiny_causal_lm
from gflowgr_core.reward import Reward, RewardConfig
from gflowgr_core.samplers import RandomSampler
from gflowgr_core.trajectories import ExampleBatch

DEFAULT_DATA = Path(os.environ.get("GFLOWGR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "letter" / "Beauty"


def prompts(history: torch.Tensor, item_tokens: torch.Tensor, sep_id: int, pad_id: int):
    """``(input_ids[B, H*L + 1], attention_mask)``: history SID tokens then ``SEP``, left-padded.

    ``history`` is ``[B, H]`` item ids left-padded with ``-1`` (the split's layout), so real tokens are
    contiguous at the right and every prompt ends at the same column.
    """
    B, H = history.shape
    L = item_tokens.shape[1]
    valid = (history >= 0).repeat_interleave(L, dim=1)
    ids = item_tokens[history.clamp_min(0)].reshape(B, H * L).masked_fill(~valid, pad_id)
    ids = torch.cat([ids, torch.full((B, 1), sep_id)], dim=1)
    mask = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1).long()
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (what ``generate`` uses), so training and decoding agree."""
    return (mask.cumsum(1) - 1).clamp_min(0)


@torch.no_grad()
def evaluate(model, data, item_tokens, users: int, beams: int, batch: int) -> dict:
    model.eval()
    split = data.split.test
    n = min(users, len(split))
    ranked = []
    for s in range(0, n, batch):
        ids, mask = prompts(split.history[s:min(n, s + batch)], item_tokens, data.tokens.sep_id, data.tokens.pad_id)
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
    ap.add_argument("--batch", type=int, default=32, help="training examples per step")
    ap.add_argument("--n-aug", type=int, default=3, help="augmented (random) trajectories per example")
    ap.add_argument("--lambda-gfn", type=float, default=1.0, help="weight of the TB term (0: plain CE)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--log-z-lr", type=float, default=1e-2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--eval-users", type=int, default=300)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--smoke", action="store_true", help="a handful of steps on a small slice")
    args = ap.parse_args(argv)
    if args.smoke:
        args.users, args.steps, args.batch, args.eval_users, args.beams, args.hidden = 120, 3, 8, 8, 5, 32
    if not (args.data / "Beauty.inter.json").is_file():
        raise SystemExit(f"{args.data} has no Beauty.inter.json: pass --data or set GFLOWGR_DATA")
    torch.manual_seed(args.seed)
    t0 = time.time()

    data = prepare("letter", args.data, max_users=args.users)
    tokens, trie, codes = data.tokens, data.trie, data.catalog.codes
    item_tokens = tokens.encode(codes)  # [n_items, L]
    L = trie.num_levels
    train = data.split.train
    print(f"slice: {args.users} users, {len(train)} training examples, {data.num_items} items, {L}-level SIDs")

    model = build_tiny_causal_lm(tokens.vocab_size, hidden=args.hidden, layers=args.layers, heads=4,
                                 seed=args.seed, pad_token_id=tokens.pad_id, eos_token_id=tokens.eos_id)
    log_z_head = nn.Sequential(nn.Linear(args.hidden, 64), nn.GELU(), nn.Linear(64, 1))  # [GFlowGR]
    reward = Reward(RewardConfig(r_pos=10.0, use_cm=False))                              # [GFlowGR]
    sampler = RandomSampler(data.num_items)                                              # [GFlowGR]
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": args.lr},
                             {"params": log_z_head.parameters(), "lr": args.log_z_lr}])  # [GFlowGR] log Z group
    gen = torch.Generator().manual_seed(args.seed)
    n_aug = args.n_aug if args.lambda_gfn > 0 else 0

    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        batch = ExampleBatch.from_split(train, idx)
        aug = sampler.sample(batch, n_aug, gen)                                  # [GFlowGR] [B, n_aug]
        items = torch.cat([batch.positive[:, None], aug], dim=1)                 # [B, T'] positive first
        B, Tp = items.shape

        prompt, prompt_mask = prompts(batch.history, item_tokens, tokens.sep_id, tokens.pad_id)
        P = prompt.shape[1]
        prompt, prompt_mask = prompt.repeat_interleave(Tp, 0), prompt_mask.repeat_interleave(Tp, 0)
        target = torch.cat([item_tokens[items.reshape(-1)], torch.full((B * Tp, 1), tokens.eos_id)], dim=1)
        input_ids = torch.cat([prompt, target], dim=1)
        mask = torch.cat([prompt_mask, torch.ones_like(target)], dim=1)
        labels = torch.full_like(input_ids, -100)
        is_positive = (torch.arange(B * Tp) % Tp == 0)[:, None]
        labels[:, P:] = torch.where(is_positive, target, torch.full_like(target, -100))

        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask), labels=labels,
                    output_hidden_states=True)
        loss = ce = out.loss
        if args.lambda_gfn > 0:                                                  # [GFlowGR] from here
            h = F.decision_hidden(out.hidden_states[-1], P, L)                   # [T, L, d]
            w_sid, bias = F.sid_head_rows(model, tokens)
            log_pf = F.constrained_log_pf(h, w_sid, codes[items.reshape(-1)], trie, bias=bias)
            log_z = log_z_head(h[:, 0]).squeeze(-1)                              # SEP state -> log Z(U)
            log_r, _ = reward(batch.positive, items, None, codes)
            tb = F.trajectory_balance(log_pf, log_z, log_r.reshape(-1))
            loss = ce + args.lambda_gfn * tb                                     # [GFlowGR] to here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step == 1 or step % 50 == 0 or step == args.steps:
            extra = f"  tb {tb.item():.4f}  log_z {log_z.mean().item():.3f}" if args.lambda_gfn > 0 else ""
            print(f"step {step:4d}  loss {loss.item():.4f}  ce {ce.item():.4f}{extra}", flush=True)

    t_eval = time.time()
    metrics = evaluate(model, data, item_tokens, args.eval_users, args.beams, batch=64)
    metrics.update(final_loss=loss.item(), final_ce=ce.item(), steps=args.steps, lambda_gfn=args.lambda_gfn,
                   seconds=round(time.time() - t0, 1), eval_seconds=round(time.time() - t_eval, 1))
    print("test metrics:", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


if __name__ == "__main__":
    main()
