// Block iterators: which KV tiles a (query tile, KV head) walks, and which (query, key) pairs inside a
// walked tile are visible. Dense and block-sparse attention differ only here; every kernel of the
// family is a template over one of these policies (STYLE.md, "Dense and sparse are one kernel").
//
// Interface (kBlockN = tokens per KV tile of the kernel):
//   Policy(sparsity, num_kv_heads, seq_idx, kv_head_idx, q_first, q_last, kv_len)
//                                     q_first..q_last: positions of the tile's real queries
//   int  num_tiles() const            tiles to visit; index i in [0, num_tiles)
//   int  kv_pos(i, r) const           position of row r of tile i, or -1 (nothing there)
//   bool contiguous                   kv_pos(i, r) == tile_start(i) + r while < kv_len
//   int  tile_start(i) const          (contiguous policies) first position of tile i
//   bool needs_mask(i) const          false: every (real query, row < kv_len) pair is visible
//   bool visible(q, k) const          k >= 0 is a key position, q a query position
// Tiles are visited in any order; the kernels walk i downwards so the masked tiles come first.
#pragma once

#include "attention_kernels.h"

namespace lserve::cuda {

// Dense causal: tiles 0 .. q_last / kBlockN.
template <int kBlockN>
struct DenseCausalBlocks {
  static constexpr bool contiguous = true;
  int q_first, num_tiles_, kv_len;

  __device__ DenseCausalBlocks(const KvBlockSparsity&, int, int, int, int q_first_, int q_last,
                               int kv_len_)
      : q_first(q_first_), num_tiles_(q_last / kBlockN + 1), kv_len(kv_len_) {}
  __device__ int num_tiles() const { return num_tiles_; }
  __device__ int tile_start(int i) const { return i * kBlockN; }
  __device__ int kv_pos(int i, int r) const {
    const int k = i * kBlockN + r;
    return k < kv_len ? k : -1;
  }
  __device__ bool needs_mask(int i) const { return (i + 1) * kBlockN - 1 > q_first; }
  __device__ bool visible(int q, int k) const { return k <= q; }
};

// The sparse policy of KvBlockSparsity (attention_kernels.h), per sequence: a (sequence, KV head)
// with a stored selection (decode only: kAllowSelected) walks the pages at its stored positions below
// base, then the pages from base on, page_size keys each, kBlockN keys to a tile (a tile may span
// several pages; a page longer than kBlockN spans several tiles); otherwise a windowed sequence walks
// the sink tiles and the local window; any other, every causal tile. A windowed sequence's keys are
// masked token-exactly to its Lambda in whatever tiles it walks (with a selection: the intersection).
template <int kBlockN, bool kAllowSelected>
struct SparseBlocks {
  static constexpr bool contiguous = !kAllowSelected;
  static constexpr int kDense = 0, kWindow = 1, kSelected = 2;  // which tiles are walked
  int mode;
  bool windowed;                                    // the Lambda mask applies
  int q_first, q_last, kv_len;
  int sink, local;                                  // windowed: the sequence's window
  int num_sink_tiles, first_local_tile, num_tiles_;
  const int32_t* listed;  // kSelected: (num_listed,) the (slot, KV head)'s stored positions below base
  int num_listed, base, page_size;

  __device__ SparseBlocks(const KvBlockSparsity& sp, int num_kv_heads, int seq_idx, int kv_head_idx,
                          int q_first_, int q_last_, int kv_len_)
      : mode(kDense), windowed(false), q_first(q_first_), q_last(q_last_), kv_len(kv_len_), sink(0), local(0),
        num_sink_tiles(0), first_local_tile(0), listed(nullptr), num_listed(0), base(0), page_size(1) {
    const int last_tile = q_last / kBlockN;
    num_tiles_ = last_tile + 1;
    if (sp.window_local != nullptr && sp.window_local[seq_idx] > 0) {
      windowed = true;
      sink = min(max(sp.window_sink[seq_idx], 0), kv_len);  // a negative sink is none; beyond kv_len, all
      local = sp.window_local[seq_idx];
    }
    if constexpr (kAllowSelected) {
      if (read_selection(sp, num_kv_heads, seq_idx, kv_head_idx)) return;
    }
    if (windowed) {
      mode = kWindow;
      num_sink_tiles = min((sink + kBlockN - 1) / kBlockN, last_tile + 1);
      first_local_tile = max(num_sink_tiles, max(q_first - local + 1, 0) / kBlockN);
      num_tiles_ = num_sink_tiles + (last_tile - first_local_tile + 1);
    }
  }

  // Tiles rule 1 of KvBlockSparsity: true when this (sequence, KV head) reads a stored selection.
  __device__ bool read_selection(const KvBlockSparsity& sp, int num_kv_heads, int seq_idx, int kv_head_idx) {
    if (sp.selection_count == nullptr) return false;
    const int slot = sp.select_slot != nullptr ? sp.select_slot[seq_idx] : seq_idx;
    if (slot < 0 || slot >= sp.num_slots) return false;  // dense (or a slot the CPU rejects)
    const int64_t row = int64_t(slot) * num_kv_heads + kv_head_idx;
    const int count = min(sp.selection_count[row], sp.capacity);
    if (count < 0) return false;  // no selection
    mode = kSelected;
    page_size = sp.page_size;
    const int num_pages = (kv_len + page_size - 1) / page_size;
    base = sp.select_base != nullptr ? min(max(sp.select_base[seq_idx], 0), num_pages) : num_pages;
    listed = sp.selection + row * sp.capacity;
    // The stored positions below base: a prefix of the ascending list (the CPU reads up to the first
    // one >= base), found by bisection; at most base of them are distinct positions below base.
    int lo = 0, hi = count;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (__ldg(listed + mid) < base) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    num_listed = min(lo, base);
    num_tiles_ = int((int64_t(num_listed + num_pages - base) * page_size + kBlockN - 1) / kBlockN);
    return true;
  }

  __device__ int num_tiles() const { return num_tiles_; }
  __device__ int tile_start(int i) const {
    return (i < num_sink_tiles ? i : first_local_tile + (i - num_sink_tiles)) * kBlockN;
  }
  __device__ int kv_pos(int i, int r) const {
    if (kAllowSelected && mode == kSelected) {
      const int idx = i * kBlockN + r;
      const int b = idx / page_size;  // the b-th page walked: listed[b], then base, base + 1, ...
      const int position = b < num_listed ? __ldg(listed + b) : base + (b - num_listed);
      const int64_t k = int64_t(position) * page_size + (idx - b * page_size);
      return k >= 0 && k < kv_len ? int(k) : -1;
    }
    const int k = tile_start(i) + r;
    return k < kv_len ? k : -1;
  }
  __device__ bool needs_mask(int i) const {
    if (mode == kSelected) return true;
    const int t0 = tile_start(i);
    if (t0 + kBlockN - 1 > q_first) return true;                                 // diagonal, kv_len
    return mode == kWindow && t0 + kBlockN - 1 >= sink && t0 <= q_last - local;  // window edge
  }
  __device__ bool visible(int q, int k) const {
    return k <= q && (!windowed || k < sink || q - k < local);
  }
};

}  // namespace lserve::cuda
