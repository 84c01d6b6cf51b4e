// page_select: LServe's hierarchical page selection for decode (Quest-style bounds).
// Each logical page (logical_page_size tokens) of a dense KV head keeps per-channel kmax/kmin of
// its keys; for a decode query q the logical page scores S = sum_d max(q_d * kmax_d, q_d * kmin_d)
// (PageScore::kBound, the paper's: an upper bound of q.k over the page's keys), or, with
// PageScore::kCenter, S = sum_d q_d * (kmax_d + kmin_d) / 2 (q against the centre of the page's
// bounding box: the bound without its spread term sum_d |q_d| * (kmax_d - kmin_d) / 2). S is
// summed over the query heads of the GQA group so the group shares one selection; a physical page
// scores the max of its logical pages. Per (sequence, KV head) the top num_select physical pages win
// (ties: the earlier page), always including the newest page and, if asked, page 0 (the sinks).
// Selected positions are written in ascending order. Sequences with num_pages <= num_select select
// every page. Reference: the numpy formula in tests/sparse/test_page_select.py.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

enum class PageScore : int32_t { kBound = 0, kCenter = 1 };

struct PageSelectArgs {
  TensorView query;            // (num_seqs, num_qo_heads, head_dim) float32, one decode query per sequence
  TensorView kmax;             // (num_pages, logical_per_page, num_kv_heads, head_dim) float32
  TensorView kmin;             // (num_pages, logical_per_page, num_kv_heads, head_dim) float32
  TensorView kv_page_indptr;   // (num_seqs + 1,) int32
  TensorView kv_page_indices;  // (kv_page_indptr[num_seqs],) int32, physical page ids in token order
  TensorView kv_lens;          // (num_seqs,) int32 tokens held; the last logical pages may be partial
  TensorView selected;         // (num_seqs, num_kv_heads, num_select) int32 out: positions in the page list
  TensorView num_selected;     // (num_seqs, num_kv_heads) int32 out
  int physical_page_size = 64;
  bool keep_first_page = true;
  PageScore score = PageScore::kBound;

  void validate(const Device& device) const {
    const char* op = "page_select";
    LSERVE_CHECK(score == PageScore::kBound || score == PageScore::kCenter, op, ": unknown page score ",
                 static_cast<int>(score));
    TensorCheck(query, op, "query").ndim(3).dtype(DType::kF32).device(device).rows_contiguous();
    TensorCheck(kmax, op, "kmax").ndim(4).dtype(DType::kF32).device(device).contiguous().size(3, query.size(2));
    TensorCheck(kmin, op, "kmin").ndim(4).dtype(DType::kF32).device(device).contiguous()
        .size(0, kmax.size(0)).size(1, kmax.size(1)).size(2, kmax.size(2)).size(3, kmax.size(3));
    const int64_t num_seqs = query.size(0), num_kv_heads = kmax.size(2);
    LSERVE_CHECK(query.size(1) % num_kv_heads == 0, op, ": num_qo_heads ", query.size(1),
                 " is not a multiple of num_kv_heads ", num_kv_heads);
    LSERVE_CHECK(physical_page_size >= 1 && physical_page_size % kmax.size(1) == 0, op, ": physical_page_size ",
                 physical_page_size, " is not a multiple of logical pages per page ", kmax.size(1));
    TensorCheck(kv_page_indptr, op, "kv_page_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_seqs + 1);
    TensorCheck(kv_page_indices, op, "kv_page_indices").ndim(1).dtype(DType::kI32).device(device).contiguous();
    TensorCheck(kv_lens, op, "kv_lens").ndim(1).dtype(DType::kI32).device(device).contiguous().size(0, num_seqs);
    TensorCheck(selected, op, "selected").ndim(3).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_seqs).size(1, num_kv_heads);
    LSERVE_CHECK(selected.size(2) >= (keep_first_page ? 2 : 1), op, ": num_select must be >= ",
                 keep_first_page ? 2 : 1, " (the newest page", keep_first_page ? " and the first page)" : ")");
    TensorCheck(num_selected, op, "num_selected").ndim(2).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_seqs).size(1, num_kv_heads);
  }
};

// page_stats_append: for each new key (after RoPE) at slot s = page * page_size + offset, folds it
// into kmax/kmin of logical page offset / logical_page_size. The first token of a logical page
// (offset % logical_page_size == 0) resets the entry, so a recycled page never keeps stale bounds.
struct PageStatsAppendArgs {
  TensorView key;           // (num_tokens, num_kv_heads, head_dim) float32, rows contiguous
  TensorView slot_mapping;  // (num_tokens,) int64; < 0 skips the token
  TensorView kmax;          // (num_pages, logical_per_page, num_kv_heads, head_dim) float32, updated
  TensorView kmin;          // same shape, updated
  int physical_page_size = 64;

  void validate(const Device& device) const {
    const char* op = "page_stats_append";
    TensorCheck(key, op, "key").ndim(3).dtype(DType::kF32).device(device).rows_contiguous();
    TensorCheck(slot_mapping, op, "slot_mapping").ndim(1).dtype(DType::kI64).device(device).contiguous()
        .size(0, key.size(0));
    TensorCheck(kmax, op, "kmax").ndim(4).dtype(DType::kF32).device(device).contiguous()
        .size(2, key.size(1)).size(3, key.size(2));
    TensorCheck(kmin, op, "kmin").ndim(4).dtype(DType::kF32).device(device).contiguous()
        .size(0, kmax.size(0)).size(1, kmax.size(1)).size(2, kmax.size(2)).size(3, kmax.size(3));
    LSERVE_CHECK(physical_page_size >= 1 && physical_page_size % kmax.size(1) == 0, op, ": physical_page_size ",
                 physical_page_size, " is not a multiple of logical pages per page ", kmax.size(1));
  }
};

// CPU reference implementations (cpp/src/cpu/page_select.cpp). They validate nothing beyond index
// ranges: call args.validate(device) first (Backend::page_select and page_stats_append do).
void cpu_page_select(const PageSelectArgs& args);
void cpu_page_stats_append(const PageStatsAppendArgs& args);

}  // namespace lserve
