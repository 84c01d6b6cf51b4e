// page_select: LServe's hierarchical page selection for decode (Quest-style bounds).
// Each logical page (logical_page_size tokens) of a dense KV head keeps per-channel kmax/kmin of
// its keys; for a decode query q the logical page scores S = sum_d max(q_d * kmax_d, q_d * kmin_d)
// (PageScore::kBound, the paper's: an upper bound of q.k over the page's keys), or, with
// PageScore::kCenter, S = sum_d q_d * (kmax_d + kmin_d) / 2 (q against the centre of the page's
// bounding box: the bound without its spread term sum_d |q_d| * (kmax_d - kmin_d) / 2), or, with
// PageScore::kBlend, the centre plus `spread` times the spread term, per channel
// q_d * ((kmax_d + kmin_d) / 2) + spread * (|q_d| * ((kmax_d - kmin_d) / 2)) in that rounding order
// (spread 0 is the centre and 1 the bound, up to rounding; same statistics, same scan). S is
// combined over the query heads of the GQA group so the group shares one selection (GroupScore):
// kSum (the paper's) sums the heads' logical scores and a physical page scores the max of its
// logical pages; kMax takes each head's page score (max over its logical pages) and the page scores
// the best head's; kMass turns each head's page scores into a softmax over the sequence's pages at
// scale 1/sqrt(head_dim) (an estimate of where that head's attention goes: every head gets the
// same say, a peaked head concentrates it) and sums them over the group, in head order, each
// head's normaliser summed in page order. Per (sequence, KV head) the top num_select physical pages win
// (ties: the earlier page), always including the newest keep_last_pages pages and, if asked, page 0
// (the sinks). num_select is the store's width, or KV head h's entry of head_num_select (a per-head
// budget: a head may read fewer pages than the widest head of its layer). Selected positions are
// written in ascending order. Sequences with num_pages <= num_select select every page. Reference:
// the numpy formula in tests/sparse/test_page_select.py.
//
// The page selector's store: `selected`/`num_selected` hold one row per slot (decode sequence of the
// engine), and a step selects only for its fresh sequences: select_mode[s] == kSelectFresh scores
// sequence s and writes row select_slot[s]; dense and reuse sequences leave the store as it is (a
// reused selection stays where it was written). The query of sequence s is row qo_indptr[s+1] - 1
// (its last token), so the step's whole query tensor is passed as it is, in the activation dtype.
// Without select_mode every sequence is fresh; without select_slot sequence s writes row s; without
// qo_indptr query row s is sequence s's.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

enum class PageScore : int32_t { kBound = 0, kCenter = 1, kBlend = 2 };
enum class GroupScore : int32_t { kSum = 0, kMax = 1, kMass = 2 };

// select_mode values (one vocabulary for the page selector, page_select and every backend).
enum SelectMode : int32_t {
  kSelectDense = 0,  // read every page; page_select skips the sequence
  kSelectFresh = 1,  // score the pages now and store the selection in the sequence's slot
  kSelectReuse = 2,  // read the slot's stored selection plus every page created since it was made
};

struct PageSelectArgs {
  TensorView query;            // (num_rows, num_qo_heads, head_dim) f32 | bf16 | f16, rows contiguous
  TensorView kmax;             // (num_pages, logical_per_page, num_kv_heads, head_dim) float32
  TensorView kmin;             // (num_pages, logical_per_page, num_kv_heads, head_dim) float32
  TensorView kv_page_indptr;   // (num_seqs + 1,) int32
  TensorView kv_page_indices;  // (kv_page_indptr[num_seqs],) int32, physical page ids in token order
  TensorView kv_lens;          // (num_seqs,) int32 tokens held; the last logical pages may be partial
  TensorView selected;         // (num_slots, num_kv_heads, num_select) int32 store: positions in the page list
  TensorView num_selected;     // (num_slots, num_kv_heads) int32 store
  int physical_page_size = 64;
  bool keep_first_page = true;
  PageScore score = PageScore::kBound;
  GroupScore group_score = GroupScore::kSum;
  float spread = 0.0f;         // kBlend's weight of the spread term, in [0, 1]; other scores ignore it
  TensorView qo_indptr;        // optional (num_seqs + 1,) int32: sequence s's query is row qo_indptr[s+1] - 1
  TensorView select_mode;      // optional (num_seqs,) int32 SelectMode
  TensorView select_slot;      // optional (num_seqs,) int32 store row of each fresh sequence
  int keep_last_pages = 1;     // the newest pages every selection keeps (>= 1)
  TensorView head_num_select;  // optional (num_kv_heads,) int32: head h selects head_num_select[h] pages,
                               // in [keep_last_pages + keep_first_page, num_select]; else num_select each

