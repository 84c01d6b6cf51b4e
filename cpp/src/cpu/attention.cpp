// CPU attention: causal GQA over the paged KV cache with an online (flash-style) softmax.
// Work item = (sequence, kv head, block of kQoRows query rows); the item's group of query heads
// shares every K/V tile it reads. Per KV tile of kKvTile keys: gather K (transposed) and V into
// fp32 scratch, scores S = (sm_scale * Q) K^T, mask from positions, running max/sum update,
// O += P V. Index arrays are validated on the host first. Reference: dense softmax attention with
// an explicit mask (tests/ops/test_attention.py, tests/ops/test_attention_long.py).
// Block-iterator policy (lserve/ops/attention.h): an item walks key ranges, not all keys: the
// whole causal prefix (dense), its KV head's stored selection plus the pages made since (sparse
// decode), or the sink and window pages (Lambda mask, streaming heads). Keys outside the ranges
// are never read; the Lambda mask is applied token-exactly inside them
// (tests/sparse/test_block_sparse_attention.py). Pages come from the page list or, for a stream
// ring, from (slot, logical page) arithmetic.
// Batch invariance: tiles sit on a fixed grid of key positions and a row's reduction order depends
// only on its own visible keys, so its output bits do not depend on the batch, the chunking or
// the thread count (tests/ops/test_attention_long.py::test_batch_invariance).
// Floor: 4 * head_dim FLOPs per visible (query, key) pair and query head, against 2 * head_dim *
// sizeof(cache) bytes of K/V per key and item (kQoRows * group rows share them: ~48 FLOPs a byte
// for SmolLM2's group 3 in fp32), so the op is bound by FMA issue, not memory; measured
// figures in docs/PERFORMANCE.md ("CPU attention for long prompts").
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "aligned_buffer.h"
#include "convert.h"
#include "cpu_backend.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LSERVE_CPU_X86 1
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector values inside always-inline helpers

namespace lserve::cpu {

namespace {

// kKvTile keys x 4 B = 4 vectors of 8: a score row lives in 4 AVX2 registers, and two score rows
// (8 accumulators) share each K^T load. kQoRows rows x the GQA group share one K/V gather:
// 16 rows left the gathers at a quarter of the op's perf samples (2K tokens, group 3); 32 and 64
// measured alike on the shared 2-core VM, and 32 keeps q and o scratch (96 rows x 64 floats
// each, 24 KiB) near the 32 KiB L1 and more items for the two threads at 512 tokens.
constexpr int64_t kKvTile = 32;
constexpr int64_t kQoRows = 32;

typedef float Vec8 __attribute__((vector_size(32)));  // 8 lanes: one ymm with AVX2, 2 xmm without
constexpr int kVecsPerTile = kKvTile / 8;

LSERVE_CPU_INLINE Vec8 load8(const float* pointer) {
  Vec8 value;
  __builtin_memcpy(&value, pointer, sizeof(value));
  return value;
}
LSERVE_CPU_INLINE void store8(float* pointer, const Vec8& value) { __builtin_memcpy(pointer, &value, sizeof(value)); }

struct WorkItem {
  int32_t seq_idx;
  int32_t kv_head;
  int32_t q_begin;  // query rows [q_begin, q_end) of the sequence's chunk
  int32_t q_end;
  int64_t cost;     // rows x keys visited, for scheduling the largest first
};

// Everything an item needs, read-only.
template <typename CacheT>
struct Problem {
  const TensorView* query;    // (num_tokens, num_qo_heads, head_dim)
  const TensorView* output;   // (num_tokens, num_qo_heads, head_dim)
  const CacheT* k_cache;      // (num_pages, page_size, num_kv_heads, head_dim)
  const CacheT* v_cache;      // (num_pages, page_size, num_kv_heads, head_dim)
  const int32_t* qo_indptr;   // (num_seqs + 1,)
  const int32_t* kv_page_indptr;   // (num_seqs + 1,)
  const int32_t* kv_page_indices;  // (kv_page_indptr[num_seqs],)
  const int32_t* kv_lens;     // (num_seqs,)
  int64_t page_size, num_kv_heads, head_dim, group_size;
  float sm_scale;
  const int32_t* window_sink = nullptr;          // (num_seqs,) or null
  const int32_t* window_local = nullptr;         // (num_seqs,) or null
  const int32_t* stream_ring = nullptr;       // (num_seqs, 4) or null
  const int32_t* selection = nullptr;         // (num_slots, num_kv_heads, capacity) or null
  const int32_t* selection_count = nullptr;   // (num_slots, num_kv_heads) or null
  const int32_t* select_slot = nullptr;       // (num_seqs,) or null: slot = sequence
  const int32_t* select_base = nullptr;       // (num_seqs,) or null: base = page count
  int64_t capacity = 0;

