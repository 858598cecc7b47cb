#!/usr/bin/env bash
# One-call GPU check: build the extension (with its CUDA ops), run the kernel parity tests on the GPU, run
# the kernel benchmarks at full size, print a short table and copy the results to "$OUT" when it is set.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (expected about 8 minutes on an H100:
#                                           # build ~2, tests ~3, decode and loss benchmarks ~1.5 each)
#
# Stages (each bounded by a timeout, a failing stage does not stop the next ones; the exit status is
# non-zero when any stage failed):
#   1. pip install --no-build-isolation --no-deps -e .   (offline; builds gflowgr_core._C, with the CUDA
#      ops when torch has CUDA). GPU_CHECK_SKIP_INSTALL=1 skips it.
#   2. pytest on the kernel test files (they parametrize on CUDA at full size when a GPU is present).
#   3. benchmarks/bench_decode.py, bench_gfn_loss.py, bench_hf_processor.py, bench_train_step.py,
#      bench_compile.py (static rows, torch.compile, CUDA graphs) and bench_trl_logps.py (TRL's per-token
#      log-prob step vs the SID-row path, float32; needs trl, skipped without it) at full size (JSON under
#      benchmarks/results/).
#   2b. fsdp_cuda (after the kernel tests): tests/test_fsdp.py's FSDP2 checks that need no 2-process CPU launch: the one-GPU bf16 run
#      (torchrun --nproc_per_node=1, NCCL; losses vs the autocast run, bf16 compute, fp32 export; skipped without
#      CUDA) and the unit tests (mixed-precision policy, decoder-layer discovery, launch errors). The 2-process
#      CPU parity runs are left out (minutes of CPU): python -m pytest tests/test_fsdp.py runs them.
# GPU_CHECK_STAGES="bench_compile bench_epoch" runs only the stages named, after the install (to rerun the ones
# a short device session did not reach); unset runs them all.
# Without a GPU the GPU-only parts are skipped with a message: the tests run on CPU (Triton in the
# interpreter) and the benchmarks in --quick mode, which checks the script end to end.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
LOGS=$(mktemp -d)/gpu_check_logs
mkdir -p "$RESULTS" "$LOGS"
STAMP="$(dirname "$LOGS")/started"  # results newer than this were written by this run
touch "$STAMP"
echo "stage logs: $LOGS"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
declare -a STAGES=()
FAILED=0

stage() {  # stage NAME TIMEOUT_S COMMAND...: run, log to $LOGS/NAME.log, record status and seconds
  local name=$1 limit=$2
  shift 2
  if [ -n "${GPU_CHECK_STAGES:-}" ] && [ "$name" != install ] && [[ " $GPU_CHECK_STAGES " != *" $name "* ]]; then
    echo "=== $name skipped (not in GPU_CHECK_STAGES)"
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; FAILED=1
  elif [ "$rc" -ne 0 ]; then status="FAILED(rc=$rc)"; FAILED=1; fi
  STAGES+=("$(printf '%-16s %-14s %5ss' "$name" "$status" "$((SECONDS - t0))")")
}

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
EOF

if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = "1" ]; then
  echo "=== install skipped (GPU_CHECK_SKIP_INSTALL=1)"
else
  stage install 180 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$PY" -c "import gflowgr_core.backends as b; print('gflowgr backends:', ', '.join(b.available_backends()))"

if [ "$HAS_CUDA" = "1" ]; then
  unset TRITON_INTERPRET
  TESTS=(tests/test_constrained_step_kernels.py tests/test_gfn_loss_kernel.py tests/test_trie.py
         tests/test_hf_processor.py tests/test_functional.py)
  stage gpu_tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}"
  QUICK=()
else
  echo "=== no CUDA device: GPU-only parts skipped (CUDA parity at full size, CUDA graph capture, full-size"
  echo "    benchmarks); running the kernel tests on CPU (Triton interpreter) and the benchmarks with --quick"
  export TRITON_INTERPRET=1
  stage cpu_tests 600 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_constrained_step_kernels.py
  QUICK=(--quick)
fi

