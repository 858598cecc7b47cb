"""Build script for gflowgr.

The Python library always installs. The compiled extension ``gflowgr_core._C`` (C++ CPU ops with OpenMP,
plus CUDA ops when torch was built with CUDA and ``nvcc`` is found) is built when torch and a C++ compiler
are present. If the CUDA ops fail to compile (say nvcc and torch's CUDA disagree), the C++ CPU ops are built
alone; if that fails too the package still installs and falls back to the PyTorch/Triton paths. What was built,
and why not more, is written to ``build/extension_build.txt`` (``scripts/setup_env.sh`` prints it), because pip
hides the compiler's output unless run with ``-v``.
Set ``GFLOWGR_NO_EXT=1`` to skip the extension on purpose, and ``GFLOWGR_REQUIRE_EXT=1`` to make a failed (or
impossible) extension build fail the install instead.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIRE_EXT = os.environ.get("GFLOWGR_REQUIRE_EXT") == "1"


def _no_extension(what: str, fix: str) -> None:
    """Say loudly that the extension is not built, or stop the install under ``GFLOWGR_REQUIRE_EXT=1``."""
    lines = [
        "=" * 78,
        "gflowgr: WARNING: the compiled extension gflowgr_core._C was NOT built.",
        f"  What failed: {what}",
        "  Consequence: gflowgr installs and runs, but the 'cpp' and 'cuda' backends are missing; their ops",
        "  (constrained decoding step, C++ trie builder) use the slower PyTorch fallbacks.",
        f"  Fix: {fix}",
        "  Set GFLOWGR_REQUIRE_EXT=1 to make this an install error.",
        "=" * 78,
    ]
    _write_status(f"not built: {what}")
    if REQUIRE_EXT:
        raise SystemExit("\n".join(["gflowgr: GFLOWGR_REQUIRE_EXT=1 and the compiled extension cannot be built:",
                                     f"  {what}", f"  Fix: {fix}"]))
    print("\n".join(lines), file=sys.stderr)


def _write_status(text: str) -> None:
    """Record what the last build produced, for ``scripts/setup_env.sh`` to report under a quiet pip."""
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", "extension_build.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _extension_modules():
    if os.environ.get("GFLOWGR_NO_EXT") == "1":
        if REQUIRE_EXT:
            raise SystemExit("gflowgr: GFLOWGR_NO_EXT=1 and GFLOWGR_REQUIRE_EXT=1 contradict each other")
        print("gflowgr: GFLOWGR_NO_EXT=1, skipping the compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _no_extension(f"torch is not importable at build time ({exc})",
                      "install torch first, then `pip install --no-build-isolation -e .`")
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    cxx_flags = ["-O3", "-std=c++17"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    use_cuda = (bool(cu_sources) and torch.version.cuda is not None
                and (cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None)
                and os.environ.get("GFLOWGR_NO_CUDA_EXT") != "1")
    cpu_ext = cpp_extension.CppExtension(
        "gflowgr_core._C", cpp_sources, extra_compile_args=cxx_flags, extra_link_args=link_flags)
    ext = cpu_ext
    cuda_error = None
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch picks the CUDA architectures from the visible GPUs; with none (a CPU machine with a CUDA build of
        # torch) its build fails with a bare IndexError, so say what is missing instead of trying.
        use_cuda = False
        cuda_error = ("no GPU is visible to choose the CUDA architectures from; set TORCH_CUDA_ARCH_LIST "
                      "(e.g. '9.0' for H100) to build the CUDA ops anyway")
        print(f"gflowgr: the CUDA ops are not built: {cuda_error}", file=sys.stderr)
    if use_cuda:
        try:
            ext = cpp_extension.CUDAExtension(
                "gflowgr_core._C", cpp_sources + cu_sources,
                extra_compile_args={"cxx": cxx_flags + ["-DGFLOWGR_WITH_CUDA"],
                                    "nvcc": ["-O3", "-std=c++17", "-DGFLOWGR_WITH_CUDA"]},
                extra_link_args=link_flags)
        except Exception as exc:  # noqa: BLE001 - e.g. an incomplete toolkit: keep the CPU ops
            if REQUIRE_EXT:
                raise
            cuda_error = f"{type(exc).__name__}: {exc}"
            print(f"gflowgr: WARNING: the CUDA ops cannot be built ({cuda_error}); building the C++ CPU ops alone",
                  file=sys.stderr)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension; a failure does not fail the install (the library has pure-PyTorch
        fallbacks) unless ``GFLOWGR_REQUIRE_EXT=1``, but is reported in a block that is hard to miss. A failed
        CUDA build is retried without the CUDA ops, so the CPU ops are not lost to an nvcc problem."""

        def _build_cpu_only(self, inplace: bool) -> None:
            # The extension object was finalised by setuptools: take the CPU build's settings onto it in place.
            for attr in ("sources", "include_dirs", "library_dirs", "runtime_library_dirs", "libraries",
                         "define_macros", "extra_compile_args", "extra_link_args"):
                setattr(ext, attr, getattr(cpu_ext, attr))
            # The failed run left its compiler object (run() wants a name or None) and, mid-way, inplace off.
            self.compiler, self.inplace = None, inplace
            super().run()

        def run(self):
            fix = ("install a C++17 compiler (and nvcc for the CUDA ops) matching torch "
                   f"{torch.__version__}, then `pip install --no-build-isolation -v -e .` to see the compiler output")
            inplace = self.inplace
            try:
                super().run()
                if ext is not cpu_ext:
                    _write_status("built: C++ CPU ops and CUDA ops")
                elif cuda_error is not None:
                    _write_status(f"built: C++ CPU ops only; the CUDA ops were not built ({cuda_error})")
                else:
                    _write_status("built: C++ CPU ops (no CUDA ops: torch has no CUDA, nvcc was not found or "
                                  "GFLOWGR_NO_CUDA_EXT=1)")
                return
            except Exception as exc:  # noqa: BLE001 - any compiler failure degrades to a fallback
                if ext is cpu_ext or REQUIRE_EXT:
                    _no_extension(f"compiling {', '.join(ext.sources)} raised {type(exc).__name__}: {exc}", fix)
                    return
                failed = f"{type(exc).__name__}: {exc}"
            print(f"gflowgr: WARNING: the CUDA ops failed to compile ({failed}); building the C++ CPU ops "
                  "alone (set GFLOWGR_NO_CUDA_EXT=1 to skip the attempt)", file=sys.stderr)
            try:
                self._build_cpu_only(inplace)
            except Exception as exc:  # noqa: BLE001
                _no_extension(f"compiling {', '.join(cpu_ext.sources)} raised {type(exc).__name__}: {exc} "
                              f"(and the CUDA build before it: {failed})", fix)
                return
            _write_status(f"built: C++ CPU ops only; the CUDA ops failed to compile ({failed}). {fix}")

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="gflowgr",
    version="0.1.0",
    description="GFlowNet fine-tuning of generative recommenders with fused trie-constrained kernels",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gflowgr_core", "gflowgr_core.*"]) + ["gflowgr_core.kernels"],
    package_dir={"gflowgr_core.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "pyyaml", "transformers>=4.46", "matplotlib"],
    extras_require={
        "triton": ["triton>=3.6"],
        "pretrained": ["peft>=0.17", "accelerate", "gguf"],
        "trl": ["trl>=1.16,<1.17"],
        "test": ["pytest", "hypothesis", "triton>=3.6; platform_system=='Linux'", "trl>=1.16,<1.17"],
    },
    entry_points={"console_scripts": ["gflowgr=gflowgr_core.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