  // Physical page of logical page lp of sequence s.
  int64_t page_of(int64_t s, int64_t lp) const {
    if (stream_ring == nullptr) return kv_page_indices[kv_page_indptr[s] + lp];
    return stream_ring_page(stream_ring + 4 * s, lp);
  }
  // The stored selection sequence s's KV head reads: (positions, count, base); count < 0 = dense.
  void selection_of(int64_t s, int64_t kv_head, int64_t num_seq_pages, const int32_t** listed, int64_t* count,
                    int64_t* base) const {
    *count = -1;
    if (selection_count == nullptr) return;
    const int64_t slot = select_slot != nullptr ? select_slot[s] : s;
    if (slot < 0) return;
    *count = selection_count[slot * num_kv_heads + kv_head];
    *listed = selection + (slot * num_kv_heads + kv_head) * capacity;
    *base = select_base != nullptr ? select_base[s] : num_seq_pages;
  }
};

// Appends [begin, end) to ranges, merging it with the previous range when they touch.
inline void add_range(std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t begin, int64_t end) {
  if (begin >= end) return;
  if (!ranges.empty() && ranges.back().second == begin) {
    ranges.back().second = end;
  } else {
    ranges.emplace_back(begin, end);
  }
}

// Per-thread scratch, fp32, sized for kQoRows * group_size rows.
struct Scratch {
  float* q;         // (max_rows, head_dim), pre-scaled by sm_scale
  float* o;         // (max_rows, head_dim), unnormalised output
  float* s;         // (max_rows, kKvTile) scores, then probabilities
  float* k_t;       // (head_dim, kKvTile) the tile's keys, transposed; 0 in columns not gathered
  float* v;         // (kKvTile, head_dim) the tile's values; 0 in rows not gathered
  float* row_max;   // (max_rows,)
  float* row_sum;   // (max_rows,)
  float* rescale;   // (max_rows,) exp(old max - new max) of the current tile
  int32_t* pos;     // (max_rows,) position of each row's query token
  int32_t* loaded;  // (kKvTile,) -1 where the tile's key was gathered, 0 elsewhere

  static int64_t floats_needed(int64_t max_rows, int64_t head_dim) {
    return 2 * max_rows * head_dim + max_rows * kKvTile + 2 * kKvTile * head_dim + 3 * max_rows;
  }
  static int64_t ints_needed(int64_t max_rows) { return max_rows + kKvTile; }
};

// One KV tile as the rows see it. Tiles sit on a fixed grid of kKvTile key positions, so the
// order in which a row's keys are reduced depends only on the row's own visible keys, never on
// which other rows share its work item (batch invariance; tests/ops/test_attention_long.py).
struct TileView {
  int32_t key0;      // position of the tile's first key, a multiple of kKvTile
  int32_t sink;      // Lambda: keys in [sink, pos - local] are hidden; INT32_MAX without a window
  int32_t local;
  int64_t row_begin; // rows [row_begin, num_rows) have pos >= key0; earlier rows see nothing here
  int64_t num_rows;
  int64_t num_cols;  // columns [0, num_cols) hold every gathered key
};

// Key `key` is visible to a query at `pos` (causal, then the Lambda mask).
LSERVE_CPU_INLINE bool key_visible(int32_t key, int32_t pos, int32_t sink, int32_t local) {
  return key <= pos && (key < sink || key > pos - local);
}

// The three steps of a tile, each over rows [tile.row_begin, tile.num_rows). Portable: GCC vector
// extensions and scalar exp, a * b + c rounded twice (the build sets -ffp-contract=off, so the
// compiler never fuses behind our back). AVX2: explicit FMA, a polynomial exp and a vector mask.
// A row that sees nothing of a tile keeps rescale 1 and probabilities 0, an exact no-op (o is
// never -0: it starts at +0 and a sum of nonzero terms never rounds to -0).
struct PortableTile {
  // s[r][c] = q[r] . k_t[:, c] for r < num_rows, all kKvTile columns.
  static void scores(const float* q, const float* k_t, float* s, int64_t num_rows, int64_t head_dim) {
    int64_t r = 0;
    for (; r + 2 <= num_rows; r += 2) {  // two rows share each K^T load
      const float* q0 = q + r * head_dim;
      const float* q1 = q0 + head_dim;
      Vec8 acc0[kVecsPerTile] = {}, acc1[kVecsPerTile] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        const float* k_row = k_t + d * kKvTile;
        for (int v = 0; v < kVecsPerTile; ++v) {
          const Vec8 k_vec = load8(k_row + 8 * v);
          acc0[v] += q0[d] * k_vec;
          acc1[v] += q1[d] * k_vec;
        }
      }
      for (int v = 0; v < kVecsPerTile; ++v) {
        store8(s + r * kKvTile + 8 * v, acc0[v]);
        store8(s + (r + 1) * kKvTile + 8 * v, acc1[v]);
      }
    }
    for (; r < num_rows; ++r) {
      const float* q0 = q + r * head_dim;
      Vec8 acc0[kVecsPerTile] = {};
      for (int64_t d = 0; d < head_dim; ++d) {
        for (int v = 0; v < kVecsPerTile; ++v) acc0[v] += q0[d] * load8(k_t + d * kKvTile + 8 * v);
      }
      for (int v = 0; v < kVecsPerTile; ++v) store8(s + r * kKvTile + 8 * v, acc0[v]);
    }
  }

