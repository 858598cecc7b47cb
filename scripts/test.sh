#!/usr/bin/env bash
# Sets up the environment (a no-op when nothing changed) and runs the whole test suite (CPU; Triton kernels
# under TRITON_INTERPRET=1). It ends with one `skipped: N (reason)` line per skip reason (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
${PYTHON:-python3} -m pytest -q tests "$@"
