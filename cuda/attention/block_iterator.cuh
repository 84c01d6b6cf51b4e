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

// Per KV head: streaming heads walk the sink tiles and the local window (Lambda shape, masked
// token-exactly); other heads walk every causal tile, or at decode (kAllowSelected) only the
// selected blocks when a selection is given.
template <int kBlockN, bool kAllowSelected>
struct SparseBlocks {
  static constexpr bool contiguous = !kAllowSelected;
  static constexpr int kDense = 0, kStreaming = 1, kSelected = 2;
  int mode;
  int q_first, q_last, kv_len;
  int sink, local;
  int num_sink_tiles, first_local_tile, num_tiles_;
  const int32_t* selected;  // (num_selected,) this (sequence, KV head)'s block ids
  int num_selected, block_size;

  __device__ SparseBlocks(const KvBlockSparsity& sp, int num_kv_heads, int seq_idx, int kv_head_idx,
                          int q_first_, int q_last_, int kv_len_)
      : mode(kDense), q_first(q_first_), q_last(q_last_), kv_len(kv_len_), sink(sp.sink_tokens),
        local(sp.local_tokens), num_sink_tiles(0), first_local_tile(0), selected(nullptr),
        num_selected(0), block_size(1) {
    const int last_tile = q_last / kBlockN;
    num_tiles_ = last_tile + 1;
    if (sp.streaming_heads != nullptr && sp.streaming_heads[kv_head_idx] != 0) {
      mode = kStreaming;
      num_sink_tiles = min((sink + kBlockN - 1) / kBlockN, last_tile + 1);
      first_local_tile = max(num_sink_tiles, max(q_first - local + 1, 0) / kBlockN);
      num_tiles_ = num_sink_tiles + (last_tile - first_local_tile + 1);
    } else if (kAllowSelected && sp.selected_blocks != nullptr) {
      mode = kSelected;
      const int64_t pair = int64_t(seq_idx) * num_kv_heads + kv_head_idx;
      selected = sp.selected_blocks + pair * sp.selected_stride;
      num_selected = sp.num_selected[pair];
      block_size = sp.selected_block_size;
      num_tiles_ = (num_selected * block_size + kBlockN - 1) / kBlockN;
    }
  }

  __device__ int num_tiles() const { return num_tiles_; }
  __device__ int tile_start(int i) const {
    return (i < num_sink_tiles ? i : first_local_tile + (i - num_sink_tiles)) * kBlockN;
  }
  __device__ int kv_pos(int i, int r) const {
    if (kAllowSelected && mode == kSelected) {
      const int idx = i * kBlockN + r;
      const int b = idx / block_size;
      if (b >= num_selected) return -1;
      const int k = __ldg(selected + b) * block_size + (idx - b * block_size);
      return k < kv_len ? k : -1;
    }
    const int k = tile_start(i) + r;
    return k < kv_len ? k : -1;
  }
  __device__ bool needs_mask(int i) const {
    if (mode == kSelected) return true;
    const int t0 = tile_start(i);
    if (t0 + kBlockN - 1 > q_first) return true;                              // diagonal, kv_len
    return mode == kStreaming && t0 + kBlockN - 1 >= sink && t0 <= q_last - local;  // window edge
  }
  __device__ bool visible(int q, int k) const {
    return k <= q && (mode != kStreaming || k < sink || q - k < local);
  }
};

}  // namespace lserve::cuda