  // Masks the scores, turns them into probabilities against the updated running max, and
  // updates row_max / row_sum / rescale.
  static void softmax(const Scratch& scratch, const TileView& tile) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t r = tile.row_begin; r < tile.num_rows; ++r) {
      float* s_row = scratch.s + r * kKvTile;
      float tile_max = neg_inf;
      for (int64_t c = 0; c < kKvTile; ++c) {
        const int32_t key = tile.key0 + static_cast<int32_t>(c);
        if (!scratch.loaded[c] || !key_visible(key, scratch.pos[r], tile.sink, tile.local)) s_row[c] = neg_inf;
        tile_max = std::max(tile_max, s_row[c]);
      }
      if (tile_max == neg_inf) {
        std::fill(s_row, s_row + kKvTile, 0.0f);
        scratch.rescale[r] = 1.0f;
        continue;
      }
      const float new_max = std::max(scratch.row_max[r], tile_max);
      scratch.rescale[r] = std::exp(scratch.row_max[r] - new_max);  // exp(-inf) = 0 on the first tile
      float tile_sum = 0.0f;
      for (int64_t c = 0; c < kKvTile; ++c) {
        s_row[c] = std::exp(s_row[c] - new_max);
        tile_sum += s_row[c];
      }
      scratch.row_sum[r] = scratch.row_sum[r] * scratch.rescale[r] + tile_sum;
      scratch.row_max[r] = new_max;
    }
  }

  // o[r] = o[r] * scale[r] + sum_c p[r][c] * v[c] over num_keys keys; head_dim in chunks of 64
  // floats so that the running row stays in 8 registers.
  static void accumulate(const float* p, const float* v, float* o, const float* scale, int64_t num_rows,
                         int64_t num_keys, int64_t head_dim) {
    constexpr int64_t kChunk = 64;
    for (int64_t r = 0; r < num_rows; ++r) {
      const float* p_row = p + r * kKvTile;
      float* o_row = o + r * head_dim;
      int64_t d0 = 0;
      for (; d0 + kChunk <= head_dim; d0 += kChunk) {
        Vec8 acc[kChunk / 8];
        for (int i = 0; i < kChunk / 8; ++i) acc[i] = load8(o_row + d0 + 8 * i) * scale[r];
        for (int64_t c = 0; c < num_keys; ++c) {
          const float* v_row = v + c * head_dim + d0;
          for (int i = 0; i < kChunk / 8; ++i) acc[i] += p_row[c] * load8(v_row + 8 * i);
        }
        for (int i = 0; i < kChunk / 8; ++i) store8(o_row + d0 + 8 * i, acc[i]);
      }
      for (int64_t d = d0; d < head_dim; ++d) {
        float acc = o_row[d] * scale[r];
        for (int64_t c = 0; c < num_keys; ++c) acc += p_row[c] * v[c * head_dim + d];
        o_row[d] = acc;
      }
    }
  }

  // k_t[d * kKvTile + j] = keys[j][d] for 8 keys (j < 8), d < head_dim.
  template <typename CacheT>
  static void transpose8(const CacheT* const* keys, float* k_t, int64_t head_dim) {
    for (int j = 0; j < 8; ++j) {
      for (int64_t d = 0; d < head_dim; ++d) k_t[d * kKvTile + j] = to_float(keys[j][d]);
    }
  }
};

#ifdef LSERVE_CPU_X86
#define LSERVE_AVX2 __attribute__((target("avx2,fma")))

LSERVE_AVX2 LSERVE_CPU_INLINE __m256 load8_float(const float* src) { return _mm256_loadu_ps(src); }
LSERVE_AVX2 LSERVE_CPU_INLINE __m256 load8_float(const bf16_t* src) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// Keeps a loaded vector in a register: without it GCC folds the load into each of the two FMAs
// that use it (seen in objdump), 10 loads per 8 FMAs where Zen 1 issues one 256-bit load a cycle.
LSERVE_AVX2 LSERVE_CPU_INLINE void in_register(__m256& value) { __asm__("" : "+x"(value)); }

// Horizontal max / sum of 8 lanes in a fixed order (the order is part of the result's bits).
LSERVE_AVX2 LSERVE_CPU_INLINE float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
LSERVE_AVX2 LSERVE_CPU_INLINE float hsum8(__m256 x) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

// exp(x) for x <= 0 (scores minus the running max): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by
// the degree-6 minimax polynomial of Cephes' expf (relative error ~1 ulp), 2^n through the
// exponent bits. x is clamped at -87 (exp = 1.6e-38, still normal); the caller zeroes hidden keys.
LSERVE_AVX2 LSERVE_CPU_INLINE __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale_bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale_bits));
}

