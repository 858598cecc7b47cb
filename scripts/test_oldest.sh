#!/usr/bin/env bash
# Runs the whole test suite against the oldest versions the README promises (constraints/oldest.txt: torch 2.11,
# transformers 5.17, triton 3.6), in a virtualenv built from nothing in a temporary folder, with the README's
# test command. Packages the constraints do not name resolve as for a new user. Needs the package index to serve
# those versions (PyPI does; torch 2.11 comes as its CUDA build, several GB).
#
#   bash scripts/test_oldest.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/gflowgr-oldest.XXXXXX")
trap 'rm -rf "$VENV_ROOT"' EXIT
"${PYTHON:-python3}" -m venv "$VENV_ROOT/venv"
# shellcheck disable=SC1091  # created just above
source "$VENV_ROOT/venv/bin/activate"
# PIP_CONSTRAINT replaces any constraint file of the machine's pip configuration for this run.
export PIP_CONSTRAINT="$PWD/constraints/oldest.txt"
python -m pip install -q torch transformers triton
echo "oldest: new virtualenv $VENV_ROOT/venv with $(python -c 'import torch, transformers, triton; print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")')"
PYTHON=python bash scripts/test.sh "$@"
