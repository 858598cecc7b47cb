#!/usr/bin/env bash
# Sets up the environment and runs the demo: SFT, then continued SFT and GFlowGR-TB on MovieLens-100K, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
gflowgr demo --out "${1:-runs/demo}"
