// page_stats_append and page_select (contract: cpp/include/lserve/ops/page_select.h; reference:
// cpp/src/cpu/page_select.cpp, matched bit for bit: the same sequential float32 folds and sums,
// IEEE-rounded through the _rn intrinsics, which nvcc never contracts into FMAs). Queries and keys
// come as float32, bfloat16 or float16 (QueryT/KeyT); a low-precision element converts to float
// exactly, so the values are those the CPU backend computes on after its float32 staging.
// page_stats_append: one CTA per token; only the call's last token on a logical page writes it,
// folding that page's tokens in token order (so resets, NaN and +-0 come out as on the CPU).
// page_select writes the page selector's store (one row per slot) for the step's fresh sequences
// only: a memset and two launches. Scores: one thread per (page-list entry, logical page, KV head)
// of a fresh sequence runs the CPU's sequential loop and atomicMax-es an order-preserving key into
// the entry's physical page key. Selection: one CTA per (sequence, KV head), a radix select of the
// top keys then ordered block scans that break ties by position and write the positions ascending
// into row select_slot[s]. Dense and reuse sequences' store rows are never touched.
// Nothing allocates or synchronises: graph-capturable. Metadata is never read back to the host;
// device-side guards keep bad metadata in bounds (see PageSelectParams for what it yields).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

// ---- page_stats_append -------------------------------------------------------------------------

struct PageStatsAppendParams {
  const void* key = nullptr;              // (num_tokens, num_kv_heads, head_dim) KeyT, row stride key_stride
  const int64_t* slot_mapping = nullptr;  // (num_tokens,); < 0 or >= num_slots: skipped
  float* kmax = nullptr;                  // (num_slots / logical_page_size, num_kv_heads, head_dim)
  float* kmin = nullptr;                  // same shape
  int64_t key_stride = 0;
  int64_t num_tokens = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_slots = 0;          // num_pages * physical_page_size
  int64_t logical_page_size = 0;  // divides physical_page_size, so slot / logical_page_size names
                                  // the (page, logical page) row of kmax viewed as above
};