  void validate(const Device& device) const {
    const char* op = "page_select";
    LSERVE_CHECK(score == PageScore::kBound || score == PageScore::kCenter || score == PageScore::kBlend, op,
                 ": unknown page score ", static_cast<int>(score));
    LSERVE_CHECK(spread >= 0.0f && spread <= 1.0f, op, ": spread must be in [0, 1], got ", spread);
    LSERVE_CHECK(group_score == GroupScore::kSum || group_score == GroupScore::kMax || group_score == GroupScore::kMass,
                 op, ": unknown group score ", static_cast<int>(group_score));
    TensorCheck(query, op, "query").ndim(3).float_dtype().device(device).rows_contiguous();
    TensorCheck(kmax, op, "kmax").ndim(4).dtype(DType::kF32).device(device).contiguous().size(3, query.size(2));
    TensorCheck(kmin, op, "kmin").ndim(4).dtype(DType::kF32).device(device).contiguous()
        .size(0, kmax.size(0)).size(1, kmax.size(1)).size(2, kmax.size(2)).size(3, kmax.size(3));
    TensorCheck(kv_page_indptr, op, "kv_page_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous();
    const int64_t num_seqs = kv_page_indptr.size(0) - 1, num_kv_heads = kmax.size(2);
    LSERVE_CHECK(num_seqs >= 0, op, ": kv_page_indptr must have num_seqs + 1 entries");
    if (qo_indptr.defined()) {
      TensorCheck(qo_indptr, op, "qo_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs + 1);
    } else {
      LSERVE_CHECK(query.size(0) == num_seqs, op, ": without qo_indptr the query has one row per sequence (",
                   num_seqs, "), got ", query.size(0));
    }
    if (select_mode.defined()) {
      TensorCheck(select_mode, op, "select_mode").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs);
    }
    if (select_slot.defined()) {
      TensorCheck(select_slot, op, "select_slot").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_seqs);
    } else {
      LSERVE_CHECK(selected.size(0) == num_seqs, op, ": without select_slot the store has one row per sequence (",
                   num_seqs, "), got ", selected.size(0));
    }
    LSERVE_CHECK(query.size(1) % num_kv_heads == 0, op, ": num_qo_heads ", query.size(1),
                 " is not a multiple of num_kv_heads ", num_kv_heads);
    LSERVE_CHECK(physical_page_size >= 1 && physical_page_size % kmax.size(1) == 0, op, ": physical_page_size ",
                 physical_page_size, " is not a multiple of logical pages per page ", kmax.size(1));
    TensorCheck(kv_page_indices, op, "kv_page_indices").ndim(1).dtype(DType::kI32).device(device).contiguous();
    TensorCheck(kv_lens, op, "kv_lens").ndim(1).dtype(DType::kI32).device(device).contiguous().size(0, num_seqs);
    TensorCheck(selected, op, "selected").ndim(3).dtype(DType::kI32).device(device).contiguous()
        .size(1, num_kv_heads);
    LSERVE_CHECK(keep_last_pages >= 1, op, ": keep_last_pages must be >= 1 (the newest page), got ", keep_last_pages);
    const int64_t forced = keep_last_pages + (keep_first_page ? 1 : 0);
    LSERVE_CHECK(selected.size(2) >= forced, op, ": num_select ", selected.size(2), " must be >= ", forced, " (the ",
                 keep_last_pages, " newest page(s)", keep_first_page ? " and the first page)" : ")");
    if (head_num_select.defined()) {
      TensorCheck(head_num_select, op, "head_num_select").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_kv_heads);
    }
    TensorCheck(num_selected, op, "num_selected").ndim(2).dtype(DType::kI32).device(device).contiguous()
        .size(0, selected.size(0)).size(1, num_kv_heads);
  }
};

// page_stats_append: for each new key (after RoPE) at slot s = page * page_size + offset, folds it
// into kmax/kmin of logical page offset / logical_page_size. The first token of a logical page
// (offset % logical_page_size == 0) resets the entry, so a recycled page never keeps stale bounds.
// Keys come in the activation dtype; the statistics are float32.
struct PageStatsAppendArgs {
  TensorView key;           // (num_tokens, num_kv_heads, head_dim) f32 | bf16 | f16, rows contiguous
  TensorView slot_mapping;  // (num_tokens,) int64; < 0 skips the token
  TensorView kmax;          // (num_pages, logical_per_page, num_kv_heads, head_dim) float32, updated
  TensorView kmin;          // same shape, updated
  int physical_page_size = 64;

  void validate(const Device& device) const {
    const char* op = "page_stats_append";
    TensorCheck(key, op, "key").ndim(3).float_dtype().device(device).rows_contiguous();
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
