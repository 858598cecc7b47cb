"""The top-level ``kernels/`` folder never answers ``import kernels`` in place of the PyPI package of that name.

transformers (5.25 and newer) imports the PyPI package ``kernels`` from ``transformers.activations``; with the
checkout root first on ``sys.path`` (``python -m ...``, ``python -c``, a notebook started in the root) a regular
package ``kernels/`` there would shadow it and break every HF model import. Each command below runs as a new
process from the checkout root, as a user would type it, once as the machine has it and once with the PyPI
``kernels`` hidden (its module and its metadata, as on a machine that never installed it).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs the rest of the command line as `python -m MODULE ARGS...` or `python -c CODE`, with the PyPI `kernels`
# gone: importing it finds only what the non-site-packages entries of sys.path hold (the checkout root among
# them), and its distribution metadata is not found.
HIDE_KERNELS = r"""
import importlib.abc, importlib.machinery, importlib.metadata, runpy, sys

class HideInstalledKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        local = [p for p in sys.path if "-packages" not in p]
        spec = importlib.machinery.PathFinder.find_spec(name, local)
        if spec is None:
            raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
        return spec

_distribution = importlib.metadata.distribution
def distribution(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _distribution(name)

sys.meta_path.insert(0, HideInstalledKernels())
importlib.metadata.distribution = distribution
kind, target, *rest = sys.argv[1:]
sys.path.insert(0, "")
if kind == "-m":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
"""

COMMANDS = {
    "collect": ["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
    "cli": ["-m", "gflowgr_core.cli", "--help"],
    "hf_models": ["-c", "from transformers import T5ForConditionalGeneration, Qwen2ForCausalLM"],
}


def _installed_kernels() -> bool:
    # By its distribution metadata: find_spec could answer with the very folder this file guards against.
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _run(args: list[str], hide: bool) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", HIDE_KERNELS, *args] if hide else [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("hide", [False, True], ids=["pypi_kernels_as_installed", "pypi_kernels_absent"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_commands_from_the_checkout_root(name, hide):
    if not hide and not _installed_kernels():
        pytest.skip("the PyPI package `kernels` is not installed here (transformers < 5.25 does not require it)")
    result = _run(COMMANDS[name], hide)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(COMMANDS[name])} failed from {ROOT}:\n{output[-4000:]}"
    assert "cannot import name" not in output and "errors during collection" not in output, output[-4000:]
    if name == "collect":
        assert " tests collected" in output or " test collected" in output, output[-2000:]


def test_root_kernels_folder_is_not_a_regular_package():
    # A regular package (an __init__.py) there would win over site-packages whenever the root is on sys.path.
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_import_kernels_resolves_to_the_installed_package():
    if not _installed_kernels():
        pytest.skip("the PyPI package `kernels` is not installed here")
    code = "import kernels, sys; print(kernels.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "-packages" in result.stdout and str(ROOT / "kernels") not in result.stdout, result.stdout