namespace page_select_detail {

constexpr int kStatsThreads = 128;  // a decode token's rows are num_kv_heads * head_dim ~ 1K floats
constexpr unsigned kFullMask = 0xffffffffu;

// A key as the CPU's float32 staging converts it: exactly, and a NaN keeps its sign and payload
// (lserve::f16_to_float), since a reset stores the key as it is. __half2float (cvt.f32.f16) returns
// the canonical NaN 0x7fffffff for every float16 NaN; bfloat16 converts by a shift, as on the CPU.
template <typename KeyT>
__device__ __forceinline__ float key_to_float(KeyT value) {
  return to_float(value);
}
template <>
__device__ __forceinline__ float key_to_float<__half>(__half value) {
  const uint32_t bits = __half_as_ushort(value);
  if ((bits & 0x7c00u) == 0x7c00u && (bits & 0x3ffu) != 0) {
    return __uint_as_float(((bits & 0x8000u) << 16) | 0x7f800000u | ((bits & 0x3ffu) << 13));
  }
  return __half2float(value);
}

// The CPU folds tokens one after another: a token at a logical page's first slot resets the row,
// the others take std::max / std::min (a NaN key is ignored, a stored NaN sticks, of +0 and -0
// the earlier stays). The CTA of the last token on a logical page replays exactly that fold from
// the last reset at or before it (else from the stored row, starting at the page's first token in
// this call); the other tokens' CTAs write nothing, so no two CTAs touch one row.
// Work: a CTA scans the later tokens' slots until it finds one on its page (the next token, for
// the tokens of a prefill run) and the earlier ones back to a reset, then reads the key rows of
// its page's tokens. Floor: the key rows plus one kmax/kmin row pair per written logical page;
// the owner scans cost O(num_tokens) slot reads per written logical page (L2-resident).
template <typename KeyT, int kThreads>
__global__ void __launch_bounds__(kThreads) page_stats_append_kernel(const PageStatsAppendParams params) {
  __shared__ long long reset_token, first_token;
  const int64_t token = blockIdx.x;
  const int64_t slot = params.slot_mapping[token];
  if (slot < 0 || slot >= params.num_slots) return;
  const int64_t page_begin = slot / params.logical_page_size * params.logical_page_size;
  const int64_t page_end = page_begin + params.logical_page_size;
  const int64_t* slots = params.slot_mapping;

  // 1. A later token on the same logical page owns it.
  for (int64_t base = token + 1; base < params.num_tokens; base += kThreads) {
    const int64_t other = base + threadIdx.x;
    bool later = false;
    if (other < params.num_tokens) {
      const int64_t other_slot = slots[other];
      later = other_slot >= page_begin && other_slot < page_end;
    }
    if (__syncthreads_or(later)) return;
  }

  // 2. Where the fold starts: the last reset at or before this token, else the first token on the
  // page in this call (then from the stored row).
  if (threadIdx.x == 0) {
    reset_token = -1;
    first_token = token;
  }
  __syncthreads();
  for (int64_t top = token; top >= 0; top -= kThreads) {
    const int64_t other = top - threadIdx.x;
    bool reset = false;
    if (other >= 0) {
      const int64_t other_slot = slots[other];
      reset = other_slot == page_begin;
      if (reset) atomicMax(&reset_token, static_cast<long long>(other));
      if (other_slot >= page_begin && other_slot < page_end) atomicMin(&first_token, static_cast<long long>(other));
    }
    if (__syncthreads_or(reset)) break;  // also publishes reset_token and first_token
  }
  const bool from_stored = reset_token < 0;
  const int64_t begin = from_stored ? first_token : reset_token;

  // 3. The fold, one (head, channel) per thread; the row is contiguous: (num_kv_heads, head_dim).
  const int64_t row_size = params.num_kv_heads * params.head_dim;
  const KeyT* keys = static_cast<const KeyT*>(params.key);
  float* kmax = params.kmax + slot / params.logical_page_size * row_size;
  float* kmin = params.kmin + slot / params.logical_page_size * row_size;
  for (int64_t i = threadIdx.x; i < row_size; i += kThreads) {
    float high = from_stored ? kmax[i] : 0.0f, low = from_stored ? kmin[i] : 0.0f;  // else reset at begin
    for (int64_t other = begin; other <= token; ++other) {
      const int64_t other_slot = slots[other];
      if (other_slot < page_begin || other_slot >= page_end) continue;
      const float k = key_to_float(keys[other * params.key_stride + i]);
      if (other_slot == page_begin) {
        high = k;
        low = k;
      } else {
        high = high < k ? k : high;  // std::max(high, k)
        low = k < low ? k : low;     // std::min(low, k)
      }
    }
    kmax[i] = high;
    kmin[i] = low;
  }
}

}  // namespace page_select_detail

