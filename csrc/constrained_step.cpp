// Trie-constrained decoding step on the CPU (ops `gflowgr::constrained_step_beam` and
// `gflowgr::constrained_step_sample`); the op schemas are defined here for every device.
//
// Same results as the PyTorch reference `constrained_step_torch` in gflowgr_core/decoding/step.py:
//   logp[r, c] = log-softmax of z[r, :] = h[r] . W[:] (+ bias) over the children c of node[r]
//                (renormalize) or over all K codes of the level, -inf off the children;
//   beam:   top-`beams` of score[b, i] + logp[b * beams_in + i, c] over (i, c), ties to the lower flat
//           index i * K + c; dead slots: parent 0, code -1, next node -1, score -inf;
//   sample: argmax over the children of z / temperature + g(key, level, r, c), ties to the lower code,
//           with the counter-based Gumbel noise g of the reference (`gumbel_noise`).
//
// Rows are independent: OpenMP (at::parallel_for) over rows. A row walks its node's CSR edges
// (indptr[n] .. indptr[n + 1], codes sorted ascending), so with `renormalize` only the children are scored
// (dot products of h[r] with the children's rows of W), which at the deep levels of a SID trie is a few
// codes instead of K. Without `renormalize` the level's full log-partition is needed: the logits then come
// from one BLAS matrix product. The beam top-k is two-staged: each row keeps its own top min(beams, K)
// candidates (the global top-`beams` of a batch element takes at most that many from one row), then each
// batch element merges its beams_in * min(beams, K) candidates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace gflowgr {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Candidate {
  float value;
  int64_t order;  // tie-break key, ascending: the code within a row, the flat index within a batch element
  int64_t node;
};

// Strict total order of the reference: value descending, then order ascending.
inline bool better(const Candidate& a, const Candidate& b) {
  return a.value > b.value || (a.value == b.value && a.order < b.order);
}

