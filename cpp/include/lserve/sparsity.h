// SparsityConfig: LServe's unified sparse attention settings; Python's lserve.SparsityConfig adds
// head patterns (files, scores) and has these fields checked here. Streaming heads (per layer, per KV head) attend to sink +
// local tokens (a Lambda-shaped mask) in prefill and decode; dense heads keep the full paged
// cache and, at decode, read only a token budget of pages chosen by hierarchical paging.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "lserve/ops/page_select.h"

namespace lserve {

struct SparsityConfig {
  bool enabled = false;                    // false: dense attention everywhere ("dense" preset)
  // (num_layers * num_kv_heads) flags, layer-major; true marks a streaming head.
  std::vector<uint8_t> streaming_heads;
  int prefill_sink_tokens = 128;
  int prefill_local_tokens = 8192;
  int decode_sink_tokens = 128;
  int decode_local_tokens = 256;
  int physical_page_size = 64;             // tokens per KV page of dense heads
  int logical_page_size = 16;              // tokens per kmax/kmin statistics entry
  int decode_token_budget = 4096;          // tokens of pages a dense head reads per decode step
  int selection_reuse_interval = 4;        // decode steps a page selection is reused
  int dense_below_tokens = 0;              // contexts shorter than this run dense
  bool always_select_sink_page = true;     // keep page 0 in every selection
  PageScore page_score = PageScore::kBound;  // logical page score (ops/page_select.h)
  float page_score_spread = 0.25f;         // kBlend's weight of the spread term (PageSelectArgs::spread)
  GroupScore group_score = GroupScore::kSum;  // how a GQA group's query heads combine (ops/page_select.h)
  // Tokens at the end of the context every fresh selection of a dense head keeps, rounded up to whole
  // physical pages (PageSelectArgs::keep_last_pages); 0 keeps the newest page alone. They count in the budget.
  int select_recent_tokens = 0;
  // Per-head decode budgets in tokens, (num_layers * num_kv_heads) layer-major; streaming heads'
  // entries are ignored. Empty: decode_token_budget for every dense head.
  std::vector<int32_t> head_token_budgets;

  // Throws lserve::Error naming the field, its value and the rule it breaks: the settings alone
  // (what lserve.SparsityConfig checks when it is made), then with the model's shape.
  void validate() const;
  void validate(int num_layers, int num_kv_heads) const;
  // The first field outside the decode-time selection settings in which `other` differs from this
  // config, or nullptr when they differ in those alone (decode_token_budget, head_token_budgets,
  // select_recent_tokens, selection_reuse_interval, always_select_sink_page, page_score,
  // page_score_spread, group_score): the fields Engine::set_decode_sparsity may change, because
  // none of them sizes memory or shapes prefill.
  const char* layout_difference(const SparsityConfig& other) const;
  // Pages every selection keeps at the end of the context (>= 1), and pages a dense head (entry i of
  // head_token_budgets, or any head without them) selects.
  int recent_pages() const {
    return select_recent_tokens <= 0 ? 1 : (select_recent_tokens + physical_page_size - 1) / physical_page_size;
  }
  // Pages every selection holds whatever the scores: the recent pages and, if asked, the sink page.
  int forced_pages() const { return recent_pages() + (always_select_sink_page ? 1 : 0); }
  int head_budget_pages(int64_t entry) const {
    const int tokens = head_token_budgets.empty() ? decode_token_budget : head_token_budgets[static_cast<size_t>(entry)];
    return std::max(1, tokens / physical_page_size);
  }
  bool is_streaming(int layer_idx, int kv_head_idx, int num_kv_heads) const {
    return enabled && !streaming_heads.empty() &&
           streaming_heads[static_cast<size_t>(layer_idx) * num_kv_heads + kv_head_idx] != 0;
  }
};

}  // namespace lserve