// KeyT: float, __nv_bfloat16 or __half, the dtype of params.key.
template <typename KeyT>
cudaError_t launch_page_stats_append(const PageStatsAppendParams& params, cudaStream_t stream) {
  using namespace page_select_detail;
  if (params.num_tokens == 0 || params.num_slots == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(params.num_tokens));
  page_stats_append_kernel<KeyT, kStatsThreads><<<grid, kStatsThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

// ---- page_select -------------------------------------------------------------------------------

// The selector's store: row select_slot[s] of selected/num_selected holds sequence s's selection
// (one row per slot; a slot is a decode sequence of the engine). Only fresh sequences
// (select_mode[s] == kSelectFresh) are scored and written; the rows of the others stay as they are
// (not even marked). num_selected = -1 means "no selection": attention reads every page of the
// sequence (the contract of cpp/include/lserve/ops/attention.h). A fresh row gets num_selected = -1
// (its positions left as they were) when the CPU reference would reject it (its LSERVE_CHECKs: no
// query row, a page count or kv_len inconsistent, a page id out of range when it scores pages) or
// its indptr range leaves the page list. A fresh sequence whose slot lies outside [0, num_slots)
// (the CPU raises) writes nothing: there is no row to mark. Two fresh sequences naming one slot: the
// later one's selection is stored, as on the CPU. The per-row checks imply an ascending indptr; when
// a batch breaks it, the other rows' selections are unspecified (still in bounds).
struct PageSelectParams {
  const void* query = nullptr;             // (num_rows, num_qo_heads, head_dim) QueryT, row stride query_stride
  const float* kmax = nullptr;             // (num_pages, logical_per_page, num_kv_heads, head_dim)
  const float* kmin = nullptr;             // same shape
  const int32_t* kv_page_indptr = nullptr;   // (num_seqs + 1,)
  const int32_t* kv_page_indices = nullptr;  // (num_entries,)
  const int32_t* kv_lens = nullptr;          // (num_seqs,)
  const int32_t* qo_indptr = nullptr;      // (num_seqs + 1,) or null: sequence s's query is row
                                           // qo_indptr[s+1] - 1 (null: row s)
  const int32_t* select_mode = nullptr;    // (num_seqs,) SelectMode or null: every sequence fresh
  const int32_t* select_slot = nullptr;    // (num_seqs,) store row of each sequence or null: row s
  int32_t* selected = nullptr;             // (num_slots, num_kv_heads, num_select) store
  int32_t* num_selected = nullptr;         // (num_slots, num_kv_heads) store
  uint32_t* page_keys = nullptr;           // (num_kv_heads, num_entries) scratch, any contents
  int64_t query_stride = 0;
  int64_t num_rows = 0;   // query.size(0)
  int64_t num_seqs = 0;   // kv_page_indptr.size(0) - 1
  int64_t num_slots = 0;  // selected.size(0)
  int64_t num_kv_heads = 0;
  int64_t group = 0;  // num_qo_heads / num_kv_heads
  int64_t head_dim = 0;
  int64_t num_pages = 0;
  int64_t logical_per_page = 0;
  int64_t logical_page_size = 0;
  int64_t physical_page_size = 0;
  int64_t num_entries = 0;  // kv_page_indices.size(0)
  int num_select = 0;                      // the store's row length
  bool keep_first_page = true;
  int keep_last_pages = 1;                 // the newest pages every selection keeps
  const int32_t* head_num_select = nullptr;  // (num_kv_heads,) per-head page count or null: num_select each
  int score = 0;        // PageScore: 0 kBound, 1 kCenter, 2 kBlend
  float spread = 0.0f;  // kBlend's weight of the spread term
  bool group_max = false;  // GroupScore::kMax (else kSum; kMass is not implemented on CUDA)
};

// SelectMode::kSelectFresh of ops/page_select.h (cuda/src/page_select.cu asserts they agree).
constexpr int32_t kSelectFresh = 1;

namespace page_select_detail {

constexpr int kScoreThreads = 256;
constexpr int kSmallSelectThreads = 256;   // page lists up to 2048 entries: most threads have work
constexpr int kLargeSelectThreads = 1024;  // one (sequence, head) row gets a whole SM's loads
constexpr int64_t kSmallSelectEntries = 8 * kSmallSelectThreads;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kDigitsPerLane = kRadixBins / 32;

// Page score keys: unsigned and ordered like the scores. No score is NaN (the CPU's std::max from
// -inf ignores NaN logical scores; so does the score kernel), so the keys above +inf's are free:
// kInvalidKey marks a page id out of range. The memset's 0 (no logical page scored) ranks with
// -inf, as the CPU's initial -inf does: readers clamp keys to kNegInfKey.
constexpr uint32_t kNegInfKey = 0x007fffffu;  // score_key(-inf)
constexpr uint32_t kInvalidKey = 0xffffffffu;

__device__ __forceinline__ uint32_t score_key(float score) {
  // +0 for -0: the CPU's comparisons rank them equal, so their keys must be equal too.
  const uint32_t bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// One term of the CPU's logical page score (ops/page_select.h), in its rounding steps.
constexpr int kScoreBound = 0, kScoreCenter = 1, kScoreBlend = 2;  // PageScore's values

template <int kScore>
__device__ __forceinline__ float score_term(float q, float high, float low, float spread) {
  if constexpr (kScore == kScoreCenter) {
    return __fmul_rn(q, __fmul_rn(0.5f, __fadd_rn(high, low)));
  } else if constexpr (kScore == kScoreBlend) {
    const float centre = __fmul_rn(q, __fmul_rn(0.5f, __fadd_rn(high, low)));
    const float half_width = __fmul_rn(fabsf(q), __fmul_rn(0.5f, __fsub_rn(high, low)));
    return __fadd_rn(centre, __fmul_rn(spread, half_width));
  } else {
    const float a = __fmul_rn(q, high), b = __fmul_rn(q, low);
    return a < b ? b : a;  // std::max(a, b)
  }
}

// The sequence whose page list holds entry: the last s with indptr[s] <= entry, or -1.
__device__ __forceinline__ int64_t sequence_of(const int32_t* indptr, int64_t num_seqs, int64_t entry) {
  int64_t lo = 0, hi = num_seqs + 1;  // the first s with indptr[s] > entry lies in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (indptr[mid] > entry) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int64_t seq = lo - 1;
  return seq >= 0 && seq < num_seqs && entry < indptr[seq + 1] ? seq : -1;
}

__device__ __forceinline__ bool is_fresh(const PageSelectParams& params, int64_t seq) {
  return params.select_mode == nullptr || params.select_mode[seq] == kSelectFresh;
}

// The store row sequence s writes (not range-checked).
__device__ __forceinline__ int64_t store_slot(const PageSelectParams& params, int64_t seq) {
  return params.select_slot != nullptr ? params.select_slot[seq] : seq;
}

// Sequence s's query row, or -1 where the CPU finds none (an empty or out-of-range chunk).
__device__ __forceinline__ int64_t query_row(const PageSelectParams& params, int64_t seq) {
  if (params.qo_indptr == nullptr) return seq < params.num_rows ? seq : -1;
  const int64_t begin = params.qo_indptr[seq], end = params.qo_indptr[seq + 1];
  return end > begin && end >= 1 && end - 1 < params.num_rows ? end - 1 : -1;
}

// Four consecutive query elements as floats (exact conversions); q is 4-element aligned.
__device__ __forceinline__ float4 load_query4(const float* q) { return __ldg(reinterpret_cast<const float4*>(q)); }
__device__ __forceinline__ float4 load_query4(const __nv_bfloat16* q) {
  const float2 lo = __bfloat1622float2(__ldg(reinterpret_cast<const __nv_bfloat162*>(q)));
  const float2 hi = __bfloat1622float2(__ldg(reinterpret_cast<const __nv_bfloat162*>(q) + 1));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ float4 load_query4(const __half* q) {
  const float2 lo = __half22float2(__ldg(reinterpret_cast<const __half2*>(q)));
  const float2 hi = __half22float2(__ldg(reinterpret_cast<const __half2*>(q) + 1));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// Thread = (entry, logical page, KV head), the head fastest so that a warp reads adjacent rows of
// one page; the grid spans the whole page list, and the threads of entries of sequences that are not
// fresh (or have no query row) return after reading their sequence's metadata. The sum runs over g
// then d, sequentially, as the CPU's does (no reassociation: the scores must be bit-identical for
// the selections to be). kVec4 loads kmax/kmin as float4s and the query as 4-element vectors
// (head_dim % 4 == 0, aligned rows) and adds their lanes in order.
// Floor: every logical page row of kmax and kmin of the fresh sequences once, num_fresh_entries *
// logical_per_page * num_kv_heads * head_dim * 8 bytes (1 sequence, 16384 pages of 64 tokens,
// 16-token logical pages, 8 KV heads, head_dim 128: 537 MB, ~0.11 ms at H200 HBM bandwidth). Not
// yet measured.
template <typename QueryT, int kScore, bool kVec4>
__global__ void __launch_bounds__(kScoreThreads) page_score_kernel(const PageSelectParams params) {
  const int64_t num_kv_heads = params.num_kv_heads, logical_per_page = params.logical_per_page;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kScoreThreads + threadIdx.x;
  if (thread >= params.num_entries * logical_per_page * num_kv_heads) return;
  // 32-bit index arithmetic (cuda/src/page_select.cu checks the thread count fits an int): 64-bit
  // division is a slow subroutine.
  const int index = static_cast<int>(thread), heads = static_cast<int>(num_kv_heads);
  const int kv_head = index % heads, logical = index / heads % static_cast<int>(logical_per_page);
  const int64_t entry = index / (heads * static_cast<int>(logical_per_page));
  const int64_t seq = sequence_of(params.kv_page_indptr, params.num_seqs, entry);
  if (seq < 0 || !is_fresh(params, seq)) return;  // dense and reuse sequences keep their store rows
  const int64_t query_idx = query_row(params, seq);
  if (query_idx < 0) return;  // the selection kernel marks the row -1
  uint32_t* page_key = params.page_keys + kv_head * params.num_entries + entry;
  const int64_t page = params.kv_page_indices[entry];
  if (page < 0 || page >= params.num_pages) {
    if (logical == 0) atomicMax(page_key, kInvalidKey);
    return;
  }
  const int64_t position = entry - params.kv_page_indptr[seq];
  const int64_t tokens_in_page = min(params.physical_page_size,
                                     static_cast<int64_t>(params.kv_lens[seq]) - position * params.physical_page_size);
  const int64_t num_logical = (tokens_in_page + params.logical_page_size - 1) / params.logical_page_size;
  if (logical >= num_logical) return;  // past the tokens of a partial last page

  const int64_t head_dim = params.head_dim, row = (page * logical_per_page + logical) * num_kv_heads + kv_head;
  const float* high = params.kmax + row * head_dim;  // (head_dim,)
  const float* low = params.kmin + row * head_dim;   // (head_dim,)
  // (group, head_dim): the query heads of this KV head's group.
  const QueryT* query = static_cast<const QueryT*>(params.query) + query_idx * params.query_stride +
                        kv_head * params.group * head_dim;
  // kSum: one running sum over g then d. kMax: each head's own sum; the page keeps the best head's
  // (the atomicMax over heads and logical pages is the CPU's max over both).
  const float spread = params.spread;
  float score = 0.0f;
  for (int64_t g = 0; g < params.group; ++g) {
    const QueryT* q = query + g * head_dim;
    float sum = params.group_max ? 0.0f : score;
    if constexpr (kVec4) {
      for (int64_t d = 0; d < head_dim; d += 4) {
        const float4 qv = load_query4(q + d);
        const float4 hv = __ldg(reinterpret_cast<const float4*>(high + d));
        const float4 lv = __ldg(reinterpret_cast<const float4*>(low + d));
        sum = __fadd_rn(sum, score_term<kScore>(qv.x, hv.x, lv.x, spread));
        sum = __fadd_rn(sum, score_term<kScore>(qv.y, hv.y, lv.y, spread));
        sum = __fadd_rn(sum, score_term<kScore>(qv.z, hv.z, lv.z, spread));
        sum = __fadd_rn(sum, score_term<kScore>(qv.w, hv.w, lv.w, spread));
      }
    } else {
      for (int64_t d = 0; d < head_dim; ++d) {
        sum = __fadd_rn(sum, score_term<kScore>(to_float(__ldg(q + d)), __ldg(high + d), __ldg(low + d), spread));
      }
    }
    if (!params.group_max) {
      score = sum;
    } else if (!isnan(sum)) {  // std::max(best, NaN) keeps best
      atomicMax(page_key, score_key(sum));
    }
  }
  if (params.group_max || isnan(score)) return;  // std::max(page_score, NaN) keeps page_score
  atomicMax(page_key, score_key(score));
}

template <int kThreads>
struct SelectSharedStorage {
  uint32_t histogram[kRadixBins];
  uint32_t warp_total[kThreads / 32];
  uint32_t digit;  // the radix pass's answer, broadcast to the block
  uint32_t above;  // candidates above the digit's bucket
};

// Exclusive prefix sum in thread order. Two __syncthreads.
template <int kThreads>
__device__ __forceinline__ uint32_t block_exclusive_scan(uint32_t value, SelectSharedStorage<kThreads>& shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint32_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t lower = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += lower;
  }
  if (lane == 31) shared.warp_total[warp] = inclusive;
  __syncthreads();
  uint32_t warp_offset = 0;
  for (int w = 0; w < warp; ++w) warp_offset += shared.warp_total[w];
  __syncthreads();
  return warp_offset + inclusive - value;
}

// One CTA per (sequence, KV head); the CTAs of sequences that are not fresh return at once, and so
// do those of a sequence whose slot a later fresh sequence also names (the CPU writes in sequence
// order, so the later selection is the one stored). The CPU's stable sort puts the forced pages (the
// newest keep_last_pages and, with keep_first_page, page 0) first and then the rest by score, ties by position, and
// keeps num_select: so the selection is the forced pages plus the top num_select - num_forced of the
// others by (score descending, position ascending).
// 1. Radix select, most significant 8 bits first, of the num_top-th largest key among the others:
//    the threshold key T and the count above it; the rest come from the keys equal to T, lowest
//    positions first. 2. Thread t owns positions [t * span, (t + 1) * span): one scan of its ties
//    ranks them in position order, a second scan of its selected counts gives its output offset,
//    so the positions come out ascending. Keys are re-read from the scratch (L2) on each of the 6
//    passes.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) page_select_kernel(const PageSelectParams params) {
  __shared__ SelectSharedStorage<kThreads> shared;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const unsigned heads = static_cast<unsigned>(params.num_kv_heads);
  const int64_t seq = blockIdx.x / heads, kv_head = blockIdx.x % heads;
  if (!is_fresh(params, seq)) return;  // dense or reused: the store row stays as it is
  const int64_t slot = store_slot(params, seq);
  if (slot < 0 || slot >= params.num_slots) return;  // the CPU raises; no row to mark
  if (params.select_slot != nullptr) {
    for (int64_t base = seq + 1; base < params.num_seqs; base += kThreads) {
      const int64_t other = base + tid;
      const bool later = other < params.num_seqs && is_fresh(params, other) && store_slot(params, other) == slot;
      if (__syncthreads_or(later)) return;
    }
  }
  const int64_t row = slot * heads + kv_head;
  int32_t* out = params.selected + row * params.num_select;  // (num_select,)
  int32_t* num_selected = params.num_selected + row;
  const int num_forced = params.keep_last_pages + (params.keep_first_page ? 1 : 0);
  int num_select = params.num_select;
  if (params.head_num_select != nullptr) {
    num_select = params.head_num_select[kv_head];
    if (num_select < num_forced || num_select > params.num_select) {  // the CPU raises
      if (tid == 0) *num_selected = -1;
      return;
    }
  }

  // The CPU's per-sequence checks (plus the page list's bounds, which it assumes).
  const int64_t begin = params.kv_page_indptr[seq], end = params.kv_page_indptr[seq + 1];
  const int64_t num_pages = end - begin, kv_len = params.kv_lens[seq], page_size = params.physical_page_size;
  const bool valid = query_row(params, seq) >= 0 && begin >= 0 && end <= params.num_entries && num_pages >= 0 &&
                     kv_len >= 1 && kv_len <= num_pages * page_size && kv_len > (num_pages - 1) * page_size;
  if (!valid) {
    if (tid == 0) *num_selected = -1;
    return;
  }
  if (num_pages <= num_select) {
    for (int64_t i = tid; i < num_pages; i += kThreads) out[i] = static_cast<int32_t>(i);
    if (tid == 0) *num_selected = static_cast<int32_t>(num_pages);
    return;
  }

  const uint32_t* keys = params.page_keys + kv_head * params.num_entries + begin;  // (num_pages,)
  // Forced: [first_recent, num_pages) and, with keep_first_page, page 0; others: [first_other, first_recent).
  const int64_t first_recent = num_pages - params.keep_last_pages, first_other = params.keep_first_page ? 1 : 0;
  const uint32_t num_top = static_cast<uint32_t>(num_select - num_forced);

  // 1. Radix select. Invariant: at least num_top - above others match the prefix (every pass
  // reads the same keys), so each pass finds its digit.
  uint32_t threshold = kInvalidKey, above = 0;
  if (num_top > 0) {
    uint32_t prefix = 0, prefix_mask = 0;
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int bin = tid; bin < kRadixBins; bin += kThreads) shared.histogram[bin] = 0;
      __syncthreads();
      for (int64_t i = first_other + tid; i < first_recent; i += kThreads) {
        const uint32_t key = max(keys[i], kNegInfKey);
        if ((key & prefix_mask) == prefix) atomicAdd(&shared.histogram[(key >> shift) & (kRadixBins - 1)], 1u);
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l owns digits 255 - 8 l down to 248 - 8 l: lanes in order walk the digits from the top.
        uint32_t lane_count = 0;
        for (int k = 0; k < kDigitsPerLane; ++k) {
          lane_count += shared.histogram[kRadixBins - 1 - lane * kDigitsPerLane - k];
        }
        uint32_t count = lane_count;  // inclusive over lanes 0..lane
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
          const uint32_t lower = __shfl_up_sync(kFullMask, count, offset);
          if (lane >= offset) count += lower;
        }
        const unsigned ballot = __ballot_sync(kFullMask, above + count >= num_top);
        if (ballot != 0 && lane == __ffs(ballot) - 1) {
          uint32_t running = above + count - lane_count;
          for (int k = 0; k < kDigitsPerLane; ++k) {
            const int digit = kRadixBins - 1 - lane * kDigitsPerLane - k;
            const uint32_t digit_count = shared.histogram[digit];
            if (running + digit_count >= num_top) {
              shared.digit = static_cast<uint32_t>(digit);
              shared.above = running;
              break;
            }
            running += digit_count;
          }
        }
      }
      __syncthreads();
      prefix |= shared.digit << shift;
      prefix_mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
      above = shared.above;
      // The next write of digit/above follows two more barriers; the histogram's reset follows
      // warp 0's reads by the barrier above.
    }
    threshold = prefix;
  }
  const uint32_t num_ties = num_top - above;  // of the others with key == threshold, the first num_ties

  // 2. Ordered passes over contiguous spans.
  const int64_t span = (num_pages + kThreads - 1) / kThreads;
  const int64_t lo = min(num_pages, tid * span), hi = min(num_pages, lo + span);
  uint32_t sure = 0, ties = 0;
  bool invalid = false;
  for (int64_t i = lo; i < hi; ++i) {
    const uint32_t raw = keys[i];
    invalid |= raw == kInvalidKey;
    const uint32_t key = max(raw, kNegInfKey);
    if (i >= first_recent || (params.keep_first_page && i == 0) || (num_top > 0 && key > threshold)) {
      ++sure;
    } else if (num_top > 0 && key == threshold) {
      ++ties;
    }
  }
  if (__syncthreads_or(invalid)) {  // the CPU raises on a page id out of range
    if (tid == 0) *num_selected = -1;
    return;
  }
  const uint32_t ties_before = block_exclusive_scan(ties, shared);
  const uint32_t take = ties_before >= num_ties ? 0u : min(ties, num_ties - ties_before);
  uint32_t offset = block_exclusive_scan(sure + take, shared);
  uint32_t taken = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const uint32_t key = max(keys[i], kNegInfKey);
    bool keep = i >= first_recent || (params.keep_first_page && i == 0) || (num_top > 0 && key > threshold);
    if (!keep && num_top > 0 && key == threshold && taken < take) {
      keep = true;
      ++taken;
    }
    if (keep && offset < static_cast<uint32_t>(num_select)) out[offset++] = static_cast<int32_t>(i);
  }
  if (tid == 0) *num_selected = num_select;
}

}  // namespace page_select_detail