struct Avx2Tile {
  LSERVE_AVX2 static void scores(const float* q, const float* k_t, float* s, int64_t num_rows, int64_t head_dim) {
    int64_t r = 0;
    for (; r + 2 <= num_rows; r += 2) {  // 8 accumulators: two rows x kVecsPerTile
      const float* q0 = q + r * head_dim;
      const float* q1 = q0 + head_dim;
      __m256 acc0[kVecsPerTile], acc1[kVecsPerTile];
      for (int v = 0; v < kVecsPerTile; ++v) acc0[v] = acc1[v] = _mm256_setzero_ps();
      for (int64_t d = 0; d < head_dim; ++d) {
        const float* k_row = k_t + d * kKvTile;
        const __m256 x0 = _mm256_broadcast_ss(q0 + d), x1 = _mm256_broadcast_ss(q1 + d);
        for (int v = 0; v < kVecsPerTile; ++v) {
          __m256 k_vec = _mm256_loadu_ps(k_row + 8 * v);
          in_register(k_vec);
          acc0[v] = _mm256_fmadd_ps(x0, k_vec, acc0[v]);
          acc1[v] = _mm256_fmadd_ps(x1, k_vec, acc1[v]);
        }
      }
      for (int v = 0; v < kVecsPerTile; ++v) {
        _mm256_storeu_ps(s + r * kKvTile + 8 * v, acc0[v]);
        _mm256_storeu_ps(s + (r + 1) * kKvTile + 8 * v, acc1[v]);
      }
    }
    for (; r < num_rows; ++r) {
      const float* q0 = q + r * head_dim;
      __m256 acc0[kVecsPerTile];
      for (int v = 0; v < kVecsPerTile; ++v) acc0[v] = _mm256_setzero_ps();
      for (int64_t d = 0; d < head_dim; ++d) {
        const __m256 x0 = _mm256_broadcast_ss(q0 + d);
        for (int v = 0; v < kVecsPerTile; ++v) {
          acc0[v] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(k_t + d * kKvTile + 8 * v), acc0[v]);
        }
      }
      for (int v = 0; v < kVecsPerTile; ++v) _mm256_storeu_ps(s + r * kKvTile + 8 * v, acc0[v]);
    }
  }

  LSERVE_AVX2 static void softmax(const Scratch& scratch, const TileView& tile) {
    const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i sink = _mm256_set1_epi32(tile.sink);
    __m256i keys[kVecsPerTile], loaded[kVecsPerTile];
    for (int v = 0; v < kVecsPerTile; ++v) {
      keys[v] = _mm256_add_epi32(_mm256_set1_epi32(tile.key0 + 8 * v), iota);
      loaded[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scratch.loaded + 8 * v));
    }
    for (int64_t r = tile.row_begin; r < tile.num_rows; ++r) {
      float* s_row = scratch.s + r * kKvTile;
      const __m256i pos = _mm256_set1_epi32(scratch.pos[r]);
      const __m256i window_start = _mm256_set1_epi32(scratch.pos[r] - tile.local);
      __m256 s[kVecsPerTile], visible[kVecsPerTile];
      __m256 max_vec = neg_inf;
      for (int v = 0; v < kVecsPerTile; ++v) {
        // loaded & key <= pos & (key < sink | key > pos - local)
        __m256i mask = _mm256_andnot_si256(_mm256_cmpgt_epi32(keys[v], pos), loaded[v]);
        mask = _mm256_and_si256(mask, _mm256_or_si256(_mm256_cmpgt_epi32(sink, keys[v]),
                                                      _mm256_cmpgt_epi32(keys[v], window_start)));
        visible[v] = _mm256_castsi256_ps(mask);
        s[v] = _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(s_row + 8 * v), visible[v]);
        max_vec = _mm256_max_ps(max_vec, s[v]);
      }
      const float tile_max = hmax8(max_vec);
      if (tile_max == -std::numeric_limits<float>::infinity()) {
        for (int v = 0; v < kVecsPerTile; ++v) _mm256_storeu_ps(s_row + 8 * v, _mm256_setzero_ps());
        scratch.rescale[r] = 1.0f;
        continue;
      }
      const float new_max = std::max(scratch.row_max[r], tile_max);
      scratch.rescale[r] = std::exp(scratch.row_max[r] - new_max);  // exp(-inf) = 0 on the first tile
      const __m256 max_bcast = _mm256_set1_ps(new_max);
      __m256 sum = _mm256_setzero_ps();
      for (int v = 0; v < kVecsPerTile; ++v) {
        const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(s[v], max_bcast)), visible[v]);
        _mm256_storeu_ps(s_row + 8 * v, p);
        sum = _mm256_add_ps(sum, p);
      }
      scratch.row_sum[r] = scratch.row_sum[r] * scratch.rescale[r] + hsum8(sum);
      scratch.row_max[r] = new_max;
    }
  }

  // Two rows x 32 floats of head_dim per pass: 8 accumulators, and each V load feeds two FMAs
  // (6 loads per 8 FMAs; one row x 64 floats took 9, and Zen 1 issues one 256-bit load and one
  // 256-bit FMA per cycle). A row's own operation order is the same paired or alone.
  LSERVE_AVX2 static void accumulate(const float* p, const float* v, float* o, const float* scale, int64_t num_rows,
                                     int64_t num_keys, int64_t head_dim) {
    constexpr int64_t kChunk = 32;
    int64_t r = 0;
    for (; r + 2 <= num_rows; r += 2) {
      const float* p0 = p + r * kKvTile;
      const float* p1 = p0 + kKvTile;
      float* o0 = o + r * head_dim;
      float* o1 = o0 + head_dim;
      const __m256 scale0 = _mm256_set1_ps(scale[r]), scale1 = _mm256_set1_ps(scale[r + 1]);
      int64_t d0 = 0;
      for (; d0 + kChunk <= head_dim; d0 += kChunk) {
        __m256 acc0[kChunk / 8], acc1[kChunk / 8];
        for (int i = 0; i < kChunk / 8; ++i) {
          acc0[i] = _mm256_mul_ps(_mm256_loadu_ps(o0 + d0 + 8 * i), scale0);
          acc1[i] = _mm256_mul_ps(_mm256_loadu_ps(o1 + d0 + 8 * i), scale1);
        }
        for (int64_t c = 0; c < num_keys; ++c) {
          const float* v_row = v + c * head_dim + d0;
          const __m256 x0 = _mm256_broadcast_ss(p0 + c), x1 = _mm256_broadcast_ss(p1 + c);
          for (int i = 0; i < kChunk / 8; ++i) {
            __m256 v_vec = _mm256_loadu_ps(v_row + 8 * i);
            in_register(v_vec);
            acc0[i] = _mm256_fmadd_ps(x0, v_vec, acc0[i]);
            acc1[i] = _mm256_fmadd_ps(x1, v_vec, acc1[i]);
          }
        }
        for (int i = 0; i < kChunk / 8; ++i) {
          _mm256_storeu_ps(o0 + d0 + 8 * i, acc0[i]);
          _mm256_storeu_ps(o1 + d0 + 8 * i, acc1[i]);
        }
      }
      accumulate_tail(p0, v, o0, scale[r], num_keys, head_dim, d0);
      accumulate_tail(p1, v, o1, scale[r + 1], num_keys, head_dim, d0);
    }
    for (; r < num_rows; ++r) {
      const float* p0 = p + r * kKvTile;
      float* o0 = o + r * head_dim;
      const __m256 scale0 = _mm256_set1_ps(scale[r]);
      int64_t d0 = 0;
      for (; d0 + kChunk <= head_dim; d0 += kChunk) {
        __m256 acc0[kChunk / 8];
        for (int i = 0; i < kChunk / 8; ++i) acc0[i] = _mm256_mul_ps(_mm256_loadu_ps(o0 + d0 + 8 * i), scale0);
        for (int64_t c = 0; c < num_keys; ++c) {
          const __m256 x0 = _mm256_broadcast_ss(p0 + c);
          for (int i = 0; i < kChunk / 8; ++i) {
            acc0[i] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(v + c * head_dim + d0 + 8 * i), acc0[i]);
          }
        }
        for (int i = 0; i < kChunk / 8; ++i) _mm256_storeu_ps(o0 + d0 + 8 * i, acc0[i]);
      }
      accumulate_tail(p0, v, o0, scale[r], num_keys, head_dim, d0);
    }
  }

  // Columns [d0, head_dim) of one row, scalar (head_dim not a multiple of 32).
  LSERVE_AVX2 static void accumulate_tail(const float* p_row, const float* v, float* o_row, float scale,
                                          int64_t num_keys, int64_t head_dim, int64_t d0) {
    for (int64_t d = d0; d < head_dim; ++d) {
      float acc = o_row[d] * scale;
      for (int64_t c = 0; c < num_keys; ++c) acc += p_row[c] * v[c * head_dim + d];
      o_row[d] = acc;
    }
  }

  // k_t[d * kKvTile + j] = keys[j][d] for 8 keys: 8x8 blocks through unpack / shuffle / lane swap.
  template <typename CacheT>
  LSERVE_AVX2 static void transpose8(const CacheT* const* keys, float* k_t, int64_t head_dim) {
    int64_t d0 = 0;
    for (; d0 + 8 <= head_dim; d0 += 8) {
      __m256 row[8], t[8], u[8];
      for (int j = 0; j < 8; ++j) row[j] = load8_float(keys[j] + d0);
      for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(row[j], row[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(row[j], row[j + 1]);
      }
      for (int j = 0; j < 8; j += 4) {
        u[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
      }
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(k_t + (d0 + j) * kKvTile, _mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
        _mm256_storeu_ps(k_t + (d0 + j + 4) * kKvTile, _mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
      }
    }
    for (int j = 0; j < 8; ++j) {
      for (int64_t d = d0; d < head_dim; ++d) k_t[d * kKvTile + j] = to_float(keys[j][d]);
    }
  }
};
#endif  // LSERVE_CPU_X86

// Gathers keys [begin, end) of the tile at key0 (one page run of the item's ranges) into the
// tile's columns: K transposed (8 columns at a time where they line up), V as rows.
template <typename Tile, typename CacheT>
LSERVE_CPU_INLINE void gather_keys(const Problem<CacheT>& problem, const WorkItem& item, const Scratch& scratch,
                                   int64_t key0, int64_t begin, int64_t end) {
  const int64_t head_dim = problem.head_dim, page_size = problem.page_size;
  const int64_t token_stride = problem.num_kv_heads * head_dim;
  const CacheT* k_rows[kKvTile];
  for (int64_t key = begin; key < end; ++key) {
    const int64_t c = key - key0;
    const int64_t slot = problem.page_of(item.seq_idx, key / page_size) * page_size + key % page_size;
    k_rows[c] = problem.k_cache + slot * token_stride + item.kv_head * head_dim;  // (head_dim,)
    load_row(problem.v_cache + slot * token_stride + item.kv_head * head_dim, scratch.v + c * head_dim, head_dim);
    scratch.loaded[c] = -1;
  }
  int64_t c = begin - key0;
  for (; c < end - key0 && c % 8 != 0; ++c) {
    for (int64_t d = 0; d < head_dim; ++d) scratch.k_t[d * kKvTile + c] = to_float(k_rows[c][d]);
  }
  for (; c + 8 <= end - key0; c += 8) Tile::transpose8(k_rows + c, scratch.k_t + c, head_dim);
  for (; c < end - key0; ++c) {
    for (int64_t d = 0; d < head_dim; ++d) scratch.k_t[d * kKvTile + c] = to_float(k_rows[c][d]);
  }
}

// Asks for the K/V rows of keys [begin, end) ahead of their gather: pages are scattered, so the
// hardware prefetcher restarts at every page and the gathers waited on memory (perf: the V copy
// and the K loads were a quarter of the op's samples at 2K tokens).
template <typename CacheT>
LSERVE_CPU_INLINE void prefetch_keys(const Problem<CacheT>& problem, const WorkItem& item, int64_t begin,
                                     int64_t end) {
  const int64_t head_dim = problem.head_dim, page_size = problem.page_size;
  const int64_t token_stride = problem.num_kv_heads * head_dim, row_bytes = head_dim * sizeof(CacheT);
  for (int64_t key = begin; key < end; ++key) {
    const int64_t slot = problem.page_of(item.seq_idx, key / page_size) * page_size + key % page_size;
    const char* k_row = reinterpret_cast<const char*>(problem.k_cache + slot * token_stride + item.kv_head * head_dim);
    const char* v_row = reinterpret_cast<const char*>(problem.v_cache + slot * token_stride + item.kv_head * head_dim);
    for (int64_t offset = 0; offset < row_bytes; offset += 64) {
      __builtin_prefetch(k_row + offset);
      __builtin_prefetch(v_row + offset);
    }
  }
}

// Runs one tile whose keys are gathered: zeroes the columns not gathered (their keys are hidden
// from every row, and 0 * V must stay 0), then scores, softmax and P.V over the rows that can see it.
template <typename Tile>
LSERVE_CPU_INLINE void run_tile(const Scratch& scratch, TileView tile, int64_t head_dim) {
  int64_t num_cols = 0;
  for (int64_t c = 0; c < kKvTile; ++c) {
    if (scratch.loaded[c]) {
      num_cols = c + 1;
      continue;
    }
    for (int64_t d = 0; d < head_dim; ++d) scratch.k_t[d * kKvTile + c] = 0.0f;
    std::fill(scratch.v + c * head_dim, scratch.v + (c + 1) * head_dim, 0.0f);
  }
  tile.num_cols = num_cols;
  while (tile.row_begin < tile.num_rows && scratch.pos[tile.row_begin] < tile.key0) ++tile.row_begin;
  const int64_t num_rows = tile.num_rows - tile.row_begin;
  if (num_rows == 0) return;
  Tile::scores(scratch.q + tile.row_begin * head_dim, scratch.k_t, scratch.s + tile.row_begin * kKvTile, num_rows,
               head_dim);
  Tile::softmax(scratch, tile);
  Tile::accumulate(scratch.s + tile.row_begin * kKvTile, scratch.v, scratch.o + tile.row_begin * head_dim,
                   scratch.rescale + tile.row_begin, num_rows, num_cols, head_dim);
}

template <typename Tile, typename CacheT>
LSERVE_CPU_INLINE void run_item(const Problem<CacheT>& problem, const WorkItem& item, const Scratch& scratch) {
  const int64_t head_dim = problem.head_dim, group_size = problem.group_size;
  const int64_t q_len = problem.qo_indptr[item.seq_idx + 1] - problem.qo_indptr[item.seq_idx];
  const int64_t kv_len = problem.kv_lens[item.seq_idx];
  const int64_t num_rows = (item.q_end - item.q_begin) * group_size;  // row = query row * group + head

  for (int64_t i = item.q_begin; i < item.q_end; ++i) {
    const int64_t token = problem.qo_indptr[item.seq_idx] + i;
    const float* query = row_ptr<const float>(*problem.query, token) + item.kv_head * group_size * head_dim;
    for (int64_t g = 0; g < group_size; ++g) {
      const int64_t r = (i - item.q_begin) * group_size + g;
      for (int64_t d = 0; d < head_dim; ++d) scratch.q[r * head_dim + d] = query[g * head_dim + d] * problem.sm_scale;
      scratch.pos[r] = static_cast<int32_t>(kv_len - q_len + i);
    }
  }
  std::fill(scratch.o, scratch.o + num_rows * head_dim, 0.0f);
  std::fill(scratch.row_max, scratch.row_max + num_rows, -std::numeric_limits<float>::infinity());
  std::fill(scratch.row_sum, scratch.row_sum + num_rows, 0.0f);

  const int64_t kv_end = kv_len - q_len + item.q_end;  // keys the last row may see

  // The key ranges this item walks.
  const int64_t sink = problem.window_local != nullptr ? problem.window_sink[item.seq_idx] : 0;
  const int64_t local = problem.window_local != nullptr ? problem.window_local[item.seq_idx] : 0;
  const int64_t first_pos = kv_len - q_len + item.q_begin, page_size = problem.page_size;
  const int64_t num_seq_pages = (kv_len + page_size - 1) / page_size;
  const int32_t* listed = nullptr;
  int64_t num_listed = -1, base = num_seq_pages;
  problem.selection_of(item.seq_idx, item.kv_head, num_seq_pages, &listed, &num_listed, &base);
  thread_local std::vector<std::pair<int64_t, int64_t>> ranges;
  ranges.clear();
  if (num_listed >= 0) {
    for (int64_t k = 0; k < num_listed && listed[k] < base; ++k) {
      add_range(ranges, listed[k] * page_size, std::min<int64_t>((listed[k] + 1) * page_size, kv_end));
    }
    add_range(ranges, std::min(base * page_size, kv_end), kv_end);
  } else if (local > 0) {
    for (int64_t begin = 0; begin < kv_end; begin += page_size) {
      const int64_t end = std::min(begin + page_size, kv_end);
      if (begin >= sink && end - 1 <= first_pos - local) continue;  // outside every row's Lambda
      add_range(ranges, begin, end);
    }
  } else {
    add_range(ranges, 0, kv_end);
  }

  // Walk the fixed tile grid through the ranges: a tile runs once all its range pieces are in.
  TileView tile{-1, local > 0 ? static_cast<int32_t>(sink) : std::numeric_limits<int32_t>::max(),
                local > 0 ? static_cast<int32_t>(local) : 0, 0, num_rows, 0};
  for (const auto& range : ranges) {
    for (int64_t key = range.first; key < range.second;) {
      const int64_t key0 = key / kKvTile * kKvTile;
      if (key0 != tile.key0) {
        if (tile.key0 >= 0) run_tile<Tile>(scratch, tile, head_dim);
        tile.key0 = static_cast<int32_t>(key0);
        std::fill(scratch.loaded, scratch.loaded + kKvTile, 0);
      }
      const int64_t end = std::min(range.second, key0 + kKvTile);
      gather_keys<Tile>(problem, item, scratch, key0, key, end);
      prefetch_keys(problem, item, end, std::min(range.second, end + kKvTile));
      key = end;
    }
  }
  if (tile.key0 >= 0) run_tile<Tile>(scratch, tile, head_dim);

  for (int64_t i = item.q_begin; i < item.q_end; ++i) {
    const int64_t token = problem.qo_indptr[item.seq_idx] + i;
    float* output = row_ptr<float>(*problem.output, token) + item.kv_head * group_size * head_dim;
    for (int64_t g = 0; g < group_size; ++g) {
      const int64_t r = (i - item.q_begin) * group_size + g;
      const float inv_sum = scratch.row_sum[r] > 0.0f ? 1.0f / scratch.row_sum[r] : 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) output[g * head_dim + d] = scratch.o[r * head_dim + d] * inv_sum;
    }
  }
}

template <typename CacheT>
void run_items_generic(const Problem<CacheT>& problem, const WorkItem* items, int64_t count, const Scratch& scratch) {
  for (int64_t i = 0; i < count; ++i) run_item<PortableTile>(problem, items[i], scratch);
}

#ifdef LSERVE_CPU_X86
// The rest of an item (V gathers and conversion, bookkeeping) auto-vectorises for AVX2.
template <typename CacheT>
LSERVE_AVX2 void run_items_avx2(const Problem<CacheT>& problem, const WorkItem* items, int64_t count,
                                const Scratch& scratch) {
  for (int64_t i = 0; i < count; ++i) run_item<Avx2Tile>(problem, items[i], scratch);
}
#endif

// Checks the index arrays against each other and the cache; throws lserve::Error naming the entry.
void validate_indices(const AttentionArgs& args) {
  const char* op = "attention";
  const int64_t num_tokens = args.query.size(0);
  const int64_t num_pages = args.k_cache.size(0), page_size = args.k_cache.size(1);
  const int64_t num_kv_heads = args.k_cache.size(2);
  const int64_t num_seqs = args.qo_indptr.size(0) - 1;
  const int32_t* qo_indptr = args.qo_indptr.data_ptr<int32_t>();
  const int32_t* kv_lens = args.kv_lens.data_ptr<int32_t>();
  LSERVE_CHECK(qo_indptr[0] == 0, op, ": qo_indptr[0] must be 0, got ", qo_indptr[0]);
  LSERVE_CHECK(qo_indptr[num_seqs] == num_tokens, op, ": qo_indptr[num_seqs] = ", qo_indptr[num_seqs],
               " must equal num_tokens = ", num_tokens);
  const int32_t* kv_page_indptr = nullptr;
  const int32_t* kv_page_indices = nullptr;
  int64_t num_indices = 0;
  if (!args.has_ring()) {
    kv_page_indptr = args.kv_page_indptr.data_ptr<int32_t>();
    kv_page_indices = args.kv_page_indices.data_ptr<int32_t>();
    num_indices = args.kv_page_indices.size(0);
    LSERVE_CHECK(kv_page_indptr[0] == 0, op, ": kv_page_indptr[0] must be 0, got ", kv_page_indptr[0]);
    LSERVE_CHECK(kv_page_indptr[num_seqs] <= num_indices, op, ": kv_page_indptr[num_seqs] = ",
                 kv_page_indptr[num_seqs], " exceeds the ", num_indices, " entries of kv_page_indices");
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = static_cast<int64_t>(qo_indptr[s + 1]) - qo_indptr[s];
    LSERVE_CHECK(q_len >= 0, op, ": qo_indptr must be non-decreasing, but qo_indptr[", s + 1, "] = ",
                 qo_indptr[s + 1], " < qo_indptr[", s, "] = ", qo_indptr[s]);
    LSERVE_CHECK(kv_lens[s] >= q_len, op, ": sequence ", s, " has kv_len ", kv_lens[s], " < q_len ", q_len,
                 " (the chunk's own keys must be appended first)");
    if (args.has_ring()) {
      const int32_t* ring = args.stream_ring.data_ptr<int32_t>() + 4 * s;
      LSERVE_CHECK(ring[0] >= 0 && ring[1] >= 0 && ring[0] + static_cast<int64_t>(ring[1]) <= num_pages && ring[2] >= 0 &&
                       ring[3] >= 1 && ring[2] + static_cast<int64_t>(ring[3]) <= num_pages,
                   op, ": stream_ring[", s, "] = (", ring[0], ", ", ring[1], ", ", ring[2], ", ", ring[3],
                   ") is outside the ", num_pages, " pages or has an empty ring");
      // Every key the chunk can see must sit on its own page: sinks on sink pages, the window's
      // pages (from the first query's oldest visible local key to the last key) within the ring.
      const int64_t sink = args.has_window() ? args.window_sink.data_ptr<int32_t>()[s] : 0;
      const int64_t local = args.has_window() ? args.window_local.data_ptr<int32_t>()[s] : 0;
      const int64_t first_pos = kv_lens[s] - q_len, last_page = (kv_lens[s] - 1) / page_size;
      const int64_t first_local_page =
          std::max<int64_t>(ring[1], local > 0 ? std::max<int64_t>(first_pos - local + 1, 0) / page_size : 0);
      LSERVE_CHECK(local > 0 ? sink <= static_cast<int64_t>(ring[1]) * page_size : true, op, ": sequence ", s,
                   " has window_sink ", sink, " beyond its ", ring[1], " sink pages");
      LSERVE_CHECK(kv_lens[s] == 0 || last_page - first_local_page + 1 <= ring[3], op, ": sequence ", s,
                   "'s window spans pages ", first_local_page, "..", last_page, ", more than its ring of ", ring[3]);
      continue;
    }
    const int64_t num_seq_pages = static_cast<int64_t>(kv_page_indptr[s + 1]) - kv_page_indptr[s];
    LSERVE_CHECK(num_seq_pages >= 0, op, ": kv_page_indptr must be non-decreasing, but kv_page_indptr[", s + 1,
                 "] = ", kv_page_indptr[s + 1], " < kv_page_indptr[", s, "] = ", kv_page_indptr[s]);
    LSERVE_CHECK(kv_lens[s] <= num_seq_pages * page_size, op, ": sequence ", s, " has kv_len ", kv_lens[s],
                 " but only ", num_seq_pages, " pages of ", page_size, " tokens");
    for (int64_t i = kv_page_indptr[s]; i < kv_page_indptr[s + 1]; ++i) {
      LSERVE_CHECK(kv_page_indices[i] >= 0 && kv_page_indices[i] < num_pages, op, ": kv_page_indices[", i,
                   "] = ", kv_page_indices[i], " (sequence ", s, ") is out of range [0, ", num_pages, ")");
    }
    if (!args.has_selection()) continue;
    const int64_t num_slots = args.selection.size(0), capacity = args.selection.size(2);
    const int64_t slot = args.select_slot.defined() ? args.select_slot.data_ptr<int32_t>()[s] : s;
    if (slot < 0) continue;  // dense
    LSERVE_CHECK(slot < num_slots, op, ": select_slot[", s, "] = ", slot, " is outside the ", num_slots,
                 " slots of the selection store");
    const int64_t needed_pages = (kv_lens[s] + page_size - 1) / page_size;
    const int64_t base = args.select_base.defined() ? args.select_base.data_ptr<int32_t>()[s] : needed_pages;
    LSERVE_CHECK(base >= 0 && base <= needed_pages, op, ": select_base[", s, "] = ", base, " is outside [0, ",
                 needed_pages, "] (the sequence's pages)");
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t count = args.selection_count.data_ptr<int32_t>()[slot * num_kv_heads + h];
      LSERVE_CHECK(count <= capacity, op, ": selection_count[", slot, ", ", h, "] = ", count, " exceeds the ",
                   capacity, " entries of the selection");
      const int32_t* listed = args.selection.data_ptr<int32_t>() + (slot * num_kv_heads + h) * capacity;
      for (int64_t k = 0; k < count && listed[k] < base; ++k) {
        LSERVE_CHECK(listed[k] >= 0 && (k == 0 || listed[k] > listed[k - 1]), op, ": selection[", slot, ", ", h,
                     "] must ascend within [0, ", needed_pages, "), entry ", k, " is ", listed[k]);
      }
    }
  }
}

}  // namespace

