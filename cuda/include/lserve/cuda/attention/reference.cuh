// Reference paged attention: causal GQA of query chunks (prefill) and single rows (decode) over
// the paged KV cache, any head_dim <= 256, float32 scores/softmax/accumulation. Simple and
// correct, not fast: the CuTe prefill and split-KV decode kernels (cuda/attention/) replace it by
// dispatch. Contract: cpp/include/lserve/ops/attention.h; CPU reference cpp/src/cpu/attention.cpp.
//
// Work mapping: one 128-thread block per (query row, query head). Its 4 warps take interleaved
// groups of kUnroll keys; a lane owns channels lane + 32 * c (c < kChunks), so each key is one
// coalesced row read and a warp-wide sum. Each warp keeps an online softmax (max, sum, acc); the
// block merges the 4 partial states through shared memory. The query row finds its sequence by a
// binary search over qo_indptr. KV reads are not shared across a GQA group or across rows (they
// hit L2): O(q_len * kv_len) traffic per head, fine for tests and short contexts.
//
// The sparse block-iterator policy of ops/attention.h, all of it: per-sequence Lambda windows,
// stream rings (pages computed from (sink base, sinks, ring base, ring length)) and the selection
// store read through select_slot / select_base. A key the policy hides is never loaded (its slot is
// -1), so pages outside a sequence's selection or window are not read.
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct AttentionReferenceParams {
  const void* query;               // (num_tokens, num_qo_heads, head_dim), strides (q_stride_token, q_stride_head, 1)
  const void* k_cache;             // (num_pages, page_size, num_kv_heads, head_dim)
  const void* v_cache;             // (num_pages, page_size, num_kv_heads, head_dim)
  const int32_t* qo_indptr;        // (num_seqs + 1,)
  const int32_t* kv_page_indptr;   // (num_seqs + 1,)
  const int32_t* kv_page_indices;  // (kv_page_indptr[num_seqs],)
  const int32_t* kv_lens;          // (num_seqs,)
  void* output;                    // (num_tokens, num_qo_heads, head_dim), strides (o_stride_token, o_stride_head, 1)
  ElemType query_type = ElemType::kF32;
  ElemType output_type = ElemType::kF32;
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
  int64_t num_qo_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t page_size = 0;
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t o_stride_token = 0, o_stride_head = 0;
  float sm_scale = 1.0f;
  // Sparse policy (ops/attention.h); null = absent.
  const int32_t* window_sink = nullptr;      // (num_seqs,)
  const int32_t* window_local = nullptr;     // (num_seqs,), <= 0: no window
  const int32_t* stream_ring = nullptr;      // (num_seqs, 4): replaces the page list
  const int32_t* selection = nullptr;        // (num_slots, num_kv_heads, capacity)
  const int32_t* selection_count = nullptr;  // (num_slots, num_kv_heads), < 0: every page
  const int32_t* select_slot = nullptr;      // (num_seqs,), < 0: every page; null: slot = sequence
  const int32_t* select_base = nullptr;      // (num_seqs,); null: the sequence's page count
  int64_t selection_capacity = 0;
};

// Which keys a (sequence, KV head) may read, and where they live.
struct ReferenceKeyPolicy {
  const int32_t* pages = nullptr;  // the page list, or null with a ring
  int32_t ring[4] = {0, 0, 0, 1};
  int64_t page_size = 1, sink = 0, local = 0;
  const int32_t* listed = nullptr;  // stored positions (ascending), or null: every page
  int64_t num_listed = 0, base = 0;

  __device__ int64_t page_of(int64_t lp) const {
    if (pages != nullptr) return pages[lp];
    return lp < ring[1] ? ring[0] + lp : ring[2] + (lp - ring[1]) % ring[3];
  }
  // Key at `key` for a query at `pos` (key <= pos already).
  __device__ bool visible(int64_t key, int64_t pos) const {
    if (local > 0 && !(key < sink || key > pos - local)) return false;
    if (listed == nullptr) return true;
    const int64_t lp = key / page_size;
    if (lp >= base) return true;
    int64_t lo = 0, hi = num_listed;  // binary search among the stored positions below the base
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (listed[mid] < lp) lo = mid + 1; else hi = mid;
    }
    return lo < num_listed && listed[lo] == lp;
  }
};

constexpr int kAttentionReferenceWarps = 4;
constexpr int kAttentionReferenceUnroll = 4;  // keys in flight per warp: independent loads

template <int kChunks>
struct AttentionReferenceSharedStorage {
  float max[kAttentionReferenceWarps];
  float sum[kAttentionReferenceWarps];
  float acc[kAttentionReferenceWarps][kChunks * 32];
};

