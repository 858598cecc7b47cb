// What the compiled ops share: their argument checks and the counter-based Gumbel noise of the sampling
// step. One header for the CPU (.cpp) and CUDA (.cu) files, so an op's two implementations accept exactly
// the same arguments and draw exactly the same noise.
//
// Argument checks. The ops read their tensors through raw data pointers with row-major indexing, so every
// tensor argument must be contiguous: a strided view (e.g. `nodes[:, 0]`) would otherwise be read as if it
// were packed and give wrong results without an error. The Python wrappers validate first (raising
// ValueError) and pass `.contiguous()` tensors; these checks guard direct callers of torch.ops.gflowgr.*.
// Every message starts with the op's name and names the argument.
//
// Gumbel noise. Bit-exact with `gumbel_noise` in gflowgr_core/decoding/step.py (the specification) and the
// Triton kernel:
//   x = mix(absorb(absorb(absorb(absorb(absorb(0, key_lo), key_hi), level), row), code)),
//   u = ((x >> 8) | 1) * 2^-24,   g = -log(-log(u))   (fp32).
// All arithmetic is on uint32 with wrap-around, which is what the reference's masked int64 arithmetic
// computes.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <utility>

#ifdef __CUDACC__
#define GFLOWGR_HD __host__ __device__ __forceinline__
#else
#define GFLOWGR_HD inline
#endif

namespace gflowgr {

// ------------------------------------------------------------------------------------ argument checks

inline void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (got sizes ", t.sizes(), " and strides ",
              t.strides(), "); pass ", arg, ".contiguous()");
}

inline void check_int64(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", arg, " must be int64, got ", t.scalar_type());
}

inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const char* arg) {
  TORCH_CHECK(t.device() == device, op, ": ", arg, " must be on ", device, ", got one on ", t.device());
}

// An optional tensor argument (`Tensor?` in the schema) that was given.
inline bool is_given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The arguments both constrained_step ops take: hidden states h[R, d], the level's rows w[K, d] of the
// head, an optional bias[K], the rows' nodes node[R] and the trie's CSR tables, with the level's node
// range [level_lo, level_hi). Everything must be on h's device.
inline void check_step_inputs(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& node, const at::Tensor& indptr, const at::Tensor& child_code,
                              const at::Tensor& child_node, int64_t level_lo, int64_t level_hi, const char* op) {
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1), op, ": h must be [R, d] and w [K, d] ",
              "with the same d, got ", h.sizes(), " and ", w.sizes());
  TORCH_CHECK(h.is_floating_point() && w.is_floating_point(), op, ": h and w must be floating point");
  TORCH_CHECK(node.dim() == 1 && node.size(0) == h.size(0) && node.scalar_type() == at::kLong, op,
              ": node must be int64 [R] = [", h.size(0), "], got ", node.scalar_type(), " ", node.sizes());
  for (const at::Tensor* t : {&indptr, &child_code, &child_node}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong, op, ": trie tables must be int64 vectors");
  }
  TORCH_CHECK(child_code.size(0) == child_node.size(0) && indptr.size(0) >= level_hi + 1 && level_lo >= 0 &&
                  level_lo <= level_hi,
              op, ": inconsistent trie tables or level bounds [", level_lo, ", ", level_hi, ")");
  const std::pair<const at::Tensor*, const char*> args[] = {
      {&h, "h"}, {&w, "w"}, {&node, "node"}, {&indptr, "indptr"}, {&child_code, "child_code"},
      {&child_node, "child_node"}};
  for (const auto& arg : args) {
    check_device(*arg.first, h.device(), op, arg.second);
    check_contiguous(*arg.first, op, arg.second);
  }
  if (is_given(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op, ": bias must be [K] = [", w.size(0),
                "], got ", bias->sizes());
    check_device(*bias, h.device(), op, "bias");
    check_contiguous(*bias, op, "bias");
  }
}

// The beam op's own arguments: running scores[B, beams_in] with B * beams_in = rows, and beams >= 1.
inline void check_beam_inputs(const at::Tensor& scores, int64_t beams, int64_t rows, const at::Device& device,
                              const char* op) {
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be [B, beams_in], got ", scores.sizes());
  TORCH_CHECK(beams >= 1, op, ": beams must be >= 1, got ", beams);
  TORCH_CHECK(scores.size(0) * scores.size(1) == rows, op, ": scores ", scores.sizes(), " do not match R = ",
              rows, " rows");
  check_device(scores, device, op, "scores");
  check_contiguous(scores, op, "scores");
}

// The sampling op's own arguments: one int64 noise key and a positive temperature.
inline void check_sample_inputs(const at::Tensor& key, double temperature, const at::Device& device,
                                const char* op) {
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(key.numel() == 1 && key.scalar_type() == at::kLong, op, ": key must be one int64, got ",
              key.scalar_type(), " ", key.sizes());
  check_device(key, device, op, "key");
  check_contiguous(key, op, "key");
}

// ------------------------------------------------------------------------ counter-based Gumbel noise

GFLOWGR_HD uint32_t noise_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

GFLOWGR_HD uint32_t noise_absorb(uint32_t state, uint32_t value) {
  return noise_mix32((state ^ value) + 0x9E3779B9u);
}

// Hash state after the key and the decision level (shared by every row of one step).
GFLOWGR_HD uint32_t noise_level_state(int64_t key, int64_t level) {
  const uint64_t k = static_cast<uint64_t>(key);
  uint32_t s = noise_absorb(0u, static_cast<uint32_t>(k & 0xFFFFFFFFull));
  s = noise_absorb(s, static_cast<uint32_t>(k >> 32));
  return noise_absorb(s, static_cast<uint32_t>(level));
}

GFLOWGR_HD uint32_t noise_row_state(uint32_t level_state, int64_t row) {
  return noise_absorb(level_state, static_cast<uint32_t>(row));
}

GFLOWGR_HD uint32_t noise_hash(uint32_t row_state, int64_t code) {
  return noise_mix32(noise_absorb(row_state, static_cast<uint32_t>(code)));
}

GFLOWGR_HD float gumbel_from_hash(uint32_t x) {
  const float u = static_cast<float>((x >> 8) | 1u) * 5.9604644775390625e-08f;  // exact: 24-bit odd / 2^24
  return -logf(-logf(u));
}

}  // namespace gflowgr
