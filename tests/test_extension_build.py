"""setup.py: a CUDA build that fails to compile still leaves the C++ CPU ops, and says why in
build/extension_build.txt (pip hides the compiler output, so scripts/setup_env.sh prints that file). Runs
setup.py on a stand-in csrc/ with a torch that claims CUDA and an nvcc that fails."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# A minimal stand-in for csrc/: the test is about setup.py's fallback, and compiling the real ops (torch headers)
# costs minutes; a plain C module builds in a second and says whether its CUDA flag was set.
MODULE = """
#include <Python.h>
static PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef GFLOWGR_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
static PyMethodDef methods[] = {{"has_cuda", has_cuda, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
"""


def _copy_sources(dst: Path) -> None:
    shutil.copy(ROOT / "setup.py", dst / "setup.py")
    shutil.copy(ROOT / "README.md", dst / "README.md")
    (dst / "csrc").mkdir()
    (dst / "csrc" / "module.cpp").write_text(MODULE)
    (dst / "csrc" / "ops_cuda.cu").write_text("// compiled only by nvcc\n")
    (dst / "gflowgr_core").mkdir()
    (dst / "kernels").mkdir()


NEEDS_COMPILER = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler")


def _build(tmp_path: Path, gpu_visible: bool = True, **env_extra: str):
    """``setup.py build_ext --inplace`` on the stand-in sources, with a torch that claims a CUDA build (and, with
    ``gpu_visible=False``, sees no GPU) and an nvcc that fails the way a mismatched toolkit does. Returns the
    source folder and the finished process."""
    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)
    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    nvcc = cuda_home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: fatal: unsupported toolkit (test)' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        f"import torch, torch.utils.cpp_extension\ntorch.version.cuda = '99.0'\n"
        f"torch.utils.cpp_extension.CUDA_HOME = {str(cuda_home)!r}\n"
        + ("" if gpu_visible else "torch.cuda.is_available = lambda: False\n"))
    env = dict(os.environ, CUDA_HOME=str(cuda_home), PATH=f"{cuda_home / 'bin'}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(shim), MAX_JOBS="2")
    for key in ("GFLOWGR_NO_EXT", "GFLOWGR_NO_CUDA_EXT", "GFLOWGR_REQUIRE_EXT", "TORCH_CUDA_ARCH_LIST"):
        env.pop(key, None)
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                          capture_output=True, text=True, timeout=900)
    return src, proc


@NEEDS_COMPILER
def test_failed_cuda_compile_falls_back_to_the_cpu_ops(tmp_path):
    src, proc = _build(tmp_path, TORCH_CUDA_ARCH_LIST="9.0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the CUDA ops failed to compile" in proc.stderr
    status = (src / "build" / "extension_build.txt").read_text()
    assert status.startswith("built: C++ CPU ops only; the CUDA ops failed to compile"), status
    built = list((src / "gflowgr_core").glob("_C*.so"))
    assert len(built) == 1, list((src / "gflowgr_core").iterdir())
    # The module loads and reports that it was built without its CUDA ops.
    check = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import importlib.util
            spec = importlib.util.spec_from_file_location("_C", {str(built[0])!r})
            ext = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(ext)
            print("has_cuda", ext.has_cuda())
        """)], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "has_cuda False" in check.stdout, check.stdout


def test_failed_cuda_compile_fails_the_install_when_the_extension_is_required(tmp_path):
    src, proc = _build(tmp_path, TORCH_CUDA_ARCH_LIST="9.0", GFLOWGR_REQUIRE_EXT="1")
    assert proc.returncode != 0
    assert "GFLOWGR_REQUIRE_EXT=1" in proc.stderr + proc.stdout
    assert (src / "build" / "extension_build.txt").read_text().startswith("not built: compiling csrc/module.cpp")


@NEEDS_COMPILER
def test_no_visible_gpu_and_no_arch_list_builds_the_cpu_ops_and_says_why(tmp_path):
    """torch chooses CUDA architectures from the visible GPUs; with none and no TORCH_CUDA_ARCH_LIST its build
    would fail with a bare IndexError, so the CUDA ops are skipped up front with the setting to use."""
    src, proc = _build(tmp_path, gpu_visible=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = (src / "build" / "extension_build.txt").read_text()
    assert status.startswith("built: C++ CPU ops only; the CUDA ops were not built (no GPU is visible"), status
    assert "TORCH_CUDA_ARCH_LIST" in status
    assert len(list((src / "gflowgr_core").glob("_C*.so"))) == 1