template <typename KV, int kChunks>
__global__ void __launch_bounds__(kAttentionReferenceWarps * 32)
    attention_reference_kernel(AttentionReferenceParams params) {
  constexpr int kWarps = kAttentionReferenceWarps, kUnroll = kAttentionReferenceUnroll;
  __shared__ AttentionReferenceSharedStorage<kChunks> shared;
  const int64_t row = blockIdx.x, head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t head_dim = params.head_dim;

  // The sequence holding this row: the last s with qo_indptr[s] <= row (empty chunks skipped).
  int64_t lo = 0, hi = params.num_seqs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (params.qo_indptr[mid] <= row) lo = mid; else hi = mid - 1;
  }
  const int64_t seq = lo;
  const int64_t q_start = params.qo_indptr[seq], q_len = params.qo_indptr[seq + 1] - q_start;
  const int64_t kv_len = params.kv_lens[seq];
  int64_t num_keys = kv_len - q_len + (row - q_start) + 1;  // causal: keys at positions <= the row's
  num_keys = num_keys < 0 ? 0 : (num_keys > kv_len ? kv_len : num_keys);
  const int64_t kv_head = head / (params.num_qo_heads / params.num_kv_heads);
  ReferenceKeyPolicy policy;
  policy.page_size = params.page_size;
  if (params.stream_ring != nullptr) {
#pragma unroll
    for (int i = 0; i < 4; ++i) policy.ring[i] = params.stream_ring[4 * seq + i];
  } else {
    policy.pages = params.kv_page_indices + params.kv_page_indptr[seq];
  }
  if (params.window_local != nullptr) {
    policy.sink = params.window_sink[seq];
    policy.local = params.window_local[seq];
  }
  if (params.selection_count != nullptr) {
    const int64_t slot = params.select_slot != nullptr ? params.select_slot[seq] : seq;
    const int64_t count = slot >= 0 ? params.selection_count[slot * params.num_kv_heads + kv_head] : -1;
    if (count >= 0) {
      policy.listed = params.selection + (slot * params.num_kv_heads + kv_head) * params.selection_capacity;
      policy.base = params.select_base != nullptr ? params.select_base[seq]
                                                  : (kv_len + params.page_size - 1) / params.page_size;
      policy.num_listed = 0;  // the stored positions below the base (ascending)
      while (policy.num_listed < count && policy.listed[policy.num_listed] < policy.base) ++policy.num_listed;
    }
  }
  const int64_t pos = kv_len - q_len + (row - q_start);
  const int64_t slot_width = params.num_kv_heads * head_dim;
  const KV* k_base = static_cast<const KV*>(params.k_cache) + kv_head * head_dim;
  const KV* v_base = static_cast<const KV*>(params.v_cache) + kv_head * head_dim;

  float q[kChunks];
  const int64_t q_offset = row * params.q_stride_token + head * params.q_stride_head;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t d = lane + 32 * c;
    q[c] = d < head_dim ? load_as_float(params.query, params.query_type, q_offset + d) : 0.0f;
  }

  float running_max = -INFINITY, running_sum = 0.0f, acc[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) acc[c] = 0.0f;

  for (int64_t first = int64_t(warp) * kUnroll; first < num_keys; first += int64_t(kWarps) * kUnroll) {
    int64_t slot[kUnroll];
    float score[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t key = first + u;
      slot[u] = key < num_keys && policy.visible(key, pos)
                    ? policy.page_of(key / params.page_size) * params.page_size + key % params.page_size
                    : -1;
      float partial = 0.0f;
      if (slot[u] >= 0) {
        const KV* k = k_base + slot[u] * slot_width;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int64_t d = lane + 32 * c;
          if (d < head_dim) partial += q[c] * to_float(k[d]);
        }
      }
      score[u] = partial;
    }
    float block_max = running_max;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      score[u] = slot[u] >= 0 ? warp_sum(score[u]) * params.sm_scale : -INFINITY;
      block_max = fmaxf(block_max, score[u]);
    }
    // Nothing visible yet (a Lambda window or a selection hid every key so far): keep the empty
    // state instead of exp(-inf - -inf) = NaN.
    const float correction = block_max == -INFINITY ? 1.0f : expf(running_max - block_max);
    running_sum *= correction;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) acc[c] *= correction;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (slot[u] < 0) continue;
      const float p = expf(score[u] - block_max);
      running_sum += p;
      const KV* v = v_base + slot[u] * slot_width;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < head_dim) acc[c] += p * to_float(v[d]);
      }
    }
    running_max = block_max;
  }

  if (lane == 0) {
    shared.max[warp] = running_max;
    shared.sum[warp] = running_sum;
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) shared.acc[warp][lane + 32 * c] = acc[c];
  __syncthreads();

  float total_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, shared.max[w]);
  float total_sum = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (shared.sum[w] > 0.0f) total_sum += shared.sum[w] * expf(shared.max[w] - total_max);
  }
  const int64_t o_offset = row * params.o_stride_token + head * params.o_stride_head;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (shared.sum[w] > 0.0f) value += shared.acc[w][d] * expf(shared.max[w] - total_max);
    }
    store_from_float(params.output, params.output_type, o_offset + d, total_sum > 0.0f ? value / total_sum : 0.0f);
  }
}

template <typename KV, int kChunks>
cudaError_t launch_attention_reference(const AttentionReferenceParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0 || params.num_qo_heads == 0) return cudaSuccess;
  if (params.num_qo_heads > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(params.num_tokens), static_cast<unsigned>(params.num_qo_heads));
  attention_reference_kernel<KV, kChunks><<<grid, kAttentionReferenceWarps * 32, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
