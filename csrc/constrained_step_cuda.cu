// Trie-constrained decoding step on CUDA (CUDA kernels of `gflowgr::constrained_step_beam` and
// `gflowgr::constrained_step_sample`, whose schemas are defined in constrained_step.cpp).
//
// Same results as the PyTorch reference `constrained_step_torch` (gflowgr_core/decoding/step.py):
//   1. logits z = h . W^T as one cuBLAS fp32 product (the same product the reference runs), bias added in
//      the kernels as the reference adds it;
//   2. one warp per row: the row's node's children from the CSR edges (indptr / child_code / child_node),
//      the log-softmax over them (or over all K codes without `renormalize`) with a warp-level online
//      log-sum-exp, then
//      - beam: the row's top min(beams, K) candidates score + logp by (value desc, code asc), found one at a
//        time as the best candidate strictly after the previous one in that order (no scratch memory);
//      - sample: argmax of z / temperature + g over the children (ties to the lower code), g the
//        counter-based Gumbel noise of common.h;
//   3. beam only: one warp per batch element merges its beams_in * min(beams, K) candidates into the top
//      `beams` by (value desc, flat index parent * K + code asc); dead slots get parent 0, code -1,
//      next node -1, score -inf.
// Nothing is read back to the host, so the op can be captured in a CUDA graph.
#ifdef GFLOWGR_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common.h"

namespace gflowgr {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kNoOrder = INT64_MAX;

// Strict total order of the reference: value descending, then order (code or flat index) ascending.
__device__ __forceinline__ bool better(float va, int64_t oa, float vb, int64_t ob) {
  return va > vb || (va == vb && oa < ob);
}

// Candidates already emitted are those at or before (prev_v, prev_o) in that order.
__device__ __forceinline__ bool after(float v, int64_t o, float prev_v, int64_t prev_o) {
  return v < prev_v || (v == prev_v && o > prev_o);
}

// Every lane ends with the warp's best (v, o, n).
__device__ __forceinline__ void warp_best(float& v, int64_t& o, int64_t& n) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float v2 = __shfl_xor_sync(kFullMask, v, off);
    const int64_t o2 = __shfl_xor_sync(kFullMask, o, off);
    const int64_t n2 = __shfl_xor_sync(kFullMask, n, off);
    if (better(v2, o2, v, o)) {
      v = v2;
      o = o2;
      n = n2;
    }
  }
}

__device__ __forceinline__ void lse_add(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

// Warp-wide (max, log-sum-exp pieces): logp = (z - max) - logsum, with max = 0 for an empty support.
__device__ __forceinline__ void warp_lse(float& m, float& s, float& logsum) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, off);
    const float s2 = __shfl_xor_sync(kFullMask, s, off);
    const float mm = fmaxf(m, m2);
    s = (mm == -INFINITY) ? 0.f : s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
  }
  if (m == -INFINITY) m = 0.f;
  logsum = logf(s);
}

struct RowView {
  int64_t first = 0;  // first CSR edge of the row's node
  int64_t count = 0;  // number of children (0 when the node is not of this level)
  float max = 0.f;
  float logsum = 0.f;
};

__device__ __forceinline__ float logit(const float* zrow, const float* bias, int64_t c) {
  return bias != nullptr ? zrow[c] + bias[c] : zrow[c];
}

__device__ RowView row_view(const float* zrow, const float* bias, int64_t n, const int64_t* indptr,
                            const int64_t* child_code, int64_t K, int64_t lo, int64_t hi, bool renorm,
                            int lane) {
  RowView row;
  if (n >= lo && n < hi) {
    row.first = indptr[n];
    row.count = indptr[n + 1] - row.first;
  }
  float m = -INFINITY, s = 0.f;
  if (renorm) {
    for (int64_t j = lane; j < row.count; j += kWarp) lse_add(m, s, logit(zrow, bias, child_code[row.first + j]));
  } else {
    for (int64_t k = lane; k < K; k += kWarp) lse_add(m, s, logit(zrow, bias, k));
  }
  warp_lse(m, s, row.logsum);
  row.max = m;
  return row;
}

