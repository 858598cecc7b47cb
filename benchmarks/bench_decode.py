"""Trie-constrained beam search: our KV-cached decoding loop on the fused step against Hugging Face ``generate``.

Workload (the evaluation protocol): Beauty's 4-level LETTER SIDs (random 4 x 256 SIDs of 12,101 items when
the data folder is absent), beam 20, 256 users per batch, history of the last 20 items, a Qwen2-style model
with hidden 128 and 4 layers (:func:`gflowgr_core.model.policy.build_tiny_causal_lm`, random weights: speed
does not depend on them). Methods, all in the same run:

* ``ours[<backend>]``: :func:`gflowgr_core.decoding.beam_search` with the step on each available backend
  (``auto`` first: what users get);
* ``ours_unconstrained``: the same loop (prompt once, KV cache reordered on the device, SID-row logits)
  with a plain log-softmax and top-k over all codes instead of the trie-constrained step;
* ``hf_constrained``: ``model.generate`` beam search with a dict trie through ``prefix_allowed_tokens_fn``;
* ``hf_unconstrained``: the same ``generate`` call without the constraint.

``summary.end_to_end`` holds the sizes run (users, batch, beams, history, items, model) with
``speedup_vs_hf_constrained`` (our users/s over HF's) and ``constrained_over_unconstrained`` (time per user
of ``ours[auto]`` over ``ours_unconstrained``: what the constraint costs our loop). ``hf_valid_sid_share``
checks the baseline: the share of SIDs returned by ``hf_constrained`` that are catalogue SIDs (must be 1).
The two constrained searches rank differently by design: HF masks log-probabilities normalised over the
whole vocabulary, ours renormalises over the trie children (``renormalize=True``, the library default).

Kernel-only: one :func:`~gflowgr_core.decoding.constrained_step` (modes beam and sample) per level at
``users x beams`` rows (default 256 x 20 = 5,120), for Beauty's catalogue and random 4 x 256 catalogues
(default 1M and 10M items), on every backend. ``summary.kernel_step`` holds the sizes run (rows, users,
beams, d, dtype, items per catalogue) and, per catalogue and backend, the mean over the levels of each
level's median time of one step.

    python benchmarks/bench_decode.py            # GPU: writes benchmarks/results/decode.json
    python benchmarks/bench_decode.py --quick    # CPU smoke test, tiny sizes (decode_quick.json)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (environment, format_table, load_average, log, parse_benchmark_args, release,  # noqa: E402
                    time_call, write_json)

from gflowgr_core import backends  # noqa: E402
from gflowgr_core.decoding import beam_search, constrained_step  # noqa: E402
from gflowgr_core.model.policy import SIDPolicy, build_tiny_causal_lm  # noqa: E402
from gflowgr_core.sid.tokens import SIDTokenMap  # noqa: E402
from gflowgr_core.sid.trie import Trie  # noqa: E402

DATA = Path(os.environ.get("GFLOWGR_DATA", HERE.parent.parent / "shared" / "data"))
CPL = (256, 256, 256, 256)
BEAUTY_ITEMS = 12101


# ------------------------------------------------------------------------------------------ workload
def load_workload(n_users: int, history: int, seed: int = 0):
    """``(codes[n_items, 4], histories[n_users, history], source)``: Beauty's SIDs and the test users'
    histories, or random SIDs and histories when the data folder is absent."""
    folder = DATA / "letter" / "Beauty"
    if (folder / "Beauty.inter.json").is_file() and (folder / "Beauty.index.json").is_file():
        from gflowgr_core.data.loaders import load_letter
        from gflowgr_core.data.split import leave_one_out
        from gflowgr_core.sid.catalog import Catalog

        inter = load_letter(folder)
        catalog = Catalog.from_letter_index(folder / "Beauty.index.json", inter.item_ids, codes_per_level=CPL)
        test = leave_one_out(inter, max_history=history).test
        reps = -(-n_users // len(test))
        hist = test.history.repeat(reps, 1)[:n_users]
        return catalog.codes, hist, f"letter/Beauty ({len(test)} test users)"
    log(f"{folder} not found: random 4 x 256 SIDs of {BEAUTY_ITEMS} items and random histories")
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (BEAUTY_ITEMS, len(CPL)), generator=gen)
    hist = torch.randint(0, BEAUTY_ITEMS, (n_users, history), generator=gen)
    return codes, hist, "random (Beauty folder absent)"


def build_policy(codes: torch.Tensor, hidden: int, layers: int, device: torch.device) -> SIDPolicy:
    token_map = SIDTokenMap.from_scratch(CPL)
    model = build_tiny_causal_lm(token_map.vocab_size, hidden=hidden, layers=layers, seed=0)
    return SIDPolicy(model, token_map, codes).to(device).eval()


# ------------------------------------------------------------------------------------------ decoders
@torch.no_grad()
def ours_unconstrained(policy: SIDPolicy, history: torch.Tensor, beams: int) -> torch.Tensor:
    """Our decoding loop without the trie: log-softmax over each level's codes and top-``beams`` over
    ``beams_in x K``. Returns the codes ``[B, beams, L]``."""
    state = policy.encode_prompt(history)
    b = history.shape[0]
    scores = torch.zeros(b, 1, device=policy.device)
    base = torch.arange(b, device=policy.device)[:, None]
    codes = torch.zeros(b, 1, 0, dtype=torch.long, device=policy.device)
    for level in range(policy.num_levels):
        logits = policy.sid_logits(state.last_hidden, level).float()
        K = logits.shape[-1]
        rows_in = scores.shape[1]
        cand = (scores.reshape(-1, 1) + torch.log_softmax(logits, dim=-1)).reshape(b, rows_in * K)
        scores, flat = torch.topk(cand, beams, dim=1)
        parent, code = flat // K, flat % K
        codes = torch.cat([codes.gather(1, parent[:, :, None].expand(-1, -1, codes.shape[2])), code[:, :, None]], 2)
        if level + 1 < policy.num_levels:
            state = policy.reorder_state(state, (base * rows_in + parent).reshape(-1))
            state = policy.extend_codes(state, code.reshape(-1), level)
    return codes


def dict_trie(tokens: SIDTokenMap, codes: torch.Tensor) -> dict:
    """``{prefix of SID token ids: allowed next token ids}`` over the catalogue (the usual HF recipe)."""
    rows = tokens.encode(codes.cpu()).tolist()
    allowed: dict[tuple, set] = {}
    for row in rows:
        for level in range(len(row)):
            allowed.setdefault(tuple(row[:level]), set()).add(row[level])
    table = {k: sorted(v) for k, v in allowed.items()}
    table.update({tuple(row): [tokens.eos_id] for row in rows})
    return table


@torch.no_grad()
def generate(model, ids: torch.Tensor, mask: torch.Tensor, tokens: SIDTokenMap, beams: int, L: int,
             processor=None, table: dict | None = None) -> torch.Tensor:
    """Stock ``model.generate`` beam search of ``L`` new tokens after the prompts ``ids``, constrained by a
    logits ``processor``, by ``prefix_allowed_tokens_fn`` over a :func:`dict_trie` ``table``, or not at all.
    Returns the whole sequences ``[B * beams, P + L]``."""
    prompt = ids.shape[1]
    kwargs = {}
    if processor is not None:
        kwargs["logits_processor"] = [processor]
    if table is not None:
        eos = [tokens.eos_id]

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            return table.get(tuple(input_ids[prompt:].tolist()), eos)

        kwargs["prefix_allowed_tokens_fn"] = allowed
    return model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams,
                          max_new_tokens=L, min_new_tokens=L, do_sample=False, early_stopping=True,
                          pad_token_id=tokens.pad_id, eos_token_id=tokens.eos_id, **kwargs)


def hf_generate(policy: SIDPolicy, history: torch.Tensor, beams: int, table: dict | None) -> torch.Tensor:
    """:func:`generate` for the next SID from the histories (prompt building included, as in our loop);
    returns the generated tokens ``[B, beams, L]``."""
    ids, mask, _ = policy.build_prompt(history)
    L = policy.num_levels
    out = generate(policy.model, ids, mask, policy.token_map, beams, L, table=table)
    return out[:, ids.shape[1]:ids.shape[1] + L].reshape(history.shape[0], beams, L)


def valid_share(policy: SIDPolicy, trie: Trie, hf_tokens: torch.Tensor) -> float:
    """Share of HF's generated SIDs ``[B, beams, L]`` that are catalogue SIDs."""
    tokens = hf_tokens.cpu()
    levels = policy.token_map.level_token_ids
    is_sid = torch.stack([torch.isin(tokens[..., l], levels[l].cpu()) for l in range(len(levels))], -1).all(-1)
    first = torch.stack([ids[0].cpu() for ids in levels])  # a well-formed stand-in for malformed rows
    codes = policy.token_map.decode(torch.where(is_sid[..., None], tokens, first)).to(trie.device)
    return float((trie.contains(codes) & is_sid.to(trie.device)).float().mean())


