// CPU builder of the level-ordered SID trie (op `gflowgr::trie_build`).
//
// Produces exactly the tensors of the PyTorch reference builder in gflowgr_core/sid/trie.py:
//   level_offsets[L+2], parent[n_nodes], node_code[n_nodes], indptr[n_nodes+1],
//   leaf_ptr[n_leaves+1], leaf_items[n_items], item_leaf[n_items]   (all int64).
// The derived tables (child_code, child_node, dense levels, max_branch) are computed from these in Python
// so both builders share one definition of them.
//
// Algorithm: a stable LSD counting sort of the item rows by their SID (the last level first, each level
// split into digits of at most 16 bits so histograms stay cache-sized), then one scan of the sorted rows:
// row i opens a new node at every level deeper than the first level where it differs from row i-1. Both
// the sort passes and the scan run on per-thread contiguous chunks, so the result does not depend on the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace gflowgr {
namespace {

constexpr int64_t kMinRowsPerThread = 1 << 14;
constexpr int kMaxDigitBits = 16;

int num_chunks_for(int64_t n) {
  const int64_t by_size = std::max<int64_t>(1, n / kMinRowsPerThread);
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), by_size));
}

inline int64_t chunk_begin(int64_t n, int chunks, int t) { return n * t / chunks; }

int bits_needed(int64_t k) {
  // Number of bits to represent codes 0..k-1.
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < k) ++bits;
  return bits;
}

// One stable counting-sort pass of `perm` (into `out`) by the digit (code >> shift) & mask of `level`.
void counting_sort_pass(const int64_t* codes, int64_t L, int64_t level, int shift, int width,
                        const std::vector<int64_t>& perm, std::vector<int64_t>& out, int chunks) {
  const int64_t n = static_cast<int64_t>(perm.size());
  const int64_t buckets = int64_t{1} << width;
  const int64_t mask = buckets - 1;
  std::vector<int64_t> hist(static_cast<size_t>(chunks) * buckets, 0);

#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int t = 0; t < chunks; ++t) {
    int64_t* h = hist.data() + static_cast<int64_t>(t) * buckets;
    const int64_t end = chunk_begin(n, chunks, t + 1);
    for (int64_t i = chunk_begin(n, chunks, t); i < end; ++i) {
      ++h[(codes[perm[i] * L + level] >> shift) & mask];
    }
  }
  // Exclusive scan bucket-major, thread-minor: thread t's rows of bucket b follow those of threads < t,
  // which keeps the pass stable.
  int64_t running = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    for (int t = 0; t < chunks; ++t) {
      int64_t& slot = hist[static_cast<int64_t>(t) * buckets + b];
      const int64_t count = slot;
      slot = running;
      running += count;
    }
  }
#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int t = 0; t < chunks; ++t) {
    int64_t* h = hist.data() + static_cast<int64_t>(t) * buckets;
    const int64_t end = chunk_begin(n, chunks, t + 1);
    for (int64_t i = chunk_begin(n, chunks, t); i < end; ++i) {
      const int64_t row = perm[i];
      out[h[(codes[row * L + level] >> shift) & mask]++] = row;
    }
  }
}

// Row order sorting the SIDs lexicographically; rows with equal SIDs keep their original order.
std::vector<int64_t> lexicographic_order(const int64_t* codes, int64_t n, int64_t L,
                                         const std::vector<int64_t>& K, int chunks) {
  std::vector<int64_t> perm(n), scratch(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  for (int64_t level = L - 1; level >= 0; --level) {
    const int bits = bits_needed(K[level]);
    for (int shift = 0; shift < bits; shift += kMaxDigitBits) {
      const int width = std::min(kMaxDigitBits, bits - shift);
      counting_sort_pass(codes, L, level, shift, width, perm, scratch, chunks);
      perm.swap(scratch);
    }
  }
  return perm;
}

void check_codes(const at::Tensor& codes, const std::vector<int64_t>& K) {
  TORCH_CHECK(codes.device().is_cpu(), "trie_build: codes must be a CPU tensor, got ", codes.device());
  TORCH_CHECK(codes.scalar_type() == at::kLong, "trie_build: codes must be int64, got ",
              codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, "trie_build: codes must be [n_items, L], got ", codes.dim(), " dims");
  TORCH_CHECK(codes.size(0) > 0, "trie_build: codes has no rows (an empty catalogue has no trie)");
  TORCH_CHECK(codes.size(1) == static_cast<int64_t>(K.size()), "trie_build: codes has ", codes.size(1),
              " levels per row but codes_per_level has ", K.size());
  for (size_t l = 0; l < K.size(); ++l) {
    TORCH_CHECK(K[l] > 0, "trie_build: codes_per_level[", l, "] must be positive, got ", K[l]);
  }
  const int64_t n = codes.size(0), L = codes.size(1);
  const int64_t* c = codes.data_ptr<int64_t>();
  int64_t first_bad = n;
#pragma omp parallel for reduction(min : first_bad) schedule(static) num_threads(num_chunks_for(n))
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t v = c[i * L + l];
      if (v < 0 || v >= K[l]) {
        first_bad = std::min(first_bad, i);
        break;
      }
    }
  }
  if (first_bad < n) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t v = c[first_bad * L + l];
      TORCH_CHECK(v >= 0 && v < K[l], "trie_build: item row ", first_bad, ", level ", l, ": code ", v,
                  " is outside [0, ", K[l], ")");
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
trie_build_cpu(const at::Tensor& codes_in, at::IntArrayRef codes_per_level) {
  const std::vector<int64_t> K(codes_per_level.begin(), codes_per_level.end());
  const at::Tensor codes = codes_in.contiguous();
  check_codes(codes, K);
  const int64_t n = codes.size(0), L = codes.size(1);
  const int64_t* c = codes.data_ptr<int64_t>();
  const int chunks = num_chunks_for(n);

  const std::vector<int64_t> perm = lexicographic_order(c, n, L, K, chunks);

  // first_diff[i]: first level where sorted row i differs from row i-1 (L when equal; -1 for row 0,
  // which opens the root's first path). Row i opens one new node at every level > first_diff[i].
  std::vector<int32_t> first_diff(n);
  first_diff[0] = -1;
#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int64_t i = 1; i < n; ++i) {
    const int64_t* a = c + perm[i - 1] * L;
    const int64_t* b = c + perm[i] * L;
    int32_t d = 0;
    while (d < L && a[d] == b[d]) ++d;
    first_diff[i] = d;
  }

  // new_nodes[t * (L+1) + l]: nodes of level l (1..L) opened by chunk t's rows.
  std::vector<int64_t> new_nodes(static_cast<size_t>(chunks) * (L + 1), 0);
