// Argument checks shared by the compiled ops.
//
// The ops read their tensors through raw data pointers with row-major indexing, so every tensor argument
// must be contiguous: a strided view (e.g. `nodes[:, 0]`) would otherwise be read as if it were packed and
// give wrong results without an error. The Python wrappers pass `.contiguous()` tensors; these checks guard
// direct callers of torch.ops.gflowgr.*.
#pragma once

#include <ATen/ATen.h>

namespace gflowgr {

inline void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (got sizes ", t.sizes(), " and strides ",
              t.strides(), "); pass ", arg, ".contiguous()");
}

}  // namespace gflowgr