# ------------------------------------------------------------------------------------------ measurements
def end_to_end(args, device: torch.device) -> tuple[list[dict], dict]:
    codes, history, source = load_workload(args.users * args.batches, args.history)
    policy = build_policy(codes, args.hidden, args.layers, device)
    trie = Trie.build(codes, CPL).to(device)
    history = history.to(device)
    n_params = sum(p.numel() for p in policy.model.parameters())
    log(f"workload: {source}, {codes.shape[0]} items, trie {trie}, model {n_params / 1e6:.2f}M params")
    steps = [b for b in backends.registered("constrained_step") if b in backends.available_backends()
             and b in {"cpu": ("torch", "cpp"), "cuda": ("torch", "triton", "cuda")}[device.type]]
    auto = backends.resolve_backend("constrained_step", "auto", device).name
    rows, extra = [], {"workload": source, "items": int(codes.shape[0]), "model_params": n_params,
                       "auto_backend": auto, "vocab": policy.token_map.vocab_size,
                       "dtype": str(next(policy.model.parameters()).dtype).replace("torch.", "")}
    users = history.shape[0]

    def record(method, fn, reps, warmup=1):
        log(f"{method}: {users} users, beam {args.beams}")
        t = time_call(fn, device, warmup=warmup, reps=reps)
        rows.append({"part": "end_to_end", "method": method, "users": users, "batch": args.users,
                     "beams": args.beams, "users_per_s": users / (t["median_ms"] / 1e3), **t})
        release(device)

    for b in ["auto"] + steps:
        record(f"ours[{b}]", lambda b=b: beam_search(policy, trie, history, beams=args.beams,
                                                     batch_size=args.users, backend=b), args.reps)

    def unconstrained():
        for s in range(0, users, args.users):
            ours_unconstrained(policy, history[s:s + args.users], args.beams)
    record("ours_unconstrained", unconstrained, args.reps)

    table = dict_trie(policy.token_map, codes)
    hf_users = min(users, args.users)  # HF is timed on one batch: it is the slow path
    hist_hf = history[:hf_users]
    extra["hf_valid_sid_share"] = valid_share(policy, trie, hf_generate(policy, hist_hf, args.beams, table))
    for method, tbl in (("hf_constrained", table), ("hf_unconstrained", None)):
        log(f"{method}: {hf_users} users, beam {args.beams}")
        t = time_call(lambda tbl=tbl: hf_generate(policy, hist_hf, args.beams, tbl), device, warmup=1,
                      reps=args.hf_reps)
        rows.append({"part": "end_to_end", "method": method, "users": hf_users, "batch": hf_users,
                     "beams": args.beams, "users_per_s": hf_users / (t["median_ms"] / 1e3), **t})
        release(device)
    del policy
    return rows, extra


