// attention: causal grouped-query attention of a batch of query chunks over the paged KV cache.
// Sequence s owns query rows [qo_indptr[s], qo_indptr[s+1]) and KV pages
// kv_page_indices[kv_page_indptr[s] .. kv_page_indptr[s+1]) holding kv_lens[s] tokens, the
// chunk's own keys included (appended first by rope_kv_append). Query row i of a chunk of
// q_len rows sits at position kv_lens[s] - q_len + i and sees keys at positions <= its own.
// Query head h reads KV head h / (num_qo_heads / num_kv_heads). Scores, softmax and the weighted
// sum are float32; a bfloat16/float16 output is rounded once.
//
// Block-iterator policy (one attention for dense and sparse heads): each (sequence, KV head)
// walks a list of KV pages and never reads the others.
//  - default: every page up to the causal limit of the query.
//  - window_sink / window_local (num_seqs,) int32, optional: the Lambda mask of streaming heads.
//    A key at position j is visible to a query at position p iff j <= p and (j < sink or
//    j > p - local); pages wholly outside are skipped. local <= 0: no window for that sequence.
//  - head_page_positions (num_seqs, num_kv_heads, max_pages) int32 with head_num_pages
//    (num_seqs, num_kv_heads) int32, optional: KV head g of sequence s reads only the pages at
//    positions head_page_positions[s, g, :head_num_pages[s, g]] of its page list (ascending,
//    each < the sequence's page count); a negative count means every page (dense).
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct AttentionArgs {
  TensorView query;            // (num_tokens, num_qo_heads, head_dim) f32 | bf16 | f16, rows contiguous
  TensorView k_cache;          // (num_pages, page_size, num_kv_heads, head_dim) float32 | bfloat16
  TensorView v_cache;          // (num_pages, page_size, num_kv_heads, head_dim), k_cache's dtype
  TensorView qo_indptr;        // (num_seqs + 1,) int32, qo_indptr[num_seqs] == num_tokens
  TensorView kv_page_indptr;   // (num_seqs + 1,) int32
  TensorView kv_page_indices;  // (kv_page_indptr[num_seqs],) int32, each in [0, num_pages)
  TensorView kv_lens;          // (num_seqs,) int32, q_len <= kv_len <= num_seq_pages * page_size
  TensorView output;           // (num_tokens, num_qo_heads, head_dim) f32 | bf16 | f16, rows contiguous
  float sm_scale = 1.0f;       // usually 1 / sqrt(head_dim)
  // Host-side hints for device kernels that size their grids on the host (0 = unknown; a backend
  // then reads the metadata back or takes a slower path): >= every chunk's q_len / kv_len.
  int32_t max_q_len = 0;
  int32_t max_kv_len = 0;
  TensorView window_sink;          // optional (num_seqs,) int32
  TensorView window_local;         // optional (num_seqs,) int32
  TensorView head_page_positions;  // optional (num_seqs, num_kv_heads, max_pages) int32
  TensorView head_num_pages;       // optional (num_seqs, num_kv_heads) int32

  bool has_window() const { return window_local.defined(); }
  bool has_head_pages() const { return head_num_pages.defined(); }

  void validate(const Device& device) const {
    const char* op = "attention";
    TensorCheck(query, op, "query").ndim(3).float_dtype().device(device).rows_contiguous();
    const int64_t num_tokens = query.size(0), num_qo_heads = query.size(1), head_dim = query.size(2);
    TensorCheck(k_cache, op, "k_cache").ndim(4).dtype_in({DType::kF32, DType::kBF16}).device(device)
        .contiguous().size(3, head_dim);
    TensorCheck(v_cache, op, "v_cache").ndim(4).dtype(k_cache.dtype).device(device).contiguous()
        .size(0, k_cache.size(0)).size(1, k_cache.size(1)).size(2, k_cache.size(2)).size(3, head_dim);
    LSERVE_CHECK(num_qo_heads % k_cache.size(2) == 0, op, ": num_qo_heads ", num_qo_heads,
                 " is not a multiple of num_kv_heads ", k_cache.size(2));
    TensorCheck(qo_indptr, op, "qo_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous();
    const int64_t num_seqs = qo_indptr.size(0) - 1;
    LSERVE_CHECK(num_seqs >= 0, op, ": qo_indptr must have num_seqs + 1 entries");
    TensorCheck(kv_page_indptr, op, "kv_page_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_seqs + 1);
    TensorCheck(kv_page_indices, op, "kv_page_indices").ndim(1).dtype(DType::kI32).device(device)
        .contiguous();
    TensorCheck(kv_lens, op, "kv_lens").ndim(1).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_seqs);
    TensorCheck(output, op, "output").ndim(3).float_dtype().device(device).rows_contiguous()
        .size(0, num_tokens).size(1, num_qo_heads).size(2, head_dim);
    LSERVE_CHECK(window_sink.defined() == window_local.defined(), op,
                 ": window_sink and window_local come together");
    if (has_window()) {
      TensorCheck(window_sink, op, "window_sink").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs);
      TensorCheck(window_local, op, "window_local").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs);
    }
    LSERVE_CHECK(head_page_positions.defined() == head_num_pages.defined(), op,
                 ": head_page_positions and head_num_pages come together");
    if (has_head_pages()) {
      TensorCheck(head_page_positions, op, "head_page_positions").ndim(3).dtype(DType::kI32).device(device)
          .contiguous().size(0, num_seqs).size(1, k_cache.size(2));
      TensorCheck(head_num_pages, op, "head_num_pages").ndim(2).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs).size(1, k_cache.size(2));
    }
  }
};

}  // namespace lserve
