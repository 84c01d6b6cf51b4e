// attention: causal grouped-query attention of a batch of query chunks over the paged KV cache.
// Sequence s owns query rows [qo_indptr[s], qo_indptr[s+1]) and kv_lens[s] tokens of keys, the
// chunk's own keys included (appended first by rope_kv_append). Query row i of a chunk of q_len
// rows sits at position kv_lens[s] - q_len + i and sees keys at positions <= its own. Query head h
// reads KV head h / (num_qo_heads / num_kv_heads). Scores, softmax and the weighted sum are
// float32; a bfloat16/float16 output is rounded once.
//
// Where a sequence's keys live (logical page lp = position / page_size):
//  - page list (default): kv_page_indices[kv_page_indptr[s] + lp], kv_lens[s] <= pages * page_size.
//  - stream_ring (num_seqs, 4) int32 [sink_base, num_sink, ring_base, num_ring] (streaming heads):
//    lp < num_sink lives on page sink_base + lp, later ones on ring_base + (lp - num_sink) % num_ring;
//    no page list (kv_page_indptr/kv_page_indices stay undefined), no table that grows with context.
//    Needs every key the chunk can see on a distinct page: window_sink <= num_sink * page_size, and
//    the pages from the chunk's first visible local key to its last key number <= num_ring.
//
// Block-iterator policy (one attention for dense and sparse heads, one vocabulary on every backend):
// each (sequence, KV head) walks a list of KV pages and never reads the others.
//  - default (dense): every page up to the causal limit of the query.
//  - window_sink / window_local (num_seqs,) int32, optional: the Lambda mask of streaming heads.
//    A key at position j is visible to a query at position p iff j <= p and (j < sink or
//    j > p - local); pages wholly outside are skipped. local <= 0: no window for that sequence.
//  - selection (num_slots, num_kv_heads, capacity) int32 with selection_count (num_slots,
//    num_kv_heads) int32, optional: the page selector's store of decode page selections, positions
//    in the sequence's page list, ascending per (slot, head). Sequence s reads slot select_slot[s]
//    and base select_base[s] (both optional (num_seqs,) int32; absent: slot s, base = its page
//    count). KV head g reads the stored positions that are < base, then every position in
//    [base, num_pages): the pages created since the selection was made.
//    "Dense": select_slot[s] < 0 reads every page. "No selection": selection_count < 0 (a slot
//    never selected, or a row a device kernel found invalid) also reads every page, never nothing.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

// Page of logical page `logical_page` of a sequence with stream ring `ring` [sink_base, num_sink,
// ring_base, num_ring] (the host's one copy of the rule; device kernels: PageTable, reference.cuh).
inline int64_t stream_ring_page(const int32_t* ring, int64_t logical_page) {
  return logical_page < ring[1] ? ring[0] + logical_page : ring[2] + (logical_page - ring[1]) % ring[3];
}

struct AttentionArgs {
  TensorView query;            // (num_tokens, num_qo_heads, head_dim) f32 | bf16 | f16, rows contiguous
  TensorView k_cache;          // (num_pages, page_size, num_kv_heads, head_dim) float32 | bfloat16
  TensorView v_cache;          // (num_pages, page_size, num_kv_heads, head_dim), k_cache's dtype
  TensorView qo_indptr;        // (num_seqs + 1,) int32, qo_indptr[num_seqs] == num_tokens
  TensorView kv_page_indptr;   // (num_seqs + 1,) int32 (undefined with stream_ring)
  TensorView kv_page_indices;  // (kv_page_indptr[num_seqs],) int32, each in [0, num_pages) (undefined with stream_ring)
  TensorView kv_lens;          // (num_seqs,) int32, q_len <= kv_len <= num_seq_pages * page_size
  TensorView output;           // (num_tokens, num_qo_heads, head_dim) f32 | bf16 | f16, rows contiguous
  float sm_scale = 1.0f;       // usually 1 / sqrt(head_dim)
  // Host-side hints for device kernels that size their grids on the host (0 = unknown; a backend
  // then reads the metadata back or takes a slower path): >= every chunk's q_len / kv_len.
  int32_t max_q_len = 0;
  int32_t max_kv_len = 0;
  TensorView window_sink;          // optional (num_seqs,) int32
  TensorView window_local;         // optional (num_seqs,) int32
  TensorView stream_ring;      // optional (num_seqs, 4) int32: sink_base, num_sink, ring_base, num_ring
  TensorView selection;        // optional (num_slots, num_kv_heads, capacity) int32
  TensorView selection_count;  // optional (num_slots, num_kv_heads) int32
  TensorView select_slot;      // optional (num_seqs,) int32, < 0: dense
  TensorView select_base;      // optional (num_seqs,) int32

  bool has_window() const { return window_local.defined(); }
  bool has_ring() const { return stream_ring.defined(); }
  bool has_selection() const { return selection_count.defined(); }

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
    if (has_ring()) {
      LSERVE_CHECK(!kv_page_indptr.defined() && !kv_page_indices.defined(), op,
                   ": stream_ring addresses the pages; kv_page_indptr/kv_page_indices must be left undefined");
      TensorCheck(stream_ring, op, "stream_ring").ndim(2).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs).size(1, 4);
      LSERVE_CHECK(!has_selection(), op, ": page selections read a page list, not a stream ring");
    } else {
      TensorCheck(kv_page_indptr, op, "kv_page_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs + 1);
      TensorCheck(kv_page_indices, op, "kv_page_indices").ndim(1).dtype(DType::kI32).device(device)
          .contiguous();
    }
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
    LSERVE_CHECK(selection.defined() == selection_count.defined(), op,
                 ": selection and selection_count come together");
    LSERVE_CHECK(select_slot.defined() == select_base.defined(), op, ": select_slot and select_base come together");
    LSERVE_CHECK(!select_slot.defined() || has_selection(), op, ": select_slot/select_base need a selection store");
    if (has_selection()) {
      TensorCheck(selection, op, "selection").ndim(3).dtype(DType::kI32).device(device).contiguous()
          .size(1, k_cache.size(2));
      TensorCheck(selection_count, op, "selection_count").ndim(2).dtype(DType::kI32).device(device).contiguous()
          .size(0, selection.size(0)).size(1, k_cache.size(2));
      if (select_slot.defined()) {
        TensorCheck(select_slot, op, "select_slot").ndim(1).dtype(DType::kI32).device(device).contiguous()
            .size(0, num_seqs);
        TensorCheck(select_base, op, "select_base").ndim(1).dtype(DType::kI32).device(device).contiguous()
            .size(0, num_seqs);
      } else {
        LSERVE_CHECK(selection.size(0) == num_seqs, op, ": without select_slot the selection store has one row per "
                     "sequence (", num_seqs, "), got ", selection.size(0));
      }
    }
  }
};

}  // namespace lserve