def random_trie(n_items: int, device: torch.device, seed: int) -> Trie:
    gen = torch.Generator().manual_seed(seed)
    return Trie.build(torch.randint(0, 256, (n_items, len(CPL)), generator=gen), CPL).to(device)


def kernel_rows(args, device: torch.device, catalogues: dict[str, Trie]) -> list[dict]:
    steps = [b for b in backends.registered("constrained_step") if b in backends.available_backends()
             and b in {"cpu": ("torch", "cpp"), "cuda": ("torch", "triton", "cuda")}[device.type]]
    rows = []
    gen = torch.Generator().manual_seed(1)
    B, beams, d = args.kernel_rows // args.beams, args.beams, args.hidden
    R = B * beams
    for name, trie in catalogues.items():
        for level in range(trie.num_levels):
            lo, n = sum(trie.nodes_per_level[:level]), trie.nodes_per_level[level]
            node = torch.randint(lo, lo + n, (R,), generator=gen).to(device)
            h = torch.randn(R, d, generator=gen).to(device)
            w = (torch.randn(CPL[level], d, generator=gen) / d ** 0.5).to(device)
            scores = (-torch.rand(B, beams, generator=gen) * 10).to(device)
            for mode in ("beam", "sample"):
                kw = dict(scores=scores, beams=beams) if mode == "beam" else dict(seed=7)
                for b in steps:
                    fn = lambda b=b, kw=kw, mode=mode: constrained_step(h, w, node, level, trie, mode, backend=b, **kw)
                    t = time_call(fn, device, warmup=args.warmup, reps=args.kernel_reps)
                    rows.append({"part": "kernel", "catalogue": name, "items": trie.num_items, "level": level,
                                 "mode": mode, "backend": b, "rows": R, "users": B, "beams": beams, "d": d,
                                 "dtype": str(h.dtype).replace("torch.", ""),
                                 "us_per_step": t["median_ms"] * 1e3, **t})
            del node, h, w, scores
        release(device)
    return rows