# FSDP2 on CUDA with bf16 mixed precision (not yet timed on a GPU: two 6-step tiny runs and their references,
# expected about a minute; without CUDA its GPU test skips and the rest takes seconds, so
# GPU_CHECK_SKIP_INSTALL=1 GPU_CHECK_STAGES=fsdp_cuda bash benchmarks/gpu_check.sh is a cheap dry run).
stage fsdp_cuda 300 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_fsdp.py \
  -k "cuda_bf16 or mixed_precision or decoder_layers or without_torchrun or refuses_the_library_fsdp"

stage bench_decode 150 "$PY" benchmarks/bench_decode.py "${QUICK[@]}"
if [ -f benchmarks/bench_gfn_loss.py ]; then
  stage bench_gfn_loss 150 "$PY" benchmarks/bench_gfn_loss.py "${QUICK[@]}"
else
  echo "=== benchmarks/bench_gfn_loss.py not present: skipped"
fi
stage bench_hf_proc 90 "$PY" benchmarks/bench_hf_processor.py "${QUICK[@]}"
stage bench_train 120 "$PY" benchmarks/bench_train_step.py "${QUICK[@]}"
stage bench_compile 300 "$PY" benchmarks/bench_compile.py "${QUICK[@]}"
if "$PY" -c "import trl, datasets" 2>/dev/null; then
  # trl_logps_cuda.json (CUDA: max_memory_allocated of the first step, synchronized times) / trl_logps_cpu_quick.json
  stage bench_trl_logps 480 "$PY" benchmarks/bench_trl_logps.py "${QUICK[@]}"
else
  echo "=== bench_trl_logps skipped: trl is not installed (pip install 'gflowgr[trl]')"
fi
if [ "$HAS_CUDA" = "1" ]; then
  # Packed vs per-prefix Beauty epochs in bf16 (needs data_carry/Beauty: see benchmarks/gpu_quality.sh --help).
  stage bench_epoch 300 "$PY" benchmarks/bench_train_step.py --epoch --per-prefix-minutes 1 --eval-users 2000
else
  echo "=== bench_epoch skipped without CUDA (a CPU run takes hours: python benchmarks/bench_train_step.py --epoch)"
fi

echo
echo "=== summary"
printf '%s\n' "${STAGES[@]}"
SUFFIX=$([ "$HAS_CUDA" = "1" ] && echo "" || echo "_quick")
"$PY" - "$RESULTS" "$SUFFIX" <<'EOF'
import json, sys
from pathlib import Path
results, suffix = Path(sys.argv[1]), sys.argv[2]

def show(name, keys):
    path = results / f"{name}{suffix}.json"
    if not path.is_file():
        print(f"{path}: not written")
        return
    data = json.loads(path.read_text())
    print(f"{path.name} on {data.get('device')}:")
    summary = data.get("summary", {})
    for key in keys or summary:
        value = summary.get(key)
        if isinstance(value, dict):
            for sub, v in value.items():
                print(f"  {key}[{sub}]: {json.dumps(v)}")
        else:
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")

show("decode", ["end_to_end", "kernel_step"])
show("gfn_loss", None)
show("train_step", ["gflowgr_over_sft_step_time", "cm_curriculum_over_sft_step_time"])
if suffix == "":
    show("train_epoch_cuda", None)
show("train_compile_cuda" if suffix == "" else "train_compile_cpu", None)
show("trl_logps_cuda" if suffix == "" else "trl_logps_cpu", None)
EOF

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  # Only the files this run wrote (the tree's committed ones are already here): the device tool returns at most
  # 8 files, and a full CUDA run writes 7 JSON files plus the log archive.
  for f in "$RESULTS"/decode*.json "$RESULTS"/gfn_loss*.json "$RESULTS"/hf_processor*.json \
           "$RESULTS"/train_step*.json "$RESULTS"/train_epoch_cuda.json "$RESULTS"/train_compile_cuda.json \
           "$RESULTS"/trl_logps_cuda*.json "$RESULTS"/trl_logps_cpu_quick.json; do
    [ -f "$f" ] && [ "$f" -nt "$STAMP" ] && cp "$f" "$OUT"/
  done
  # The stage logs travel as one archive.
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$(dirname "$LOGS")" gpu_check_logs
  echo "results and gpu_check_logs.tar.gz copied to $OUT"
fi
exit $FAILED
