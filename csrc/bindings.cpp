// The Python module `gflowgr_core._C`.
//
// This file only holds module-level queries. Every op lives in its own .cpp (and .cu) file and registers
// itself in the `gflowgr` operator namespace with TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL; importing
// this module loads the shared library, which runs those registrations, after which Python calls the ops
// as torch.ops.gflowgr.<name>. Adding an op therefore never touches this file (see csrc/README.md).
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef GFLOWGR_VERSION
#define GFLOWGR_VERSION "0.1.0"
#endif

namespace {

bool has_cuda() {
#ifdef GFLOWGR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::string torch_headers_version() {
#ifdef TORCH_VERSION_MAJOR
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gflowgr compiled ops; the ops themselves are registered as torch.ops.gflowgr.*";
  m.def("has_cuda", &has_cuda, "True when the extension was compiled with its CUDA ops (GFLOWGR_WITH_CUDA).");
  m.def("has_openmp", &has_openmp, "True when the CPU ops were compiled with OpenMP.");
  m.def("version", []() { return std::string(GFLOWGR_VERSION); },
        "Version of the gflowgr sources the extension was built from.");
  m.def("torch_version", []() { return torch_headers_version(); },
        "Version of the torch headers the extension was compiled against.");
}
