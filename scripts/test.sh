#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite (CPU; Triton kernels under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
${PYTHON:-python3} -m pytest -q tests "$@"