// params.page_keys must hold num_kv_heads * num_entries keys (page_select_workspace_bytes).
inline size_t page_select_workspace_bytes(const PageSelectParams& params) {
  return static_cast<size_t>(params.num_kv_heads * params.num_entries) * sizeof(uint32_t);
}

// QueryT: float, __nv_bfloat16 or __half, the dtype of params.query.
template <typename QueryT>
cudaError_t launch_page_select(const PageSelectParams& params, cudaStream_t stream) {
  using namespace page_select_detail;
  if (params.num_seqs == 0 || params.num_kv_heads == 0) return cudaSuccess;
  const int64_t num_score_threads = params.num_entries * params.logical_per_page * params.num_kv_heads;
  if (num_score_threads > 0) {
    cudaError_t status = cudaMemsetAsync(params.page_keys, 0, page_select_workspace_bytes(params), stream);
    if (status != cudaSuccess) return status;
    constexpr uintptr_t kQueryAlign = 4 * sizeof(QueryT);  // load_query4's vector
    const bool vec4 = params.head_dim % 4 == 0 && params.query_stride % 4 == 0 &&
                      reinterpret_cast<uintptr_t>(params.query) % kQueryAlign == 0 &&
                      reinterpret_cast<uintptr_t>(params.kmax) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(params.kmin) % 16 == 0;
    const dim3 grid(static_cast<unsigned>(ceil_div(num_score_threads, kScoreThreads)));
    auto launch = [&](auto score_tag) {
      constexpr int kScore = decltype(score_tag)::value;
      if (vec4) {
        page_score_kernel<QueryT, kScore, true><<<grid, kScoreThreads, 0, stream>>>(params);
      } else {
        page_score_kernel<QueryT, kScore, false><<<grid, kScoreThreads, 0, stream>>>(params);
      }
    };
    if (params.score == kScoreCenter) {
      launch(std::integral_constant<int, kScoreCenter>{});
    } else if (params.score == kScoreBlend) {
      launch(std::integral_constant<int, kScoreBlend>{});
    } else {
      launch(std::integral_constant<int, kScoreBound>{});
    }
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  // Thread count by the whole batch's page list: a bound on any one sequence's, known on the host.
  const dim3 grid(static_cast<unsigned>(params.num_seqs * params.num_kv_heads));
  if (params.num_entries <= kSmallSelectEntries) {
    page_select_kernel<kSmallSelectThreads><<<grid, kSmallSelectThreads, 0, stream>>>(params);
  } else {
    page_select_kernel<kLargeSelectThreads><<<grid, kLargeSelectThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace lserve::cuda
