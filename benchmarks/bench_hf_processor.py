"""Stock Hugging Face beam search with :class:`SIDTrieLogitsProcessor` against ``prefix_allowed_tokens_fn``.

Workload (the same as benchmarks/bench_decode.py): Beauty's 4-level LETTER SIDs (random 4 x 256 SIDs of
12,101 items when the data folder is absent), beam 20, 256 users per batch, history of the last 20 items, a
Qwen2-style model with hidden 128 and 4 layers (:func:`gflowgr_core.model.policy.build_tiny_causal_lm`,
random weights). All three methods run the same ``model.generate`` call (``num_beams = num_return_sequences
= beams``, ``L`` new tokens) on the same prompts, in the same run:

* ``hf_processor``: ``logits_processor=[SIDTrieLogitsProcessor(trie, tokens, prompt_length=P)]``;
* ``hf_prefix_fn``: ``prefix_allowed_tokens_fn`` over a Python dict trie (the usual recipe);
* ``hf_unconstrained``: no constraint.

Processor only: one logits-processor call per level at ``users x beams`` rows, ours against HF's
``PrefixConstrainedLogitsProcessor`` over the dict trie (the constraint's own cost, without the model).

Summary (with the sizes run: users, beams, processor rows, items, vocabulary, dtype):
``hf_processor_speedup_vs_prefix_fn`` (prefix-fn time over processor time), ``hf_processor_over_unconstrained``
(processor time over unconstrained time: what the constraint costs inside ``generate``),
``hf_processor_matches_prefix_fn`` (the two constrained runs returned identical sequences). Results go to
``results/hf_processor.json`` (``--quick``: ``hf_processor_quick.json``).

    python benchmarks/bench_hf_processor.py            # GPU
    python benchmarks/bench_hf_processor.py --quick    # CPU smoke test, tiny sizes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (environment, format_table, load_average, log, parse_benchmark_args, release,  # noqa: E402
                    time_call, write_json)

from gflowgr_core.hf_processor import SIDTrieLogitsProcessor  # noqa: E402
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm  # noqa: E402
from gflowgr_core.sid.tokens import SIDTokenMap  # noqa: E402
from gflowgr_core.sid.trie import Trie  # noqa: E402

# The decode benchmark's workload (Beauty SIDs and test histories, or random ones) and its HF calls, shared
# so both measure the same thing.
from bench_decode import CPL, dict_trie, generate, load_workload  # noqa: E402


def processor_only(processor, table, tokens: SIDTokenMap, codes: torch.Tensor, prompt: int, args,
                   device: torch.device) -> list[dict]:
    """One logits-processor call per level at ``users * beams`` rows (the constraint's own cost, without the
    model): ours against HF's ``PrefixConstrainedLogitsProcessor`` over the dict trie."""
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    rows_n = args.users * args.beams
    gen = torch.Generator().manual_seed(1)
    picked = codes[torch.randint(0, codes.shape[0], (rows_n,), generator=gen)]
    sid_tokens = tokens.encode(picked).to(device)
    base = torch.full((rows_n, prompt), tokens.sep_id, dtype=torch.long, device=device)
    eos = [tokens.eos_id]
    ref = PrefixConstrainedLogitsProcessor(lambda b, x: table.get(tuple(x[prompt:].tolist()), eos), args.beams)
    scores = torch.randn(rows_n, tokens.vocab_size, generator=gen).to(device)
    out = []
    for level in range(len(CPL)):
        input_ids = torch.cat([base, sid_tokens[:, :level]], dim=1)
        for method, proc in (("hf_processor", processor), ("hf_prefix_fn", ref)):
            t = time_call(lambda proc=proc: proc(input_ids, scores), device, warmup=1, reps=max(args.reps, 3))
            out.append({"part": "processor", "method": method, "level": level, "rows": rows_n,
                        "users": args.users, "beams": args.beams, "vocab": tokens.vocab_size, **t})
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (CPU smoke test)")
    ap.add_argument("--users", type=int, help="users per batch (default 256; quick: 8)")
    ap.add_argument("--beams", type=int, help="beam width (default 20; quick: 5)")
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--warmup", type=int, help="untimed calls (default 1; quick: 1)")
    ap.add_argument("--reps", type=int, help="timed calls per method (default 3; quick: 1)")
    defaults = {"users": (256, 8), "beams": (20, 5), "warmup": (1, 1), "reps": (3, 1)}
    return parse_benchmark_args(ap, argv, "hf_processor", defaults)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)  # before the runs: the load they start under
    codes, history, source = load_workload(args.users, args.history)
    tokens = SIDTokenMap.from_scratch(CPL)
    model = build_tiny_causal_lm(tokens.vocab_size, hidden=args.hidden, layers=args.layers, seed=0)
    policy = SIDPolicy(model, tokens, codes).to(device).eval()  # builds the left-padded prompts
    trie = Trie.build(codes, CPL).to(device)
    ids, mask, _ = policy.build_prompt(history.to(device))
    L = trie.num_levels
    n_params = sum(p.numel() for p in model.parameters())
    log(f"workload: {source}, {codes.shape[0]} items, {args.users} users, beam {args.beams}, "
        f"model {n_params / 1e6:.2f}M params, prompt {ids.shape[1]} tokens, device {device}")
    processor = SIDTrieLogitsProcessor(trie, tokens, prompt_length=ids.shape[1])
    table = dict_trie(tokens, codes)
    methods = {"hf_processor": dict(processor=processor), "hf_prefix_fn": dict(table=table),
               "hf_unconstrained": {}}
    seqs = {m: generate(policy.model, ids, mask, tokens, args.beams, L, **kw)
            for m, kw in methods.items() if m != "hf_unconstrained"}
    matches = bool(torch.equal(seqs["hf_processor"], seqs["hf_prefix_fn"]))
    rows = []
    for method, kw in methods.items():
        log(f"{method}: timing")
        t = time_call(lambda kw=kw: generate(policy.model, ids, mask, tokens, args.beams, L, **kw), device,
                      warmup=args.warmup, reps=args.reps)
        rows.append({"part": "generate", "method": method, "users": args.users, "beams": args.beams,
                     "new_tokens": L, "users_per_s": args.users / (t["median_ms"] / 1e3), **t})
        release(device)
    rows += processor_only(processor, table, tokens, codes, ids.shape[1], args, device)
    ms = {r["method"]: r["median_ms"] for r in rows if r.get("part") == "generate"}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    summary = {
        "users": args.users, "beams": args.beams, "processor_rows": args.users * args.beams,
        "items": int(codes.shape[0]), "vocab": tokens.vocab_size, "dtype": dtype,
        "hf_processor_speedup_vs_prefix_fn": ms["hf_prefix_fn"] / ms["hf_processor"],
        "hf_processor_over_unconstrained": ms["hf_processor"] / ms["hf_unconstrained"],
        "hf_processor_users_per_s": args.users / (ms["hf_processor"] / 1e3),
        "hf_processor_matches_prefix_fn": matches,
        "processor_call_ms_by_level": {r["level"]: r["median_ms"] for r in rows
                                       if r.get("part") == "processor" and r["method"] == "hf_processor"},
        "prefix_fn_call_ms_by_level": {r["level"]: r["median_ms"] for r in rows
                                       if r.get("part") == "processor" and r["method"] == "hf_prefix_fn"},
    }
    payload = {**env, "load_average_end": load_average() if device.type == "cpu" else None,
               "benchmark": "HF generate beam search: SIDTrieLogitsProcessor vs "
                                                    "prefix_allowed_tokens_fn vs unconstrained",
               "config": {"quick": args.quick, "users": args.users, "beams": args.beams, "history": args.history,
                          "hidden": args.hidden, "layers": args.layers, "codes_per_level": list(CPL),
                          "items": int(codes.shape[0]), "workload": source, "model_params": n_params,
                          "prompt_tokens": int(ids.shape[1]), "vocab": tokens.vocab_size, "dtype": dtype,
                          "device": str(device)},
               "rows": rows, "summary": summary}
    print(format_table([r for r in rows if r["part"] == "generate"],
                       ["method", "users", "beams", "median_ms", "users_per_s"]))
    print(format_table([r for r in rows if r["part"] == "processor"], ["method", "level", "rows", "median_ms"]))
    print(summary)
    path = write_json(args.out, payload)
    log(f"wrote {path}")
    if not matches:
        log("WARNING: the processor and prefix_allowed_tokens_fn returned different sequences")
    return payload


if __name__ == "__main__":
    main()
