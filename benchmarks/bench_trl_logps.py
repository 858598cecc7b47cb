"""Peak memory and time of GRPO's per-token log-prob step for SID completions: TRL's default vs this library's.

The step is what ``GRPOTrainer._compute_loss`` runs for a batch of rollouts: the forward over prompt + completion,
the per-token log-probabilities (and entropies) of the completion tokens, then the backward of the log-probs. At a
pretrained vocabulary (Qwen2.5's 151,936 tokens) with a small model geometry that fits the CPU (sizes recorded), in
float32 on either device (``--device auto`` picks CUDA when present; model and inputs live on the device).

Variants (the baseline rows measured in the same run):

* ``trl_fused`` (baseline): trl's own ``GRPOTrainer._get_per_token_logps_and_entropies`` (its fused, chunked LM
  head; on devices without Triton trl scores every position of the sequence, on CUDA only the completion's);
* ``full_logits`` (baseline): what MiniOneRec-style forks of older TRL do: ``[B, K, V]`` logits of the completion,
  then log-softmax and gather;
* ``sid_vocab``: :func:`gflowgr_core.integrations.trl.sid_per_token_logps` with ``support="vocab"`` (TRL's value;
  ``[rows, V]`` chunks under activation checkpointing);
* ``sid_trie``: the same with ``support="trie"`` (only the SID rows of the head; the exact log-prob of the
  trie-constrained sampler).

Each variant runs in its own process. Memory on the CPU: ``tensor_peak_mb`` is the largest sum of live tensor
allocations during the first step (the profiler's memory events), so it includes the gradients the backward
allocates (the tied ``[V, d]`` embedding/head gradient in every row); ``rss_extra_peak_mb`` is the process's peak
resident size after that step minus its size before it (allocator effects included). Time: the first step is the
warm-up, then the median of ``--reps`` steps, as wall time and as the process's CPU time (``cpu_median_ms``: on a
machine shared with other jobs the wall time mostly measures the other jobs; the load average is recorded).

Memory on CUDA: ``cuda_peak_mb`` is ``torch.cuda.max_memory_allocated`` during the first step after
``torch.cuda.reset_peak_memory_stats``, so it includes what was already allocated before the step (model, inputs:
``cuda_allocated_before_mb``) and the gradients the backward allocates. Time: the first step is the warm-up, then the
median wall time of ``--reps`` steps (default 10 on CUDA), each bracketed by ``torch.cuda.synchronize()``.

Results: ``benchmarks/results/trl_logps_<cpu|cuda>.json`` (``--quick``: ``trl_logps_<cpu|cuda>_quick.json``).

    nice -n 15 python benchmarks/bench_trl_logps.py [--quick] [--device auto|cpu|cuda] [--batch B] [--prompt P]
        [--hidden D] [--layers L] [--reps N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS_DIR, environment, format_table, log, write_json  # noqa: E402

VARIANTS = ("trl_fused", "full_logits", "sid_vocab", "sid_trie")
BASELINES = ("trl_fused", "full_logits")
VOCAB = 151_936
LEVELS, CODES = 3, 256
SIZES = {False: dict(batch=32, prompt=48, hidden=256, layers=2, reps=2),
         True: dict(batch=8, prompt=24, hidden=64, layers=1, reps=2)}
CUDA_REPS = 10  # timed steps on CUDA when --reps is not given (milliseconds each, so more than on the CPU)


def _rss_kb() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _setup(batch: int, prompt: int, hidden: int, layers: int, seed: int = 0):
    """A tied-embedding Qwen2 at the pretrained vocabulary, SID tokens in its last rows, a random catalogue, and a
    batch of prompts with SID + EOS completions (right-padded as GRPO lays them out)."""
    from gflowgr_core.integrations.trl import SIDVocabulary
    from gflowgr_core.model.policy import build_tiny_causal_lm

    g = torch.Generator().manual_seed(seed)
    model = build_tiny_causal_lm(VOCAB, hidden=hidden, layers=layers, heads=4, kv_heads=2, arch="qwen2", seed=seed,
                                 tie_embeddings=True, max_positions=prompt + 16)
    n_items = 4000
    codes = torch.randint(0, CODES, (n_items, LEVELS), generator=g)

    class _Tok:  # SID tokens at ids VOCAB - 768 .. VOCAB - 1, like tokens added to a pretrained vocabulary
        unk_token_id = 0
        eos_token_id = 2

        def convert_tokens_to_ids(self, names):
            from gflowgr_core.sid.tokens import parse_sid_token
            out = []
            for n in names:
                lvl, c = parse_sid_token(n)
                out.append(VOCAB - LEVELS * CODES + lvl * CODES + c)
            return out

    vocab = SIDVocabulary.from_tokenizer(_Tok(), codes)
    p_ids = torch.randint(10, VOCAB - LEVELS * CODES, (batch, prompt), generator=g)
    p_mask = torch.ones(batch, prompt, dtype=torch.long)
    pad = torch.randint(0, prompt // 4, (batch,), generator=g)
    for b in range(batch):  # left padding
        p_ids[b, :pad[b]] = 1
        p_mask[b, :pad[b]] = 0
    items = torch.randint(0, n_items, (batch,), generator=g)
    leaf_codes = vocab.trie.leaf_sid(vocab.trie.item_leaf[items])
    comp = torch.cat([vocab.token_ids(leaf_codes), torch.full((batch, 1), 2)], 1)
    c_mask = torch.ones_like(comp)
    return model, vocab, torch.cat([p_ids, comp], 1), torch.cat([p_mask, c_mask], 1), comp.shape[1]


def _step_fn(variant: str, model, vocab, ids, attn, K, tmp: Path, device: str):
    from gflowgr_core.integrations.trl import sid_per_token_logps

    if variant == "trl_fused":
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(output_dir=str(tmp), per_device_train_batch_size=2, num_generations=2, report_to="none",
                          use_cpu=device == "cpu", bf16=False, max_completion_length=K)
        trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                              args=args, train_dataset=Dataset.from_list([{"prompt": "x"}] * 2),
                              processing_class=_tokenizer())

        def step():
            lp, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, K, compute_entropy=True)
            lp.sum().backward()
            return lp.detach()
    elif variant == "full_logits":
        def step():
            logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=K + 1).logits[:, :-1].float()
            logp_all = torch.log_softmax(logits, dim=-1)
            lp = logp_all.gather(-1, ids[:, -K:, None]).squeeze(-1) * attn[:, -K:]
            with torch.no_grad():
                _ = -(logp_all.exp() * logp_all).sum(-1)  # the entropy metric
            lp.sum().backward()
            return lp.detach()
    else:
        support = variant.split("_", 1)[1]

        def step():
            lp, _ = sid_per_token_logps(model, ids, attn, K, vocab, support=support, compute_entropy=True,
                                        entropy_grad=False)
            lp.sum().backward()
            return lp.detach()
    return step


def _tokenizer():
    """A stand-in HF tokenizer for GRPOTrainer's constructor (the measured call does not tokenize)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "</s>": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")