__global__ void beam_rows_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                                 const int64_t* __restrict__ node, const int64_t* __restrict__ indptr,
                                 const int64_t* __restrict__ child_code, const int64_t* __restrict__ child_node,
                                 const float* __restrict__ scores, int64_t R, int64_t K, int64_t lo, int64_t hi,
                                 bool renorm, int64_t topk, float* __restrict__ cand_v,
                                 int64_t* __restrict__ cand_c, int64_t* __restrict__ cand_n) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;  // the whole warp leaves together
  const float* zrow = logits + r * K;
  const RowView row = row_view(zrow, bias, node[r], indptr, child_code, K, lo, hi, renorm, lane);
  const float score = scores[r];
  float prev_v = INFINITY;
  int64_t prev_o = -1;
  for (int64_t t = 0; t < topk; ++t) {
    float bv = -INFINITY;
    int64_t bo = kNoOrder, bn = -1;
    for (int64_t j = lane; j < row.count; j += kWarp) {
      const int64_t c = child_code[row.first + j];
      const float v = score + ((logit(zrow, bias, c) - row.max) - row.logsum);
      if (v > -INFINITY && after(v, c, prev_v, prev_o) && better(v, c, bv, bo)) {
        bv = v;
        bo = c;
        bn = child_node[row.first + j];
      }
    }
    warp_best(bv, bo, bn);
    if (lane == 0) {
      const bool alive = bv > -INFINITY;
      cand_v[r * topk + t] = bv;
      cand_c[r * topk + t] = alive ? bo : -1;
      cand_n[r * topk + t] = alive ? bn : -1;
    }
    prev_v = bv;
    prev_o = bo;
  }
}

__global__ void beam_merge_kernel(const float* __restrict__ cand_v, const int64_t* __restrict__ cand_c,
                                  const int64_t* __restrict__ cand_n, int64_t B, int64_t n_cand, int64_t topk,
                                  int64_t K, int64_t beams, int64_t* __restrict__ parent,
                                  int64_t* __restrict__ code, int64_t* __restrict__ next,
                                  float* __restrict__ score) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (b >= B) return;
  const int64_t base = b * n_cand;
  float prev_v = INFINITY;
  int64_t prev_o = -1;
  for (int64_t t = 0; t < beams; ++t) {
    float bv = -INFINITY;
    int64_t bo = kNoOrder, bn = -1;
    for (int64_t i = lane; i < n_cand; i += kWarp) {
      const float v = cand_v[base + i];
      const int64_t c = cand_c[base + i];
      if (c < 0 || !(v > -INFINITY)) continue;
      const int64_t o = (i / topk) * K + c;
      if (after(v, o, prev_v, prev_o) && better(v, o, bv, bo)) {
        bv = v;
        bo = o;
        bn = cand_n[base + i];
      }
    }
    warp_best(bv, bo, bn);
    if (lane == 0) {
      const bool alive = bv > -INFINITY;
      const int64_t o = b * beams + t;
      parent[o] = alive ? bo / K : 0;
      code[o] = alive ? bo % K : -1;
      next[o] = alive ? bn : -1;
      score[o] = bv;
    }
    prev_v = bv;
    prev_o = bo;
  }
}

__global__ void sample_kernel(const float* __restrict__ logits, const float* __restrict__ bias,
                              const int64_t* __restrict__ node, const int64_t* __restrict__ indptr,
                              const int64_t* __restrict__ child_code, const int64_t* __restrict__ child_node,
                              const int64_t* __restrict__ key, int64_t level, float inv_temp, int64_t R, int64_t K,
                              int64_t lo, int64_t hi, bool renorm, int64_t* __restrict__ out_code,
                              int64_t* __restrict__ out_next, float* __restrict__ out_logp) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;
  const float* zrow = logits + r * K;
  const RowView row = row_view(zrow, bias, node[r], indptr, child_code, K, lo, hi, renorm, lane);
  const uint32_t row_state = noise_row_state(noise_level_state(key[0], level), r);
  float bv = -INFINITY;
  int64_t bo = kNoOrder, bn = -1;
  for (int64_t j = lane; j < row.count; j += kWarp) {
    const int64_t c = child_code[row.first + j];
    // The reference computes logits / temperature on CUDA as a product with the fp32 reciprocal.
    const float v = logit(zrow, bias, c) * inv_temp + gumbel_from_hash(noise_hash(row_state, c));
    if (bo == kNoOrder || better(v, c, bv, bo)) {
      bv = v;
      bo = c;
      bn = j;
    }
  }
  warp_best(bv, bo, bn);
  if (lane == 0) {
    if (bo == kNoOrder) {
      out_code[r] = -1;
      out_next[r] = -1;
      out_logp[r] = -INFINITY;
    } else {
      out_code[r] = bo;
      out_next[r] = child_node[row.first + bn];
      out_logp[r] = (logit(zrow, bias, bo) - row.max) - row.logsum;
    }
  }
}

struct CudaInputs {
  at::Tensor logits, bias, node;
  int64_t R, K;
};

// Arguments already checked by check_step_inputs (common.h).
CudaInputs prepare(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& node) {
  CudaInputs in;
  in.R = h.size(0);
  in.K = w.size(0);
  // fp32 logits from the same product the reference computes (h.float() @ w.float().t()).
  in.logits = at::mm(h.to(at::kFloat), w.to(at::kFloat).t()).contiguous();
  if (is_given(bias)) in.bias = bias->to(at::kFloat).contiguous();
  in.node = node;
  return in;
}

