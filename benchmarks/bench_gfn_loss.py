"""GFlowNet (trajectory balance) loss, forward + backward: fused Triton kernel against two eager baselines.

Methods, all computing TB from hidden states ``h[T, L, d]`` and the gradients of ``h``, the SID head rows
and ``log Z`` (one ``torch.autograd.grad`` call per step):

* ``fused``: :func:`gflowgr_core.objectives.gfn_loss` with ``backend="triton"`` (the kernels of
  ``gflowgr_core.kernels.constrained_log_pf``; trie support: per-step log-softmax over the valid trie
  children, logits only for the level's SID rows, never stored).
* ``eager_full_vocab``: what a plain implementation pays: logits over the whole vocabulary
  ``[T * L, V]``, ``log_softmax`` in fp32, gather of the SID tokens, TB (the unconstrained "vocab" policy).
* ``eager_sid_rows``: the PyTorch reference :func:`gflowgr_core.objectives.gfn_loss_reference` (trie
  support, logits for the level's SID rows only): the same function as ``fused``.

The SID rows of the head are their own ``[L * K, d]`` tensor (as for a model whose SID tokens live in their
own head block); the rest of the ``[V, d]`` head is frozen, so memory figures are not dominated by a dense
``[V, d]`` weight gradient. Extra peak memory is measured on CUDA only.

Default sizes: rows ``T * L`` in {4096, 16384}, ``d`` in {128, 1536, 4096}, ``V = 151,936``, 4 levels x 256
codes, bf16. ``--quick`` runs tiny sizes (CPU smoke test): without CUDA only the eager methods run, plus the
fused kernel when ``TRITON_INTERPRET=1`` is set (the interpreter is only used at ``--quick`` sizes).

    python benchmarks/bench_gfn_loss.py                 # GPU: writes benchmarks/results/gfn_loss.json
    TRITON_INTERPRET=1 python benchmarks/bench_gfn_loss.py --quick   # CPU smoke test (gfn_loss_quick.json)
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (environment, extra_peak_bytes, format_table, is_oom, load_average, log,  # noqa: E402
                    parse_benchmark_args, release, time_call, write_json)

from gflowgr_core import backends  # noqa: E402
from gflowgr_core.objectives.gfn_loss import gfn_loss, gfn_loss_reference  # noqa: E402
from gflowgr_core.sid.trie import Trie  # noqa: E402

METHODS = ("fused", "eager_full_vocab", "eager_sid_rows")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SUMMARY_AT = (16384, 1536)


@dataclass
class Problem:
    trie: Trie
    codes: torch.Tensor      # [T, L]
    tokens: torch.Tensor     # [T * L] vocabulary ids of the trajectories' SID tokens
    h: torch.Tensor          # [T, L, d], requires grad
    w_sid: torch.Tensor      # [L * K, d], requires grad: the SID rows of the head
    w_head: torch.Tensor     # [V, d], frozen: the rest of the head (its SID rows are replaced by w_sid)
    log_z: torch.Tensor      # [T] fp32, requires grad
    log_r: torch.Tensor      # [T] fp32
    sid_base: int            # first vocabulary id of the SID tokens


def build_problem(rows: int, d: int, vocab: int, codes_per_level: tuple[int, ...], n_items: int,
                  dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Random catalogue, its trie, ``rows // L`` trajectories of catalogue items and random activations."""
    n_levels = len(codes_per_level)
    if rows % n_levels:
        raise ValueError(f"rows ({rows}) must be a multiple of the number of levels ({n_levels})")
    n_sid = sum(codes_per_level)
    if vocab < n_sid:
        raise ValueError(f"vocab ({vocab}) must hold the {n_sid} SID tokens")
    gen = torch.Generator().manual_seed(seed)
    catalogue = torch.stack([torch.randint(0, k, (n_items,), generator=gen) for k in codes_per_level], dim=1)
    trie = Trie.build(catalogue, codes_per_level).to(device)
    t = rows // n_levels
    codes = catalogue[torch.randint(0, n_items, (t,), generator=gen)].to(device)
    offsets = torch.tensor([0] + list(codes_per_level[:-1]), device=device).cumsum(0)
    sid_base = vocab - n_sid
    tokens = (sid_base + offsets[None, :] + codes).reshape(-1)
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(t, n_levels, d, generator=g, device=device).to(dtype).requires_grad_(True)
    w_sid = (torch.randn(n_sid, d, generator=g, device=device) / d ** 0.5).to(dtype).requires_grad_(True)
    w_head = (torch.randn(vocab, d, generator=g, device=device) / d ** 0.5).to(dtype)
    log_z = torch.randn(t, generator=g, device=device).requires_grad_(True)
    log_r = torch.randn(t, generator=g, device=device)
    return Problem(trie, codes, tokens, h, w_sid, w_head, log_z, log_r, sid_base)