void attention(const CpuContext& context, const AttentionArgs& args) {
  validate_indices(args);
  const int64_t num_qo_heads = args.query.size(1), head_dim = args.query.size(2);
  const int64_t num_kv_heads = args.k_cache.size(2);
  const int64_t group_size = num_qo_heads / num_kv_heads;
  const int64_t num_seqs = args.qo_indptr.size(0) - 1;
  const int32_t* qo_indptr = args.qo_indptr.data_ptr<int32_t>();
  const int32_t* kv_lens = args.kv_lens.data_ptr<int32_t>();

  std::vector<WorkItem> items;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int32_t q_len = qo_indptr[s + 1] - qo_indptr[s];
    for (int32_t q_begin = 0; q_begin < q_len; q_begin += kQoRows) {
      const int32_t q_end = std::min<int32_t>(q_len, q_begin + kQoRows);
      const int64_t cost = static_cast<int64_t>(q_end - q_begin) * (kv_lens[s] - q_len + q_end);
      for (int32_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
        items.push_back(WorkItem{static_cast<int32_t>(s), kv_head, q_begin, q_end, cost});
      }
    }
  }
  if (items.empty()) return;
  // Largest first: with dynamic scheduling this bounds the tail to the smallest items.
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });

  const int num_threads = context.pool->num_threads();
  const int64_t max_rows = kQoRows * group_size;
  const int64_t floats_per_thread = (Scratch::floats_needed(max_rows, head_dim) + 15) / 16 * 16;
  AlignedBuffer<float> scratch_floats(num_threads * floats_per_thread);
  const int64_t ints_per_thread = (Scratch::ints_needed(max_rows) + 15) / 16 * 16;
  AlignedBuffer<int32_t> scratch_ints(num_threads * ints_per_thread);

  auto run = [&](auto* k_cache) {
    using CacheT = std::remove_const_t<std::remove_pointer_t<decltype(k_cache)>>;
    Problem<CacheT> problem{&args.query, &args.output, k_cache, static_cast<const CacheT*>(args.v_cache.data),
                            qo_indptr, args.has_ring() ? nullptr : args.kv_page_indptr.data_ptr<int32_t>(),
                            args.has_ring() ? nullptr : args.kv_page_indices.data_ptr<int32_t>(), kv_lens,
                            args.k_cache.size(1), num_kv_heads, head_dim, group_size, args.sm_scale};
    if (args.has_ring()) problem.stream_ring = args.stream_ring.data_ptr<int32_t>();
    if (args.has_window()) {
      problem.window_sink = args.window_sink.data_ptr<int32_t>();
      problem.window_local = args.window_local.data_ptr<int32_t>();
    }
    if (args.has_selection()) {
      problem.selection = args.selection.data_ptr<int32_t>();
      problem.selection_count = args.selection_count.data_ptr<int32_t>();
      problem.capacity = args.selection.size(2);
      if (args.select_slot.defined()) {
        problem.select_slot = args.select_slot.data_ptr<int32_t>();
        problem.select_base = args.select_base.data_ptr<int32_t>();
      }
    }
    context.pool->parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end,
                                                                            int thread_idx) {
      float* base = scratch_floats.data() + thread_idx * floats_per_thread;
      Scratch scratch;
      scratch.q = base;
      scratch.o = scratch.q + max_rows * head_dim;
      scratch.s = scratch.o + max_rows * head_dim;
      scratch.k_t = scratch.s + max_rows * kKvTile;
      scratch.v = scratch.k_t + kKvTile * head_dim;
      scratch.row_max = scratch.v + kKvTile * head_dim;
      scratch.row_sum = scratch.row_max + max_rows;
      scratch.rescale = scratch.row_sum + max_rows;
      scratch.pos = scratch_ints.data() + thread_idx * ints_per_thread;
      scratch.loaded = scratch.pos + max_rows;
#ifdef LSERVE_CPU_X86
      if (context.has_avx2_fma()) {
        run_items_avx2(problem, items.data() + begin, end - begin, scratch);
        return;
      }
#endif
      run_items_generic(problem, items.data() + begin, end - begin, scratch);
    });
  };
  if (args.k_cache.dtype == DType::kBF16) {
    run(static_cast<const bf16_t*>(args.k_cache.data));
  } else {
    run(args.k_cache.data_ptr<float>());
  }
}

}  // namespace lserve::cpu
