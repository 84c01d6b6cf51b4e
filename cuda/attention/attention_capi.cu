// C ABI over the attention launchers for standalone tests (ctypes) and benchmarks: one flat struct
// of fixed-width fields, mirrored by AttnArgs in tests/cuda/attention_lib.py. Not used by the engine.
#include <cstdint>

#include "attention_kernels.h"

extern "C" {

struct LserveAttnArgs {
  int32_t dtype, head_dim, num_qo_heads, num_kv_heads, page_size, num_pages, num_seqs, num_tokens;
  int32_t max_q_len, max_kv_len, num_slots, capacity;
  float sm_scale;
  int32_t reserved;
  int64_t q_stride_token, q_stride_head, o_stride_token, o_stride_head;
  int64_t kv_stride_page, kv_stride_token, kv_stride_head;
  const void* q;
  void* o;
  const void* k_cache;
  const void* v_cache;
  const int32_t* qo_indptr;
  const int32_t* kv_page_indptr;
  const int32_t* kv_page_indices;
  const int32_t* kv_lens;
  // The sparse policy, KvBlockSparsity's fields (attention_kernels.h); null = absent.
  const int32_t* window_sink;      // (num_seqs,)
  const int32_t* window_local;     // (num_seqs,)
  const int32_t* stream_ring;      // (num_seqs, 4) or null: pages computed instead of listed
  const int32_t* selection;        // (num_slots, num_kv_heads, capacity)
  const int32_t* selection_count;  // (num_slots, num_kv_heads)
  const int32_t* select_slot;      // (num_seqs,)
  const int32_t* select_base;      // (num_seqs,)
};

}  // extern "C"

namespace {

lserve::cuda::AttentionParams to_params(const LserveAttnArgs& a) {
  lserve::cuda::AttentionParams p;
  p.dtype = static_cast<lserve::cuda::AttnDType>(a.dtype);
  p.head_dim = a.head_dim;
  p.num_qo_heads = a.num_qo_heads;
  p.num_kv_heads = a.num_kv_heads;
  p.page_size = a.page_size;
  p.num_pages = a.num_pages;
  p.num_seqs = a.num_seqs;
  p.num_tokens = a.num_tokens;
  p.max_q_len = a.max_q_len;
  p.max_kv_len = a.max_kv_len;
  p.q = a.q;
  p.q_stride_token = a.q_stride_token;
  p.q_stride_head = a.q_stride_head;
  p.o = a.o;
  p.o_stride_token = a.o_stride_token;
  p.o_stride_head = a.o_stride_head;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.kv_stride_page = a.kv_stride_page;
  p.kv_stride_token = a.kv_stride_token;
  p.kv_stride_head = a.kv_stride_head;
  p.qo_indptr = a.qo_indptr;
  p.kv_page_indptr = a.kv_page_indptr;
  p.kv_page_indices = a.kv_page_indices;
  p.kv_lens = a.kv_lens;
  p.sm_scale = a.sm_scale;
  p.sparsity.window_sink = a.window_sink;
  p.sparsity.window_local = a.window_local;
  p.sparsity.stream_ring = a.stream_ring;
  p.sparsity.selection = a.selection;
  p.sparsity.selection_count = a.selection_count;
  p.sparsity.select_slot = a.select_slot;
  p.sparsity.select_base = a.select_base;
  p.sparsity.num_slots = a.num_slots;
  p.sparsity.capacity = a.capacity;
  return p;
}

}  // namespace

extern "C" {

int lserve_attn_args_size() { return int(sizeof(LserveAttnArgs)); }

int lserve_attn_prefill(const LserveAttnArgs* args, int impl, void* stream) {
  return int(lserve::cuda::attention_prefill(to_params(*args), static_cast<cudaStream_t>(stream),
                                             static_cast<lserve::cuda::PrefillImpl>(impl)));
}

int lserve_attn_decode_num_splits(const LserveAttnArgs* args, int num_sms) {
  return lserve::cuda::decode_num_splits(to_params(*args), num_sms);
}

uint64_t lserve_attn_decode_workspace_bytes(const LserveAttnArgs* args, int num_splits) {
  return lserve::cuda::decode_workspace_bytes(to_params(*args), num_splits);
}

int lserve_attn_decode(const LserveAttnArgs* args, int num_splits, void* workspace, uint64_t workspace_bytes,
                       void* stream) {
  return int(lserve::cuda::attention_decode(to_params(*args), num_splits, workspace, workspace_bytes,
                                            static_cast<cudaStream_t>(stream)));
}

const char* lserve_attn_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
