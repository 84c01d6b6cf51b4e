// C ABI over the attention launchers for standalone tests (ctypes) and benchmarks: one flat struct
// of fixed-width fields, mirrored by tests/cuda/test_attention_kernels.py. Not used by the engine.
#include <cstdint>

#include "attention_kernels.h"

extern "C" {

struct LserveAttnArgs {
  int32_t dtype, head_dim, num_qo_heads, num_kv_heads, page_size, num_pages, num_seqs, num_tokens;
  int32_t max_q_len, max_kv_len, sink_tokens, local_tokens, selected_stride, selected_block_size;
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
  const uint8_t* streaming_heads;
  const int32_t* selected_blocks;
  const int32_t* num_selected;
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
  p.sparsity.streaming_heads = a.streaming_heads;
  p.sparsity.sink_tokens = a.sink_tokens;
  p.sparsity.local_tokens = a.local_tokens;
  p.sparsity.selected_blocks = a.selected_blocks;
  p.sparsity.num_selected = a.num_selected;
  p.sparsity.selected_stride = a.selected_stride;
  p.sparsity.selected_block_size = a.selected_block_size;
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