def summarise(rows: list[dict], extra: dict) -> dict:
    """Headline ratios, each group with the sizes it was measured at (never sizes fixed in a key name)."""
    e2e = {r["method"]: r for r in rows if r["part"] == "end_to_end"}
    ours = e2e["ours[auto]"]
    hf = e2e["hf_constrained"]
    kernel = [r for r in rows if r["part"] == "kernel"]
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in kernel:
        per.setdefault(r["mode"], {}).setdefault(r["catalogue"], {}).setdefault(r["backend"], []).append(
            r["us_per_step"])
    first = kernel[0] if kernel else {}
    return {
        "end_to_end": {
            "users": ours["users"], "batch": ours["batch"], "hf_users": hf["users"], "beams": ours["beams"],
            "items": extra["items"], "model_params": extra["model_params"], "vocab": extra["vocab"],
            "dtype": extra["dtype"], "workload": extra["workload"],
            "ours_backend": extra["auto_backend"],
            "ours_users_per_s": ours["users_per_s"],
            "ours_users_per_s_by_backend": {m[5:-1]: r["users_per_s"] for m, r in e2e.items()
                                            if m.startswith("ours[")},
            "ours_unconstrained_users_per_s": e2e["ours_unconstrained"]["users_per_s"],
            "hf_constrained_users_per_s": hf["users_per_s"],
            "hf_unconstrained_users_per_s": e2e["hf_unconstrained"]["users_per_s"],
            "speedup_vs_hf_constrained": ours["users_per_s"] / hf["users_per_s"],
            "constrained_over_unconstrained": e2e["ours_unconstrained"]["users_per_s"] / ours["users_per_s"],
            "hf_valid_sid_share": extra["hf_valid_sid_share"],
        },
        "kernel_step": {
            "rows": first.get("rows"), "users": first.get("users"), "beams": first.get("beams"),
            "d": first.get("d"), "dtype": first.get("dtype"),
            "items": {r["catalogue"]: r["items"] for r in kernel},
            "statistic": "mean over the levels of each level's median microseconds per step",
            "us_per_step": {mode: {c: {b: statistics.fmean(v) for b, v in by_b.items()} for c, by_b in by_c.items()}
                            for mode, by_c in per.items()},
        },
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (CPU smoke test)")
    ap.add_argument("--users", type=int, help="users per batch (default 256; quick: 8)")
    ap.add_argument("--batches", type=int, help="batches timed for our loop (default 4; quick: 1)")
    ap.add_argument("--beams", type=int, default=None, help="beam width (default 20; quick: 5)")
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kernel-rows", type=int, help="rows of the kernel-only step (default 5120; quick: 160)")
    ap.add_argument("--catalogues", type=int, nargs="+",
                    help="random catalogue sizes for the kernel-only step (default 1000000 10000000; quick: 20000)")
    ap.add_argument("--warmup", type=int, help="untimed calls (default 3; quick: 1)")
    ap.add_argument("--reps", type=int, help="timed end-to-end calls (default 5; quick: 2)")
    ap.add_argument("--hf-reps", type=int, help="timed HF generate calls (default 3; quick: 1)")
    ap.add_argument("--kernel-reps", type=int, help="timed kernel calls (default 20; quick: 3)")
    defaults = {"users": (256, 8), "batches": (4, 1), "beams": (20, 5), "kernel_rows": (5120, 160),
                "catalogues": ([1_000_000, 10_000_000], [20_000]), "warmup": (3, 1), "reps": (5, 2),
                "hf_reps": (3, 1), "kernel_reps": (20, 3)}
    return parse_benchmark_args(ap, argv, "decode", defaults)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    env = environment(device)  # before the runs: the load they start under
    rows, extra = end_to_end(args, device)

    codes, _, source = load_workload(1, args.history)
    catalogues = {f"beauty_{codes.shape[0] // 1000}k": Trie.build(codes, CPL).to(device)}
    for n in args.catalogues:
        label = f"random_{n // 1_000_000}m" if n >= 1_000_000 else f"random_{n // 1000}k"
        log(f"building a random trie of {n} items")
        catalogues[label] = random_trie(n, device, seed=n)
    rows += kernel_rows(args, device, catalogues)

    payload = {**env, "load_average_end": load_average() if device.type == "cpu" else None,
               "benchmark": "trie-constrained beam search (decode)",
               "config": {"quick": args.quick, "users_per_batch": args.users, "batches": args.batches,
                          "beams": args.beams, "history": args.history, "hidden": args.hidden,
                          "layers": args.layers, "kernel_rows": args.kernel_rows, "catalogues":
                          {k: t.num_items for k, t in catalogues.items()}, "codes_per_level": list(CPL),
                          "workload": extra["workload"], "model_params": extra["model_params"],
                          "vocab": extra["vocab"], "dtype": extra["dtype"],
                          "device": str(device), "registered_backends": list(backends.registered("constrained_step")),
                          "available_backends": list(backends.available_backends())},
               "rows": rows, "summary": summarise(rows, extra)}
    print(format_table([r for r in rows if r["part"] == "end_to_end"],
                       ["method", "users", "beams", "median_ms", "users_per_s"]))
    print(format_table([r for r in rows if r["part"] == "kernel"],
                       ["catalogue", "level", "mode", "backend", "rows", "us_per_step"]))
    print({k: v for k, v in payload["summary"].items()})
    path = write_json(args.out, payload)
    log(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
