// CPU builder of the level-ordered SID trie (op `gflowgr::trie_build`).
//
// Produces exactly the tensors of the PyTorch reference builder in gflowgr_core/sid/trie.py:
//   level_offsets[L+2], parent[n_nodes], node_code[n_nodes], indptr[n_nodes+1],
//   leaf_ptr[n_leaves+1], leaf_items[n_items], item_leaf[n_items]   (all int64).
// The derived tables (child_code, child_node, dense levels, max_branch) are computed from these in Python
// so both builders share one definition of them.
//
// Algorithm: a stable LSD radix sort of the item rows by their SID, then one scan of the sorted rows: row
// i opens a new node at every level deeper than the first level where it differs from row i-1.
// When the SID fits in 64 bits (each level packed into ceil(log2 K_l) bits), the sort moves (key, row)
// pairs and reads everything sequentially, and the first differing level comes from the highest set bit
// of key[i] ^ key[i-1]. Wider SIDs are sorted level by level (last level first) by gathering each row's
// code. Sort passes and scan work on per-thread contiguous chunks, so the result never depends on the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"

namespace gflowgr {
namespace {

constexpr int64_t kMinRowsPerThread = 1 << 14;
constexpr int kPackedDigitBits = 11;   // 2048 buckets: 3 passes for 4 x 256 codes
constexpr int kGatherDigitBits = 16;   // wide-SID path: one pass per level for K_l <= 65536

int num_chunks_for(int64_t n) {
  const int64_t by_size = std::max<int64_t>(1, n / kMinRowsPerThread);
  return static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), by_size));
}

inline int64_t chunk_begin(int64_t n, int chunks, int t) { return n * t / chunks; }

int bits_needed(int64_t k) {
  // Bits to represent codes 0..k-1.
  int bits = 0;
  while (bits < 63 && (int64_t{1} << bits) < k) ++bits;
  return bits;
}

// One stable, parallel counting-sort pass: out[...] = in[i] ordered by digit(i), where digit(i) reads
// element i of the input order. `move(i, dst)` writes input element i to output slot dst.
template <typename Digit, typename Move>
void counting_pass(int64_t n, int width, int chunks, Digit digit, Move move) {
  const int64_t buckets = int64_t{1} << width;
  std::vector<int64_t> hist(static_cast<size_t>(chunks) * buckets, 0);
#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int t = 0; t < chunks; ++t) {
    int64_t* h = hist.data() + static_cast<int64_t>(t) * buckets;
    const int64_t end = chunk_begin(n, chunks, t + 1);
    for (int64_t i = chunk_begin(n, chunks, t); i < end; ++i) ++h[digit(i)];
  }
  // Exclusive scan bucket-major, thread-minor: thread t's rows of a bucket follow those of threads < t,
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
    for (int64_t i = chunk_begin(n, chunks, t); i < end; ++i) move(i, h[digit(i)]++);
  }
}

inline int highest_bit(uint64_t x) {  // x != 0
#if defined(__GNUC__) || defined(__clang__)
  return 63 - __builtin_clzll(x);
#else
  int b = 0;
  while (x >>= 1) ++b;
  return b;
#endif
}

struct Sorted {
  std::vector<int64_t> perm;          // sorted position -> item row
  std::vector<int32_t> first_diff;    // first level where sorted row i differs from i-1 (L if equal, -1 at 0)
};

// SIDs packed into one uint64 key per row (level L-1 in the lowest bits).
Sorted sort_packed(const int64_t* c, int64_t n, int64_t L, const std::vector<int>& shift,
                   const std::vector<int>& bits, int total_bits, int chunks,
                   std::vector<uint64_t>& keys) {
  std::vector<uint64_t> key_tmp(n);
  std::vector<int64_t> perm(n), perm_tmp(n);
  keys.resize(n);
#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int64_t i = 0; i < n; ++i) {
    uint64_t k = 0;
    for (int64_t l = 0; l < L; ++l) k |= static_cast<uint64_t>(c[i * L + l]) << shift[l];
    keys[i] = k;
    perm[i] = i;
  }
  for (int s = 0; s < total_bits; s += kPackedDigitBits) {
    const int width = std::min(kPackedDigitBits, total_bits - s);
    const uint64_t mask = (uint64_t{1} << width) - 1;
    const uint64_t* kin = keys.data();
    const int64_t* pin = perm.data();
    uint64_t* kout = key_tmp.data();
    int64_t* pout = perm_tmp.data();
    counting_pass(
        n, width, chunks, [&](int64_t i) { return static_cast<int64_t>((kin[i] >> s) & mask); },
        [&](int64_t i, int64_t dst) {
          kout[dst] = kin[i];
          pout[dst] = pin[i];
        });
    keys.swap(key_tmp);
    perm.swap(perm_tmp);
  }
  // level_of_bit[b]: the level whose field holds bit b.
  std::vector<int32_t> level_of_bit(64, 0);
  for (int64_t l = 0; l < L; ++l) {
    for (int b = shift[l]; b < shift[l] + bits[l]; ++b) level_of_bit[b] = static_cast<int32_t>(l);
  }
  std::vector<int32_t> first_diff(n);
  first_diff[0] = -1;
