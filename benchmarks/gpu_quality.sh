#!/usr/bin/env bash
# One-run quality grid on Amazon Beauty (LETTER SIDs), one seed, on one GPU:
#   prepare Beauty from a data folder, SFT with early stopping, then sft_continue, dpo, sdpo, gflowgr_tb,
#   gflowgr_db and gflowgr_subtb from the SFT checkpoint with the same stage-2 budget, test metrics of each
#   best validation checkpoint on the full test split (beam 20, both scorings), and
#   benchmarks/results/quality_beauty.json + quality_beauty.png (benchmarks/run_quality.py does the work).
#
#   bash benchmarks/gpu_quality.sh [--seed S] [--quick] [--data DIR] [options] [-- key=value ...]
#
# Options:
#   --protocol P        gpu (default): configs/beauty, one SFT per seed, writes quality_beauty.json;
#                       cpu: the CPU grid's protocol (configs/beauty_cpu, every stage-2 seed from the seed-42
#                       SFT, the YAMLs' epochs; the configs and statistics of quality_beauty_cpu.json), writes
#                       quality_beauty_cpu_on_gpu.json; its runs are separate from the gpu protocol's (<root>/cpu)
#   --seed S            training seed (default 42). Seeds 43 and 44 are separate runs; with their run folders
#                       under one --root, `python benchmarks/run_quality.py --seeds 42 43 44 --aggregate-only
#                       --root ROOT` aggregates them as mean ± std (each run rewrites quality_beauty.json)
#   --quick             a pipeline check on the CPU: tiny model, a few steps, the first 300 users, validation
#                       on 50 (run_quality.py --quick); writes quality_beauty_quick.json, never the results
#   --data DIR          folder holding Beauty.inter.json and Beauty.index.json (default: data_carry/Beauty
#                       when it exists, else $GFLOWGR_DATA/letter/Beauty, else ../shared/data/letter/Beauty)
#   --root DIR          runs and prepared data (default: runs); finished runs there are skipped on a rerun
#   --valid-users N     model selection on a fixed seeded subset of N validation users (default 5000; 0 =
#                       the whole validation split); test is always the whole split
#   --sft-epochs N      cap on SFT epochs (default: 60 for the gpu protocol, where early stopping usually ends
#                       it before; the YAML's own for the cpu protocol, whose cosine schedule spans them)
#   --stage2-epochs N   epochs of every stage-2 method (default: the YAMLs' 10)
#   --minutes M         wall budget of the whole script, set-up included (default 9; 0 = none): no run
#                       starts after M - 1.5 minutes, and at M - 0.5 minutes the run in progress is stopped
#                       (SIGTERM: it saves out/last/ and the JSON lists it as missing)
#   --build             also build the C++/CUDA extension (pip install -e ., about 2 minutes; the GPU
#                       paths use the Triton kernels without it)
#   -- key=value ...    config overrides for every run (sft:key=value only SFT, stage2:key=value the rest)
# --valid-users, --sft-epochs, --stage2-epochs and --minutes do not apply to --quick (its own tiny budgets).
#
# The GPU machine is offline and has no ../shared. Bring the two Beauty files (3.8 MB) in the working tree:
#   mkdir -p data_carry/Beauty && cp ../shared/data/letter/Beauty/Beauty.{inter,index}.json data_carry/Beauty/
#   echo data_carry/ >> .git/info/exclude     # keeps them out of commits
# and name `data_carry` in the device tool's `carry`. Needed there: torch, transformers, pyyaml, scipy, tqdm,
# numpy, matplotlib (all in that machine's image); nothing is downloaded. When $OUT is set, the JSON, the
# PNG and a log archive are copied to it.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}

SEED=42 QUICK=0 DATA="" ROOT=runs VALID_USERS=5000 SFT_EPOCHS="" STAGE2_EPOCHS="" MINUTES=9 BUILD=0 PROTOCOL=gpu
EXTRA=()
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --protocol) PROTOCOL=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --data) DATA=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --valid-users) VALID_USERS=$2; shift 2 ;;
    --sft-epochs) SFT_EPOCHS=$2; shift 2 ;;
    --stage2-epochs) STAGE2_EPOCHS=$2; shift 2 ;;
    --minutes) MINUTES=$2; shift 2 ;;
    --build) BUILD=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_quality.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

case "$PROTOCOL" in
  gpu) TAG="" PROTOCOL_ARGS=() SFT_EPOCHS=${SFT_EPOCHS:-60} ;;
  cpu) TAG=cpu_on_gpu ROOT=$ROOT/cpu PROTOCOL_ARGS=(--config-dir configs/beauty_cpu --sft-seed 42 --tag "$TAG") ;;
  *) echo "gpu_quality.sh: --protocol is gpu or cpu, not '$PROTOCOL'" >&2; exit 2 ;;