def _tensor_peak_bytes(fn):
    """``(peak, out)``: the largest sum of live CPU tensor allocations made during ``fn()`` (from the profiler's
    memory events: an allocation counts from the start of the op that makes it, a free from its own event)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak, out


def _cuda_worker(step, model, reps: int) -> dict:
    """The CUDA measurements: peak allocated memory of the first step, then the median of ``reps`` synchronized steps."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()  # the first step, also the warm-up of the timed ones
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    model.zero_grad(set_to_none=True)
    wall = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        model.zero_grad(set_to_none=True)
    return {"cuda_peak_mb": round(peak / 2**20, 1), "cuda_allocated_before_mb": round(before / 2**20, 1),
            "reps": reps, "median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
            "logps_checksum": float(out.sum())}


def worker(variant: str, batch: int, prompt: int, hidden: int, layers: int, reps: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model, vocab, ids, attn, K = _setup(batch, prompt, hidden, layers)
    model, ids, attn = model.to(device), ids.to(device), attn.to(device)
    model.train()
    head = {"variant": variant, "baseline": variant in BASELINES, "batch": batch, "prompt_tokens": prompt,
            "completion_tokens": K, "hidden": hidden, "layers": layers, "vocab": VOCAB,
            "sid_rows": int(vocab.sid_token_ids.numel())}
    with tempfile.TemporaryDirectory() as tmp:
        step = _step_fn(variant, model, vocab, ids, attn, K, Path(tmp), device)
        if device == "cuda":
            return {**head, **_cuda_worker(step, model, reps)}
        before_kb = _rss_kb()
        peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tensor_peak, out = _tensor_peak_bytes(step)  # the first step, also the warm-up of the timed ones
        peak_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model.zero_grad(set_to_none=True)
        wall, cpu = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            model.zero_grad(set_to_none=True)
    raised = peak_after_kb > peak_before_kb
    return {**head,
            "tensor_peak_mb": round(tensor_peak / 2**20, 1),
            "rss_extra_peak_mb": round((peak_after_kb - before_kb) / 1024, 1) if raised else None,
            "rss_before_mb": round(before_kb / 1024, 1), "reps": reps,
            "median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
            "cpu_median_ms": statistics.median(cpu),
            "logps_checksum": float(out.sum())}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    for name in ("batch", "prompt", "hidden", "layers", "reps"):
        ap.add_argument(f"--{name}", type=int, default=None)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where model and inputs live (auto: cuda when available)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_trl_logps: --device cuda but torch sees no CUDA device")
    sizes = dict(SIZES[args.quick])
    if device == "cuda" and not args.quick:
        sizes["reps"] = CUDA_REPS
    for k in sizes:
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    if args.worker:
        print(json.dumps(worker(args.worker, **sizes, device=device)))
        return {}
    env = environment(device)
    try:
        import trl
        env["versions"]["trl"] = trl.__version__
    except ImportError:
        raise SystemExit("bench_trl_logps needs trl: pip install 'gflowgr[trl]'")
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", variant, f"--device={device}"] + [
            f"--{k}={v}" for k, v in sizes.items()]
        if args.quick:
            cmd.append("--quick")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"worker {variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        log(f"{variant}: {r['median_ms']:.1f} ms wall, " + (f"CUDA peak {r['cuda_peak_mb']} MB" if device == "cuda"
            else f"{r['cpu_median_ms']:.1f} ms CPU, tensor peak {r['tensor_peak_mb']} MB"))
    by = {r["variant"]: r for r in rows}
    # CPU: process CPU time and profiler tensor peak; CUDA: synchronized wall time and max_memory_allocated
    time_key, mem_key = ("median_ms", "cuda_peak_mb") if device == "cuda" else ("cpu_median_ms", "tensor_peak_mb")
    time_name, mem_name = ("time", "cuda_peak") if device == "cuda" else ("cpu_time", "tensor_peak")
    summary = {}
    for ours in ("sid_vocab", "sid_trie"):
        for base in BASELINES:
            summary[f"{base}_over_{ours}_{time_name}"] = by[base][time_key] / by[ours][time_key]
            summary[f"{base}_over_{ours}_{mem_name}"] = by[base][mem_key] / by[ours][mem_key]
    # sid_vocab computes TRL's value: same log-probs, so the same checksum (fp32 rounding aside)
    summary["sid_vocab_checksum_minus_trl"] = by["sid_vocab"]["logps_checksum"] - by["trl_fused"]["logps_checksum"]
    env["load_average_end"] = list(os.getloadavg())
    payload = {**env, "quick": args.quick, "sizes": {**sizes, "vocab": VOCAB, "levels": LEVELS,
                                                     "codes_per_level": CODES, "tied_embeddings": True,
                                                     "dtype": "float32"},
               "step": "forward + per-token log-probs and entropies of the completion + backward of the log-probs",
               "rows": rows, "summary": summary}
    if device == "cuda":
        payload["memory"] = ("cuda_peak_mb: torch.cuda.max_memory_allocated during the first step after "
                             "reset_peak_memory_stats (includes cuda_allocated_before_mb: model and inputs)")
    out = args.out or RESULTS_DIR / f"trl_logps_{device}{'_quick' if args.quick else ''}.json"
    write_json(out, payload)
    print(f"{env['device']}; trl {env['versions']['trl']}; B={sizes['batch']} completions, prompt {sizes['prompt']}, "
          f"d={sizes['hidden']}, {sizes['layers']} layers, V={VOCAB}")
    print(format_table(rows, ["variant", "baseline", "median_ms", "cuda_peak_mb", "cuda_allocated_before_mb",
                              "sid_rows"] if device == "cuda" else
                       ["variant", "baseline", "cpu_median_ms", "median_ms", "tensor_peak_mb", "rss_extra_peak_mb",
                        "sid_rows"]))
    print(f"summary: {json.dumps({k: round(v, 4) for k, v in summary.items()})}")
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
