// Counter-based Gumbel noise of the sampling step, shared by the C++ and CUDA ops.
//
// Bit-exact with `gumbel_noise` in gflowgr_core/decoding/step.py (the specification) and the Triton kernel:
//   x = mix(absorb(absorb(absorb(absorb(absorb(0, key_lo), key_hi), level), row), code)),
//   u = ((x >> 8) | 1) * 2^-24,   g = -log(-log(u))   (fp32).
// All arithmetic is on uint32 with wrap-around, which is what the reference's masked int64 arithmetic
// computes.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define GFLOWGR_HD __host__ __device__ __forceinline__
#else
#define GFLOWGR_HD inline
#endif

namespace gflowgr {

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