esac

if [ -z "$DATA" ]; then
  if [ -f data_carry/Beauty/Beauty.inter.json ]; then DATA=data_carry/Beauty
  else DATA=${GFLOWGR_DATA:-../shared/data}/letter/Beauty; fi
fi
PREPARED=$ROOT/$([ "$QUICK" = 1 ] && echo quick/data/beauty_quick || echo data/beauty)
if [ ! -f "$PREPARED/stats.json" ]; then
  for f in Beauty.inter.json Beauty.index.json; do
    if [ ! -f "$DATA/$f" ]; then
      echo "gpu_quality.sh: $DATA/$f not found; pass --data DIR (see --help for bringing the files along)" >&2
      exit 2
    fi
  done
fi

T0=$SECONDS
LOGS=$(mktemp -d)/gpu_quality_logs
mkdir -p "$LOGS"
# Offline: nothing may be fetched; the models are built from configs.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# SASRec models are cached under the run root (read back for the reference row), not in the home folder.
case "$ROOT" in /*) ROOT_ABS=$ROOT ;; *) ROOT_ABS=$REPO/$ROOT ;; esac
export GFLOWGR_CACHE=${GFLOWGR_CACHE:-$ROOT_ABS/cache}

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/setup.log"
import importlib, sys
missing = []
for name in ("torch", "transformers", "yaml", "scipy", "tqdm", "numpy", "matplotlib"):
    try:
        importlib.import_module(name)
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (offline machine: carry their wheels and "
             f"pip install them from the carried folder)")
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_CUDA" = 1 ]; then
  unset TRITON_INTERPRET   # compile the Triton kernels for the GPU
elif [ "$QUICK" != 1 ]; then
  echo "gpu_quality.sh: no CUDA device; the full grid is a GPU job (use --quick for a CPU check)" >&2
  exit 2
fi
if [ "$BUILD" = 1 ]; then
  timeout 240 "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$LOGS/build.log"
fi

ARGS=(--dataset beauty --seeds "$SEED" --root "$ROOT" --data "$DATA" "${PROTOCOL_ARGS[@]}")
OVR=()
if [ "$QUICK" = 1 ]; then
  ARGS+=(--quick)
else
  [ "$VALID_USERS" != 0 ] && OVR+=("valid_max_users=$VALID_USERS")
  [ -n "$SFT_EPOCHS" ] && OVR+=("sft:epochs=$SFT_EPOCHS")
  [ -n "$STAGE2_EPOCHS" ] && OVR+=("stage2:epochs=$STAGE2_EPOCHS" "stage2:patience=$STAGE2_EPOCHS")
fi
OVR+=("${EXTRA[@]}")
LIMIT=()
if [ "$MINUTES" != 0 ] && [ "$QUICK" != 1 ]; then
  left=$(( MINUTES * 60 - (SECONDS - T0) ))
  ARGS+=(--max-minutes "$(awk -v s="$left" 'BEGIN { printf "%.2f", (s - 90) / 60 }')")
  LIMIT=(timeout --signal=TERM --kill-after=25 "$(( left - 30 ))")
fi
echo "=== run_quality.py ${ARGS[*]} -- ${OVR[*]}"
"${LIMIT[@]}" "$PY" benchmarks/run_quality.py "${ARGS[@]}" -- "${OVR[@]}" 2>&1 | tee "$LOGS/run_quality.log"
RC=${PIPESTATUS[0]}
echo "=== run_quality.py exit status $RC; whole script $(( SECONDS - T0 )) s"

STEM=benchmarks/results/quality_beauty${TAG:+_$TAG}$([ "$QUICK" = 1 ] && echo _quick)
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in "$STEM.json" "$STEM.png"; do [ -f "$f" ] && cp "$f" "$OUT"/; done
  # The device tool returns at most 8 files: the logs travel as one archive (script logs, and each run's
  # log.jsonl, result.json, config.yaml and env.json).
  cp -r "$ROOT" "$LOGS/runs" 2>/dev/null && find "$LOGS/runs" -type f ! \( -name log.jsonl -o -name result.json \
    -o -name config.yaml -o -name env.json \) -delete
  tar -czf "$OUT/gpu_quality_logs.tar.gz" -C "$(dirname "$LOGS")" gpu_quality_logs
  echo "results and logs copied to $OUT"
fi
exit "$RC"