unsigned blocks_for(int64_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> constrained_step_beam_cuda(
    const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& node,
    const at::Tensor& indptr, const at::Tensor& child_code, const at::Tensor& child_node, int64_t level_lo,
    int64_t level_hi, const at::Tensor& scores, int64_t beams, bool renormalize) {
  const char* op = "constrained_step_beam";
  const c10::cuda::CUDAGuard guard(h.device());
  check_step_inputs(h, w, bias, node, indptr, child_code, child_node, level_lo, level_hi, op);
  check_beam_inputs(scores, beams, h.size(0), h.device(), op);
  const CudaInputs in = prepare(h, w, bias, node);
  const int64_t B = scores.size(0), beams_in = scores.size(1);
  const at::Tensor sc = scores.to(at::kFloat).contiguous();
  const int64_t topk = std::min(beams, in.K);
  auto opts = h.options();
  at::Tensor parent = at::empty({B, beams}, opts.dtype(at::kLong));
  at::Tensor code = at::empty({B, beams}, opts.dtype(at::kLong));
  at::Tensor next = at::empty({B, beams}, opts.dtype(at::kLong));
  at::Tensor score = at::empty({B, beams}, opts.dtype(at::kFloat));
  if (in.R == 0) return {parent, code, next, score};
  at::Tensor cand_v = at::empty({in.R, topk}, opts.dtype(at::kFloat));
  at::Tensor cand_c = at::empty({in.R, topk}, opts.dtype(at::kLong));
  at::Tensor cand_n = at::empty({in.R, topk}, opts.dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* bias_ptr = in.bias.defined() ? in.bias.data_ptr<float>() : nullptr;
  beam_rows_kernel<<<blocks_for(in.R), kWarp * kWarpsPerBlock, 0, stream>>>(
      in.logits.data_ptr<float>(), bias_ptr, in.node.data_ptr<int64_t>(), indptr.data_ptr<int64_t>(),
      child_code.data_ptr<int64_t>(), child_node.data_ptr<int64_t>(), sc.data_ptr<float>(), in.R, in.K,
      level_lo, level_hi, renormalize, topk, cand_v.data_ptr<float>(), cand_c.data_ptr<int64_t>(),
      cand_n.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  beam_merge_kernel<<<blocks_for(B), kWarp * kWarpsPerBlock, 0, stream>>>(
      cand_v.data_ptr<float>(), cand_c.data_ptr<int64_t>(), cand_n.data_ptr<int64_t>(), B, beams_in * topk,
      topk, in.K, beams, parent.data_ptr<int64_t>(), code.data_ptr<int64_t>(), next.data_ptr<int64_t>(),
      score.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {parent, code, next, score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> constrained_step_sample_cuda(
    const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& node,
    const at::Tensor& indptr, const at::Tensor& child_code, const at::Tensor& child_node, int64_t level_lo,
    int64_t level_hi, const at::Tensor& key, int64_t level, double temperature, bool renormalize) {
  const char* op = "constrained_step_sample";
  const c10::cuda::CUDAGuard guard(h.device());
  check_step_inputs(h, w, bias, node, indptr, child_code, child_node, level_lo, level_hi, op);
  check_sample_inputs(key, temperature, h.device(), op);
  const CudaInputs in = prepare(h, w, bias, node);
  auto opts = h.options();
  at::Tensor code = at::empty({in.R}, opts.dtype(at::kLong));
  at::Tensor next = at::empty({in.R}, opts.dtype(at::kLong));
  at::Tensor logp = at::empty({in.R}, opts.dtype(at::kFloat));
  if (in.R == 0) return {code, next, logp};
  const float inv_temp = 1.f / static_cast<float>(temperature);
  sample_kernel<<<blocks_for(in.R), kWarp * kWarpsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.logits.data_ptr<float>(), in.bias.defined() ? in.bias.data_ptr<float>() : nullptr,
      in.node.data_ptr<int64_t>(), indptr.data_ptr<int64_t>(), child_code.data_ptr<int64_t>(),
      child_node.data_ptr<int64_t>(), key.data_ptr<int64_t>(), level, inv_temp, in.R, in.K, level_lo, level_hi,
      renormalize, code.data_ptr<int64_t>(), next.data_ptr<int64_t>(), logp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {code, next, logp};
}

}  // namespace

TORCH_LIBRARY_IMPL(gflowgr, CUDA, m) {
  m.impl("constrained_step_beam", &constrained_step_beam_cuda);
  m.impl("constrained_step_sample", &constrained_step_sample_cuda);
}

}  // namespace gflowgr

#endif  // GFLOWGR_WITH_CUDA
