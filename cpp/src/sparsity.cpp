// SparsityConfig::validate.
#include "lserve/sparsity.h"

#include "lserve/check.h"

namespace lserve {

void SparsityConfig::validate(int num_layers, int num_kv_heads) const {
  if (!enabled) return;
  LSERVE_CHECK(streaming_heads.empty() || streaming_heads.size() == static_cast<size_t>(num_layers) * num_kv_heads,
               "sparsity: streaming_heads has ", streaming_heads.size(), " entries, expected num_layers * "
               "num_kv_heads = ", static_cast<int64_t>(num_layers) * num_kv_heads);
  LSERVE_CHECK(logical_page_size >= 1, "sparsity: logical_page_size must be >= 1, got ", logical_page_size);
  LSERVE_CHECK(physical_page_size >= logical_page_size && physical_page_size % logical_page_size == 0,
               "sparsity: logical_page_size ", logical_page_size, " must divide physical_page_size ",
               physical_page_size);
  LSERVE_CHECK(decode_token_budget >= physical_page_size, "sparsity: decode_token_budget ", decode_token_budget,
               " is below one physical page (", physical_page_size, " tokens)");
  LSERVE_CHECK(selection_reuse_interval >= 1, "sparsity: selection_reuse_interval must be >= 1, got ",
               selection_reuse_interval);
  LSERVE_CHECK(prefill_sink_tokens >= 0 && decode_sink_tokens >= 0, "sparsity: sink token counts must be >= 0");
  LSERVE_CHECK(prefill_local_tokens >= 1 && decode_local_tokens >= 1, "sparsity: local windows must be >= 1 token");
  LSERVE_CHECK(dense_below_tokens >= 0, "sparsity: dense_below_tokens must be >= 0, got ", dense_below_tokens);
}

}  // namespace lserve