def loss_fused(p: Problem) -> torch.Tensor:
    out = gfn_loss(p.h, p.w_sid, p.codes, p.trie, None, p.log_z, p.log_r, "tb", backend="triton")
    if out.backend != "triton":  # a silent fallback would time the reference under the kernel's name
        raise RuntimeError(f"the fused loss ran on {out.backend!r}: "
                           f"{backends.last_resolution('gfn_loss').reason}")
    return out.loss


def loss_eager_sid_rows(p: Problem) -> torch.Tensor:
    return gfn_loss_reference(p.h, p.w_sid, p.codes, p.trie, None, p.log_z, p.log_r, "tb")[0]


def loss_eager_full_vocab(p: Problem) -> torch.Tensor:
    t, n_levels, d = p.h.shape
    x = p.h.reshape(t * n_levels, d)
    logits = x @ p.w_head.t()                                   # [T * L, V]
    logits[:, p.sid_base:] = x @ p.w_sid.t()                    # the trainable SID block
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_pf = log_p.gather(1, p.tokens[:, None]).view(t, n_levels)
    return (p.log_z + log_pf.sum(dim=1) - p.log_r).square().mean()


LOSSES: dict[str, Callable[[Problem], torch.Tensor]] = {
    "fused": loss_fused, "eager_full_vocab": loss_eager_full_vocab, "eager_sid_rows": loss_eager_sid_rows}


def step(method: str, p: Problem):
    """One forward + backward: the loss and its gradients w.r.t. ``h``, ``w_sid`` and ``log Z``."""
    loss = LOSSES[method](p)
    return torch.autograd.grad(loss, (p.h, p.w_sid, p.log_z))