#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int t = 0; t < chunks; ++t) {
    int64_t* cnt = new_nodes.data() + static_cast<int64_t>(t) * (L + 1);
    const int64_t end = chunk_begin(n, chunks, t + 1);
    for (int64_t i = chunk_begin(n, chunks, t); i < end; ++i) {
      for (int64_t l = std::max<int64_t>(first_diff[i], 0) + 1; l <= L; ++l) ++cnt[l];
    }
  }
  std::vector<int64_t> offsets(L + 2, 0);
  offsets[1] = 1;
  for (int64_t l = 1; l <= L; ++l) {
    int64_t level_nodes = 0;
    for (int t = 0; t < chunks; ++t) level_nodes += new_nodes[static_cast<int64_t>(t) * (L + 1) + l];
    offsets[l + 1] = offsets[l] + level_nodes;
  }
  const int64_t n_nodes = offsets[L + 1];
  const int64_t n_edges = n_nodes - 1;
  const int64_t n_leaves = offsets[L + 1] - offsets[L];

  const auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor level_offsets = at::empty({L + 2}, opts);
  at::Tensor parent = at::empty({n_nodes}, opts);
  at::Tensor node_code = at::empty({n_nodes}, opts);
  at::Tensor indptr = at::empty({n_nodes + 1}, opts);
  at::Tensor leaf_ptr = at::empty({n_leaves + 1}, opts);
  at::Tensor leaf_items = at::empty({n}, opts);
  at::Tensor item_leaf = at::empty({n}, opts);
  std::copy(offsets.begin(), offsets.end(), level_offsets.data_ptr<int64_t>());
  int64_t* par = parent.data_ptr<int64_t>();
  int64_t* ncode = node_code.data_ptr<int64_t>();
  int64_t* ip = indptr.data_ptr<int64_t>();
  int64_t* lp = leaf_ptr.data_ptr<int64_t>();
  int64_t* li = leaf_items.data_ptr<int64_t>();
  int64_t* il = item_leaf.data_ptr<int64_t>();
  par[0] = -1;
  ncode[0] = -1;
  // Every inner node has a child, so leaves are exactly the nodes with an empty edge range at the end.
  for (int64_t v = offsets[L]; v <= n_nodes; ++v) ip[v] = n_edges;
  lp[n_leaves] = n;

#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int t = 0; t < chunks; ++t) {
    // current[l]: node of level l holding the previous row's prefix.
    std::vector<int64_t> current(L + 1);
    current[0] = 0;
    for (int64_t l = 1; l <= L; ++l) {
      int64_t before = 0;
      for (int u = 0; u < t; ++u) before += new_nodes[static_cast<int64_t>(u) * (L + 1) + l];
      current[l] = offsets[l] + before - 1;
    }
    const int64_t end = chunk_begin(n, chunks, t + 1);
    for (int64_t i = chunk_begin(n, chunks, t); i < end; ++i) {
      const int64_t d = first_diff[i];
      const int64_t* row = c + perm[i] * L;
      for (int64_t l = std::max<int64_t>(d, 0) + 1; l <= L; ++l) {
        const int64_t v = ++current[l];
        const int64_t p = current[l - 1];
        par[v] = p;
        ncode[v] = row[l - 1];
        // A parent opened by this same row (or the root, at row 0) gets its first child here; edge e
        // leads to node e + 1 because nodes and edges share the level order.
        if (l - 1 > d) ip[p] = v - 1;
      }
      if (d < L) lp[current[L] - offsets[L]] = i;
      li[i] = perm[i];
      il[perm[i]] = current[L];
    }
  }
  return {level_offsets, parent, node_code, indptr, leaf_ptr, leaf_items, item_leaf};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gflowgr, m) {
  m.def(
      "trie_build(Tensor codes, int[] codes_per_level) -> (Tensor level_offsets, Tensor parent, "
      "Tensor node_code, Tensor indptr, Tensor leaf_ptr, Tensor leaf_items, Tensor item_leaf)");
}

TORCH_LIBRARY_IMPL(gflowgr, CPU, m) { m.impl("trie_build", &trie_build_cpu); }

}  // namespace gflowgr