#pragma omp parallel for schedule(static) num_threads(chunks)
  for (int64_t i = 1; i < n; ++i) {
    const uint64_t x = keys[i] ^ keys[i - 1];
    first_diff[i] = x == 0 ? static_cast<int32_t>(L) : level_of_bit[highest_bit(x)];
  }
  return {std::move(perm), std::move(first_diff)};
}

// SIDs too wide for one key: stable sorts by each level's code, last level first.
Sorted sort_gather(const int64_t* c, int64_t n, int64_t L, const std::vector<int>& bits, int chunks) {
  std::vector<int64_t> perm(n), perm_tmp(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  for (int64_t level = L - 1; level >= 0; --level) {
    for (int s = 0; s < bits[level]; s += kGatherDigitBits) {
      const int width = std::min(kGatherDigitBits, bits[level] - s);
      const int64_t mask = (int64_t{1} << width) - 1;
      const int64_t* pin = perm.data();
      int64_t* pout = perm_tmp.data();
      counting_pass(
          n, width, chunks, [&](int64_t i) { return (c[pin[i] * L + level] >> s) & mask; },
          [&](int64_t i, int64_t dst) { pout[dst] = pin[i]; });
      perm.swap(perm_tmp);
    }
  }
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
  return {std::move(perm), std::move(first_diff)};
}

void check_codes(const at::Tensor& codes, const std::vector<int64_t>& K) {
  check_device(codes, at::Device(at::kCPU), "trie_build", "codes");
  check_int64(codes, "trie_build", "codes");
  TORCH_CHECK(codes.dim() == 2, "trie_build: codes must be [n_items, L], got ", codes.dim(), " dims");
  check_contiguous(codes, "trie_build", "codes");
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

using TrieTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Numbers the nodes from the sorted rows. code_at(i, l): level-l code of sorted row i.
template <typename CodeAt>
TrieTensors number_nodes(const Sorted& sorted, int64_t n, int64_t L, int chunks, CodeAt code_at) {
  const std::vector<int64_t>& perm = sorted.perm;
  const std::vector<int32_t>& first_diff = sorted.first_diff;

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
  // Every inner node has a child, so the leaves are the nodes with an empty edge range at the end.
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
      for (int64_t l = std::max<int64_t>(d, 0) + 1; l <= L; ++l) {
        const int64_t v = ++current[l];
        const int64_t p = current[l - 1];
        par[v] = p;
        ncode[v] = code_at(i, l - 1);
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

TrieTensors trie_build_cpu(const at::Tensor& codes, at::IntArrayRef codes_per_level) {
  const std::vector<int64_t> K(codes_per_level.begin(), codes_per_level.end());
  check_codes(codes, K);
  const int64_t n = codes.size(0), L = codes.size(1);
  const int64_t* c = codes.data_ptr<int64_t>();
  const int chunks = num_chunks_for(n);

  std::vector<int> bits(L), shift(L);
  int total_bits = 0;
  for (int64_t l = L - 1; l >= 0; --l) {
    bits[l] = bits_needed(K[l]);
    shift[l] = total_bits;
    total_bits += bits[l];
  }
  if (total_bits <= 64) {
    std::vector<uint64_t> keys;
    const Sorted sorted = sort_packed(c, n, L, shift, bits, total_bits, chunks, keys);
    const uint64_t* k = keys.data();
    return number_nodes(sorted, n, L, chunks, [&](int64_t i, int64_t l) {
      return static_cast<int64_t>((k[i] >> shift[l]) & ((uint64_t{1} << bits[l]) - 1));
    });
  }
  const Sorted sorted = sort_gather(c, n, L, bits, chunks);
  const int64_t* perm = sorted.perm.data();
  return number_nodes(sorted, n, L, chunks, [&](int64_t i, int64_t l) { return c[perm[i] * L + l]; });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gflowgr, m) {
  m.def(
      "trie_build(Tensor codes, int[] codes_per_level) -> (Tensor level_offsets, Tensor parent, "
      "Tensor node_code, Tensor indptr, Tensor leaf_ptr, Tensor leaf_items, Tensor item_leaf)");
}

TORCH_LIBRARY_IMPL(gflowgr, CPU, m) { m.impl("trie_build", &trie_build_cpu); }

}  // namespace gflowgr