def fused_available(device: torch.device, quick: bool) -> Optional[str]:
    """``None`` when the fused kernel can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 with --quick to run the kernel in the interpreter)"
    if not quick:
        return "the Triton interpreter is only used at --quick sizes"
    return None


def measure(method: str, p: Problem, device: torch.device, warmup: int, reps: int) -> dict:
    try:
        timing = time_call(lambda: step(method, p), device, warmup=warmup, reps=reps)
        release(device)
        peak = extra_peak_bytes(lambda: step(method, p), device)
    except Exception as exc:  # noqa: BLE001 - an OOM of one baseline is a result, not a crash
        if not is_oom(exc):
            raise
        release(device)
        return {"status": "oom", "error": str(exc).splitlines()[0]}
    release(device)
    return {"status": "ok", **timing, "extra_peak_bytes": peak,
            "extra_peak_gib": None if peak is None else peak / 2 ** 30}


def summarise(rows: list[dict]) -> dict:
    """Ratios at 16,384 rows and d = 1,536 (or the largest size where all three methods ran); ``at`` holds the
    sizes they were measured at (rows, trajectories, d, vocabulary, SID rows, dtype)."""
    ok = {(r["rows"], r["d"], r["method"]): r for r in rows if r["status"] == "ok"}
    sizes = sorted({(r["rows"], r["d"]) for r in rows if all((r["rows"], r["d"], m) in ok for m in METHODS)})
    if not sizes:
        return {"at": None, "speedup_vs_eager_full_vocab": None, "memory_ratio_vs_eager_full_vocab": None,
                "speedup_vs_eager_sid_rows": None,
                "note": "no size where all three methods ran"}
    at = SUMMARY_AT if SUMMARY_AT in sizes else sizes[-1]
    fused, full, sid = (ok[at + (m,)] for m in METHODS)
    mem = None
    if fused["extra_peak_bytes"] and full["extra_peak_bytes"] is not None:
        mem = full["extra_peak_bytes"] / fused["extra_peak_bytes"]
    sizes = ("rows", "trajectories", "d", "vocab", "sid_rows", "levels", "dtype")
    return {"at": {k: fused[k] for k in sizes},
            "speedup_vs_eager_full_vocab": full["median_ms"] / fused["median_ms"],
            "memory_ratio_vs_eager_full_vocab": mem,
            "speedup_vs_eager_sid_rows": sid["median_ms"] / fused["median_ms"],
            "definitions": "speedups: baseline median / fused median (fwd+bwd); memory ratio: baseline extra "
                           "peak / fused extra peak"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (CPU smoke test)")
    ap.add_argument("--rows", type=int, nargs="+", help="T * L values (default 4096 16384; quick: 64)")
    ap.add_argument("--d", type=int, nargs="+", help="hidden sizes (default 128 1536 4096; quick: 32)")
    ap.add_argument("--vocab", type=int, help="vocabulary size V (default 151936; quick: 2048)")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--codes", type=int, help="codes per level (default 256; quick: 16)")
    ap.add_argument("--items", type=int, help="catalogue size (default 100000; quick: 300)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--warmup", type=int, help="untimed calls (default 3; quick: 1)")
    ap.add_argument("--reps", type=int, help="timed calls (default 20; quick: 3)")
    defaults = {"rows": ([4096, 16384], [64]), "d": ([128, 1536, 4096], [32]), "vocab": (151936, 2048),
                "codes": (256, 16), "items": (100_000, 300), "warmup": (3, 1), "reps": (20, 3)}
    return parse_benchmark_args(ap, argv, "gfn_loss", defaults)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    env = environment(device)  # before the runs: the load they start under
    cpl = (args.codes,) * args.levels
    methods = list(args.methods)
    skipped = {}
    if "fused" in methods:
        reason = fused_available(device, args.quick)
        if reason is not None:
            methods.remove("fused")
            skipped["fused"] = reason
            log(f"fused kernel skipped: {reason}")

    rows = []
    checks = []
    for n_rows in args.rows:
        for d in args.d:
            p = build_problem(n_rows, d, args.vocab, cpl, args.items, dtype, device)
            if "fused" in methods and "eager_sid_rows" in methods:
                # Same function on both paths: record how far apart they are at this size.
                with torch.no_grad():
                    a, b = loss_fused(p).double(), loss_eager_sid_rows(p).double()
                checks.append({"rows": n_rows, "d": d, "fused_loss": float(a), "eager_sid_rows_loss": float(b),
                               "relative_difference": float((a - b).abs() / b.abs().clamp_min(1e-30))})
            for method in methods:
                log(f"{method}: rows={n_rows} d={d} V={args.vocab} {args.dtype}")
                res = measure(method, p, device, args.warmup, args.reps)
                rows.append({"method": method, "rows": n_rows, "trajectories": n_rows // args.levels, "d": d,
                             "vocab": args.vocab, "sid_rows": sum(cpl), "levels": args.levels,
                             "dtype": args.dtype, **res})
            del p
            release(device)

    payload = {**env, "load_average_end": load_average() if device.type == "cpu" else None,
               "benchmark": "gfn_loss (trajectory balance), forward + backward",
               "config": {"quick": args.quick, "rows": args.rows, "d": args.d, "vocab": args.vocab,
                          "codes_per_level": list(cpl), "catalogue_items": args.items, "dtype": args.dtype,
                          "warmup": args.warmup, "reps": args.reps, "device": str(device)},
               "skipped": skipped, "rows": rows, "parity": checks, "summary": summarise(rows)}
    print(format_table(rows, ["method", "rows", "d", "status", "median_ms", "extra_peak_gib"]))
    print(payload["summary"])
    path = write_json(args.out, payload)
    log(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