inline float dot(const float* a, const float* b, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

struct StepInputs {
  at::Tensor h, w, bias, logits;  // fp32, contiguous; `bias` / `logits` undefined when absent / not needed
  const int64_t* node;
  const int64_t* indptr;
  const int64_t* child_code;
  const int64_t* child_node;
  int64_t R, d, K, lo, hi;
};

// Arguments already checked by check_step_inputs (common.h).
StepInputs prepare(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                   const at::Tensor& node, const at::Tensor& indptr, const at::Tensor& child_code,
                   const at::Tensor& child_node, int64_t level_lo, int64_t level_hi, bool renormalize) {
  StepInputs in;
  in.h = h.to(at::kFloat).contiguous();
  in.w = w.to(at::kFloat).contiguous();
  in.R = h.size(0);
  in.d = h.size(1);
  in.K = w.size(0);
  if (is_given(bias)) in.bias = bias->to(at::kFloat).contiguous();
  if (!renormalize && in.R > 0) {
    // The level's log-partition needs every code's logit: one BLAS product, bias added as the reference does.
    in.logits = at::mm(in.h, in.w.t());
    if (in.bias.defined()) in.logits.add_(in.bias);
  }
  in.node = node.data_ptr<int64_t>();
  in.indptr = indptr.data_ptr<int64_t>();
  in.child_code = child_code.data_ptr<int64_t>();
  in.child_node = child_node.data_ptr<int64_t>();
  in.lo = level_lo;
  in.hi = level_hi;
  return in;
}

// One row: its children's logits (into `z`, edge order) and the log-partition pieces (max, log-sum) so that
// logp = (z - max) - logsum as in the reference log-softmax. Returns the first edge; `n_children` is 0 for a
// row whose node is not of this level.
struct RowLogits {
  int64_t first_edge = 0;
  int64_t n_children = 0;
  float max = 0.f;
  float logsum = 0.f;
};

RowLogits row_logits(const StepInputs& in, int64_t r, std::vector<float>& z) {
  RowLogits out;
  const int64_t n = in.node[r];
  if (n < in.lo || n >= in.hi) return out;
  out.first_edge = in.indptr[n];
  out.n_children = in.indptr[n + 1] - out.first_edge;
  z.resize(static_cast<size_t>(out.n_children));
  const float* bias = in.bias.defined() ? in.bias.data_ptr<float>() : nullptr;
  const float* hr = in.h.data_ptr<float>() + r * in.d;
  const float* full = in.logits.defined() ? in.logits.data_ptr<float>() + r * in.K : nullptr;
  for (int64_t j = 0; j < out.n_children; ++j) {
    const int64_t c = in.child_code[out.first_edge + j];
    if (full != nullptr) {
      z[j] = full[c];
    } else {
      z[j] = dot(hr, in.w.data_ptr<float>() + c * in.d, in.d);
      if (bias != nullptr) z[j] += bias[c];
    }
  }
  // Support of the softmax: the children, or all K codes.
  float m = kNegInf;
  if (full != nullptr) {
    for (int64_t k = 0; k < in.K; ++k) m = std::max(m, full[k]);
  } else {
    for (int64_t j = 0; j < out.n_children; ++j) m = std::max(m, z[j]);
  }
  if (m == kNegInf) m = 0.f;
  float total = 0.f;
  if (full != nullptr) {
    for (int64_t k = 0; k < in.K; ++k) total += std::exp(full[k] - m);
  } else {
    for (int64_t j = 0; j < out.n_children; ++j) total += std::exp(z[j] - m);
  }
  out.max = m;
  out.logsum = std::log(total);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> constrained_step_beam_cpu(
    const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& node,
    const at::Tensor& indptr, const at::Tensor& child_code, const at::Tensor& child_node, int64_t level_lo,
    int64_t level_hi, const at::Tensor& scores, int64_t beams, bool renormalize) {
  const char* op = "constrained_step_beam";
  check_step_inputs(h, w, bias, node, indptr, child_code, child_node, level_lo, level_hi, op);
  check_beam_inputs(scores, beams, h.size(0), h.device(), op);
  const StepInputs in =
      prepare(h, w, bias, node, indptr, child_code, child_node, level_lo, level_hi, renormalize);
  const int64_t B = scores.size(0), beams_in = scores.size(1);
  const at::Tensor sc = scores.to(at::kFloat).contiguous();
  const float* score = sc.data_ptr<float>();
  const int64_t K = in.K, topk = std::min(beams, K);

  // Stage 1: each row's best min(beams, K) live candidates, best first; unused slots have value -inf.
  std::vector<Candidate> rows(static_cast<size_t>(in.R * topk), Candidate{kNegInf, 0, -1});
  at::parallel_for(0, in.R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> z;
    std::vector<Candidate> cand;
    for (int64_t r = begin; r < end; ++r) {
      const RowLogits row = row_logits(in, r, z);
      cand.clear();
      for (int64_t j = 0; j < row.n_children; ++j) {
        const float v = score[r] + ((z[j] - row.max) - row.logsum);
        if (v > kNegInf) cand.push_back({v, in.child_code[row.first_edge + j], in.child_node[row.first_edge + j]});
      }
      const int64_t keep = std::min<int64_t>(topk, static_cast<int64_t>(cand.size()));
      std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), better);
      std::copy(cand.begin(), cand.begin() + keep, rows.begin() + r * topk);
    }
  });

  // Stage 2: per batch element, the best `beams` of its rows' candidates by (value desc, flat index asc).
  auto long_opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor parent = at::empty({B, beams}, long_opts);
  at::Tensor code = at::empty({B, beams}, long_opts);
  at::Tensor next = at::empty({B, beams}, long_opts);
  at::Tensor out_score = at::empty({B, beams}, at::TensorOptions().dtype(at::kFloat));
  int64_t* par = parent.data_ptr<int64_t>();
  int64_t* cod = code.data_ptr<int64_t>();
  int64_t* nxt = next.data_ptr<int64_t>();
  float* osc = out_score.data_ptr<float>();
  at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
    std::vector<Candidate> cand;
    for (int64_t b = begin; b < end; ++b) {
      cand.clear();
      for (int64_t i = 0; i < beams_in; ++i) {
        const Candidate* c = rows.data() + (b * beams_in + i) * topk;
        for (int64_t j = 0; j < topk && c[j].value > kNegInf; ++j) {
          cand.push_back({c[j].value, i * K + c[j].order, c[j].node});
        }
      }
      const int64_t keep = std::min<int64_t>(beams, static_cast<int64_t>(cand.size()));
      std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), better);
      for (int64_t j = 0; j < beams; ++j) {
        const int64_t o = b * beams + j;
        if (j < keep) {
          par[o] = cand[j].order / K;
          cod[o] = cand[j].order % K;
          nxt[o] = cand[j].node;
          osc[o] = cand[j].value;
        } else {
          par[o] = 0;
          cod[o] = -1;
          nxt[o] = -1;
          osc[o] = kNegInf;
        }
      }
    }
  });
  return {parent, code, next, out_score};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> constrained_step_sample_cpu(
    const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const at::Tensor& node,
    const at::Tensor& indptr, const at::Tensor& child_code, const at::Tensor& child_node, int64_t level_lo,
    int64_t level_hi, const at::Tensor& key, int64_t level, double temperature, bool renormalize) {
  const char* op = "constrained_step_sample";
  check_step_inputs(h, w, bias, node, indptr, child_code, child_node, level_lo, level_hi, op);
  check_sample_inputs(key, temperature, h.device(), op);
  const StepInputs in =
      prepare(h, w, bias, node, indptr, child_code, child_node, level_lo, level_hi, renormalize);
  const uint32_t level_state = noise_level_state(key.cpu().item<int64_t>(), level);
  // The reference divides by the temperature as an fp32 scalar.
  const float temp = static_cast<float>(temperature);
  auto long_opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor code = at::empty({in.R}, long_opts);
  at::Tensor next = at::empty({in.R}, long_opts);
  at::Tensor logp = at::empty({in.R}, at::TensorOptions().dtype(at::kFloat));
  int64_t* cod = code.data_ptr<int64_t>();
  int64_t* nxt = next.data_ptr<int64_t>();
  float* lp = logp.data_ptr<float>();
  at::parallel_for(0, in.R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> z;
    for (int64_t r = begin; r < end; ++r) {
      const RowLogits row = row_logits(in, r, z);
      const uint32_t row_state = noise_row_state(level_state, r);
      int64_t best = -1;
      float best_v = kNegInf;
      for (int64_t j = 0; j < row.n_children; ++j) {
        const int64_t c = in.child_code[row.first_edge + j];
        const float v = z[j] / temp + gumbel_from_hash(noise_hash(row_state, c));
        // Edges are in ascending code order: strict > keeps the lower code on ties.
        if (best < 0 || v > best_v) {
          best = j;
          best_v = v;
        }
      }
      if (best < 0) {
        cod[r] = -1;
        nxt[r] = -1;
        lp[r] = kNegInf;
      } else {
        cod[r] = in.child_code[row.first_edge + best];
        nxt[r] = in.child_node[row.first_edge + best];
        lp[r] = (z[best] - row.max) - row.logsum;
      }
    }
  });
  return {code, next, logp};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gflowgr, m) {
  m.def(
      "constrained_step_beam(Tensor h, Tensor w, Tensor? bias, Tensor node, Tensor indptr, Tensor child_code, "
      "Tensor child_node, int level_lo, int level_hi, Tensor scores, int beams, bool renormalize) -> "
      "(Tensor parent, Tensor code, Tensor next_node, Tensor score)");
  m.def(
      "constrained_step_sample(Tensor h, Tensor w, Tensor? bias, Tensor node, Tensor indptr, "
      "Tensor child_code, Tensor child_node, int level_lo, int level_hi, Tensor key, int level, "
      "float temperature, bool renormalize) -> (Tensor code, Tensor next_node, Tensor logp)");
}

TORCH_LIBRARY_IMPL(gflowgr, CPU, m) {
  m.impl("constrained_step_beam", &constrained_step_beam_cpu);
  m.impl("constrained_step_sample", &constrained_step_sample_cpu);
}

}  // namespace gflowgr
