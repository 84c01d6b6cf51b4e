// SparsityConfig::validate: every rule of the settings, once (Python's SparsityConfig calls it).
#include "lserve/sparsity.h"

#include "lserve/check.h"

namespace lserve {

void SparsityConfig::validate() const {
  auto at_least = [](int value, int minimum, const char* name) {
    LSERVE_CHECK(value >= minimum, "SparsityConfig.", name, " must be an int >= ", minimum, ", got ", value);
  };
  at_least(prefill_sink_tokens, 0, "prefill_sink_tokens");
  at_least(decode_sink_tokens, 0, "decode_sink_tokens");
  at_least(dense_below_tokens, 0, "dense_below_tokens");
  at_least(prefill_local_tokens, 1, "prefill_local_tokens");
  at_least(decode_local_tokens, 1, "decode_local_tokens");
  at_least(physical_page_size, 1, "physical_page_size");
  at_least(logical_page_size, 1, "logical_page_size");
  at_least(decode_token_budget, 1, "decode_token_budget");
  at_least(selection_reuse_interval, 1, "selection_reuse_interval");
  at_least(select_recent_tokens, 0, "select_recent_tokens");
  LSERVE_CHECK(page_score_spread >= 0.0f && page_score_spread <= 1.0f,
               "SparsityConfig.page_score_spread must be in [0, 1] (0: the centre score, 1: the bound), got ",
               page_score_spread);
  LSERVE_CHECK(physical_page_size % logical_page_size == 0, "SparsityConfig.logical_page_size ", logical_page_size,
               " must divide physical_page_size ", physical_page_size);
  LSERVE_CHECK(decode_token_budget >= physical_page_size, "SparsityConfig.decode_token_budget ", decode_token_budget,
               " is below one physical page (physical_page_size ", physical_page_size, " tokens)");
  const int min_pages = forced_pages();
  LSERVE_CHECK(decode_token_budget / physical_page_size >= min_pages, "SparsityConfig.decode_token_budget ",
               decode_token_budget, " holds ", decode_token_budget / physical_page_size, " pages of ", physical_page_size,
               " tokens; it needs at least ", min_pages, " (select_recent_tokens ", select_recent_tokens, " -> ",
               recent_pages(), " page(s)", always_select_sink_page ? " and the sink page" : "", ")");
  for (size_t i = 0; i < head_token_budgets.size(); ++i) {
    LSERVE_CHECK(head_token_budgets[i] >= 0, "SparsityConfig.head_token_budgets[", i, "] must be >= 0, got ",
                 head_token_budgets[i]);
  }
}

void SparsityConfig::validate(int num_layers, int num_kv_heads) const {
  if (!enabled) return;
  validate();
  LSERVE_CHECK(streaming_heads.empty() || streaming_heads.size() == static_cast<size_t>(num_layers) * num_kv_heads,
               "SparsityConfig.streaming_heads has ", streaming_heads.size(), " entries, expected num_layers * "
               "num_kv_heads = ", static_cast<int64_t>(num_layers) * num_kv_heads);
  const int64_t entries = static_cast<int64_t>(num_layers) * num_kv_heads;
  LSERVE_CHECK(head_token_budgets.empty() || static_cast<int64_t>(head_token_budgets.size()) == entries,
               "SparsityConfig.head_token_budgets has ", head_token_budgets.size(), " entries, expected num_layers * "
               "num_kv_heads = ", entries);
  const int min_pages = forced_pages();
  for (int64_t i = 0; i < static_cast<int64_t>(head_token_budgets.size()); ++i) {
    if (!streaming_heads.empty() && streaming_heads[static_cast<size_t>(i)] != 0) continue;
    LSERVE_CHECK(head_token_budgets[static_cast<size_t>(i)] >= min_pages * physical_page_size,
                 "SparsityConfig.head_token_budgets: layer ", i / num_kv_heads, " KV head ", i % num_kv_heads, " (dense) has ",
                 head_token_budgets[static_cast<size_t>(i)], " tokens; a dense head needs at least ", min_pages,
                 " pages of ", physical_page_size, " (the recent pages", always_select_sink_page ? " and the sink page" : "",
                 ")");
  }
}

const char* SparsityConfig::layout_difference(const SparsityConfig& other) const {
  if (enabled != other.enabled) return "enabled";
  if (streaming_heads != other.streaming_heads) return "streaming_heads";
  if (prefill_sink_tokens != other.prefill_sink_tokens) return "prefill_sink_tokens";
  if (prefill_local_tokens != other.prefill_local_tokens) return "prefill_local_tokens";
  if (decode_sink_tokens != other.decode_sink_tokens) return "decode_sink_tokens";
  if (decode_local_tokens != other.decode_local_tokens) return "decode_local_tokens";
  if (physical_page_size != other.physical_page_size) return "physical_page_size";
  if (logical_page_size != other.logical_page_size) return "logical_page_size";
  if (dense_below_tokens != other.dense_below_tokens) return "dense_below_tokens";
  return nullptr;
}

}  // namespace lserve
