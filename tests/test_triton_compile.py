"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU.

The parity tests run the kernels in Triton's CPU interpreter, which accepts code the GPU compiler rejects
(types, tuple-returning helpers, constexpr use). Compiling each kernel ahead of time to a cubin for sm_90
catches those errors on a machine without a GPU, for the configurations the launchers use: bf16 and fp32
inputs, every trie-lookup mode, with a bias. The tests run under ``TRITON_INTERPRET=1``, where kernels are
interpreted functions, so the compilation runs in a child process without it (this file run as a script).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Integer arguments that hold sizes or offsets able to exceed 2^31 (the launchers pass them as int64).
I64_ARGS = {"R", "K", "D", "T", "level", "lvl_lo", "lvl_hi", "N_CAND", "NONE_FLAT", "n_levels", "rows_per_split"}
STEP_PTRS = {"H": "*bf16", "W": "*bf16", "BIAS": "*bf16", "NODE": "*i64", "DENSE": "*i64", "INDPTR": "*i64",
             "CHILD_CODE": "*i64", "CHILD_NODE": "*i64", "KEY": "*i64", "OUT_CODE": "*i64", "OUT_NODE": "*i64",
             "OUT_LOGP": "*fp32", "SCORES": "*fp32", "CAND_V": "*fp32", "CAND_C": "*i32", "CAND_N": "*i64",
             "OUT_PARENT": "*i64", "OUT_SCORE": "*fp32"}
LOGPF_PTRS = {"H": "*bf16", "W": "*bf16", "BIAS": "*bf16", "CODES": "*i64", "NODES": "*i64", "BITS": "*i32",
              "LOFF": "*i32", "LOGPF": "*fp32", "LSE": "*fp32", "GRAD": "*fp32", "DZ": "*bf16", "GH": "*bf16",
              "GW": "*fp32"}
FP32 = {"H": "*fp32", "W": "*fp32", "BIAS": "*fp32", "DZ": "*fp32", "GH": "*fp32"}
ROW = dict(HAS_BIAS=True, RENORM=True, DOT_F32=False, MAX_BRANCH=16, SEARCH_STEPS=5, BLOCK_R=16, BLOCK_K=256,
           BLOCK_D=64)
LOGPF = dict(HAS_BIAS=True, MASK_TRIE=True, DOT_F32=False, BLOCK_T=64, BLOCK_K=128, BLOCK_D=64)
GRAD = dict(DOT_F32=False, BLOCK_T=64, BLOCK_K=64, BLOCK_D=128)

CASES = [
    *[("constrained_step", "_sample_kernel", STEP_PTRS, dict(ROW, LOOKUP=lookup), ("inv_temp",))
      for lookup in (0, 1, 2)],
    *[("constrained_step", "_beam_rows_kernel", STEP_PTRS, dict(ROW, LOOKUP=lookup, TOPK=20), ())
      for lookup in (0, 1, 2)],
    ("constrained_step", "_beam_merge_kernel", STEP_PTRS, dict(TOPK=20, BEAMS=20, BLOCK_C=512), ()),
    ("constrained_log_pf", "_logpf_fwd_kernel", LOGPF_PTRS, LOGPF, ()),
    ("constrained_log_pf", "_logpf_bwd_dz_kernel", LOGPF_PTRS, LOGPF, ()),
    ("constrained_log_pf", "_logpf_bwd_dh_kernel", LOGPF_PTRS, GRAD, ()),
    ("constrained_log_pf", "_logpf_bwd_dw_kernel", LOGPF_PTRS, GRAD, ()),
    ("constrained_log_pf", "_logpf_fwd_kernel", {**LOGPF_PTRS, **FP32},
     dict(LOGPF, DOT_F32=True, BLOCK_K=64, BLOCK_D=32), ()),
]


def signature(fn, pointers: dict, constexprs: dict, floats: tuple) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name.startswith("stride") or name in I64_ARGS else "i32"
    return sig


def case_id(i: int) -> str:
    return f"{CASES[i][1]}-{i}"


def compile_all() -> dict:
    """``{case id: "ok" or the error}`` for every case, compiled for sm_90 (run without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gflowgr_core.backends import kernel_module

    out = {}
    for i, (module, kernel, pointers, constexprs, floats) in enumerate(CASES):
        try:
            fn = getattr(kernel_module(module), kernel)
            missing = [n for n in constexprs if n not in fn.arg_names]
            if missing:
                raise ValueError(f"no constexpr argument(s) {missing}: update this test's cases")
            compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, pointers, constexprs, floats),
                                                constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
            out[case_id(i)] = "ok" if compiled.asm.get("cubin") else "no cubin"
        except Exception as exc:  # reported per case by the test
            out[case_id(i)] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.fixture(scope="module")
def compiled() -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case_id(i) for i in range(len(CASES))])
def test_kernel_compiles_for_sm90(compiled, index):
    assert compiled[case_id(index)] == "ok", compiled[case_id(index)]


if __name__ == "__main__":
    print(json.dumps(compile_all()))
