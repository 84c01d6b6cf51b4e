// PageSelector: streaming-head memory tiers, the selection store, the reuse policy and the step plan.
#include "lserve/kv/page_selector.h"

#include <algorithm>

#include "lserve/check.h"
#include "lserve/ops/attention.h"
#include "lserve/ops/page_select.h"

namespace lserve {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pages a ring needs so that queries of a chunk of max_chunk_tokens, each seeing window_tokens back,
// never read a page the chunk itself overwrote: positions (c0 - window, c1) on distinct pages, i.e.
// window + chunk - 1 tokens, which straddle at most ceil((window + chunk - 1) / page_size) + 1 pages.
int ring_pages_for(int page_size, int64_t window_tokens, int64_t max_chunk_tokens) {
  return static_cast<int>(ceil_div(window_tokens + max_chunk_tokens - 1, page_size) + 1);
}

}  // namespace

void SparsePlan::clear() {
  stream_slot_mapping.clear();
  stream_mirror_mapping.clear();
  stream_ring.clear();
  window_sink.clear();
  window_local.clear();
  select_mode.clear();
  select_slot.clear();
  select_base.clear();
  pages_read_per_head = 0;
  pages_total_per_head = 0;
}

void SparsePlan::reserve(int64_t max_tokens, int64_t max_seqs) {
  stream_slot_mapping.reserve(static_cast<size_t>(max_tokens));
  stream_mirror_mapping.reserve(static_cast<size_t>(max_tokens));
  stream_ring.reserve(static_cast<size_t>(4 * max_seqs));
  for (auto* v : {&window_sink, &window_local, &select_mode, &select_slot, &select_base}) {
    v->reserve(static_cast<size_t>(max_seqs));
  }
}

PageSelector::PageSelector(const SparsityConfig& sparsity, int page_size, int max_num_seqs, int max_num_batched_tokens,
                           int max_model_len)
    : sparsity_(sparsity),
      page_size_(page_size),
      max_num_seqs_(max_num_seqs),
      max_num_batched_tokens_(max_num_batched_tokens),
      max_model_len_(max_model_len) {
  LSERVE_CHECK(sparsity.enabled, "PageSelector: sparsity is off");
  LSERVE_CHECK(page_size >= 1 && max_num_seqs >= 1 && max_num_batched_tokens >= 1 && max_model_len >= 1,
               "PageSelector: page_size, max_num_seqs, max_num_batched_tokens and max_model_len must be >= 1");
  num_sink_pages_ = static_cast<int>(
      ceil_div(std::max(sparsity.prefill_sink_tokens, sparsity.decode_sink_tokens), page_size));
  decode_ring_pages_ = ring_pages_for(page_size, sparsity.decode_local_tokens, 1);
  // A prefill ring never needs more pages than the longest sequence has past its sinks.
  const int64_t max_pages = ceil_div(max_model_len, page_size);
  prefill_ring_pages_ = static_cast<int>(std::max<int64_t>(
      2, std::min<int64_t>(ring_pages_for(page_size, sparsity.prefill_local_tokens, max_num_batched_tokens),
                           max_pages - num_sink_pages_)));
  size_selection();
}

void PageSelector::size_selection() {
  // The smallest dense-head budget, and the mean over dense heads (what a step's statistics count).
  num_select_ = sparsity_.head_budget_pages(0);
  if (!sparsity_.head_token_budgets.empty()) {
    int64_t sum = 0, count = 0;
    for (size_t i = 0; i < sparsity_.head_token_budgets.size(); ++i) {
      if (!sparsity_.streaming_heads.empty() && sparsity_.streaming_heads[i] != 0) continue;
      const int pages = sparsity_.head_budget_pages(static_cast<int64_t>(i));
      num_select_ = count == 0 ? pages : std::min(num_select_, pages);
      sum += pages;
      ++count;
    }
    mean_select_ = count == 0 ? num_select_ : static_cast<int>((sum + count / 2) / count);
  } else {
    mean_select_ = num_select_;
  }
}

void PageSelector::set_decode_settings(const SparsityConfig& sparsity, Backend& backend,
                                       const std::vector<int>& num_dense_kv_heads) {
  const char* differs = sparsity_.layout_difference(sparsity);
  LSERVE_CHECK(differs == nullptr, "PageSelector::set_decode_settings: SparsityConfig.", differs ? differs : "",
               " differs; only the decode-time selection settings may change");
  LSERVE_CHECK(seqs_.empty(), "PageSelector::set_decode_settings with ", seqs_.size(), " sequence(s) holding slots");
  const SparsityConfig previous = sparsity_;
  sparsity_ = sparsity;
  size_selection();
  try {
    allocate_store(backend, num_dense_kv_heads);  // all or nothing
  } catch (...) {
    sparsity_ = previous;
    size_selection();
    throw;
  }
}

int64_t PageSelector::size_memory(int64_t budget, int64_t stream_bytes_per_token, int64_t dense_bytes_per_token) {
  LSERVE_CHECK(num_slots_ == 0, "PageSelector::size_memory called twice");
  slot_bytes_ = static_cast<int64_t>(slot_pages()) * page_size_ * stream_bytes_per_token;
  prefill_ring_bytes_ = static_cast<int64_t>(prefill_ring_pages_) * page_size_ * stream_bytes_per_token;
  // One prefill ring: a prompt longer than the decode slot prefills in chunks of the step's whole
  // token budget, so a second one would rarely get tokens in the same step; shorter prompts need none.
  const bool rings_needed = std::max<int64_t>(max_model_len_, sparsity_.dense_below_tokens) > decode_slot_tokens();
  num_prefill_rings_ = rings_needed ? 1 : 0;
  const int64_t remaining = budget - num_prefill_rings_ * prefill_ring_bytes_;
  const int64_t reference_tokens = ceil_div(std::max(1, max_model_len_ / 2), page_size_) * page_size_;
  const int64_t per_seq = slot_bytes_ + dense_bytes_per_token * reference_tokens;
  int64_t slots = max_num_seqs_;
  if (per_seq > 0) slots = std::clamp<int64_t>(remaining / per_seq, 1, max_num_seqs_);
  num_slots_ = static_cast<int>(slots);
  free_slots_.clear();
  for (int s = num_slots_ - 1; s >= 0; --s) free_slots_.push_back(s);
  free_rings_.clear();
  for (int r = num_prefill_rings_ - 1; r >= 0; --r) free_rings_.push_back(r);
  return num_prefill_rings_ * prefill_ring_bytes_ + num_slots_ * slot_bytes_;
}

void PageSelector::set_shadow_pages(int num_shadow_pages) {
  LSERVE_CHECK(num_shadow_pages >= 0, "PageSelector: shadow pages must be >= 0, got ", num_shadow_pages);
  LSERVE_CHECK(store_.empty(), "PageSelector::set_shadow_pages after allocate_store");
  num_shadow_pages_ = num_shadow_pages;
  shadow_name_.assign(static_cast<size_t>(num_shadow_pages), 0);
  shadow_used_.assign(static_cast<size_t>(num_shadow_pages), 0);
  shadow_of_.clear();
  shadow_lru_.clear();
  shadow_pos_.clear();
  for (int shadow = 0; shadow < num_shadow_pages; ++shadow) {
    shadow_pos_.push_back(shadow_lru_.insert(shadow_lru_.end(), shadow));
  }
}

int PageSelector::prefill_restore_pages() const {
  return static_cast<int>(
      std::min<int64_t>(ceil_div(sparsity_.prefill_local_tokens, page_size_), prefill_ring_pages_ - 1));
}

int PageSelector::restore_window_pages() const { return std::max(prefill_restore_pages(), decode_ring_pages_); }

void PageSelector::rings_of(const SeqState& state, int32_t decode_ring[4], int32_t ring[4]) const {
  const int32_t slot_base = state.slot * slot_pages();
  decode_ring[0] = ring[0] = slot_base;
  decode_ring[1] = ring[1] = num_sink_pages_;
  decode_ring[2] = ring[2] = slot_base + num_sink_pages_;
  decode_ring[3] = ring[3] = decode_ring_pages_;
  if (state.prefill_ring >= 0) {
    ring[2] = num_slots_ * slot_pages() + state.prefill_ring * prefill_ring_pages_;
    ring[3] = prefill_ring_pages_;
  }
}

void PageSelector::touch_shadow(int shadow) {
  shadow_lru_.splice(shadow_lru_.end(), shadow_lru_, shadow_pos_[static_cast<size_t>(shadow)]);
}

int PageSelector::find_shadow(uint64_t name) const {
  const auto it = shadow_of_.find(name);
  return it == shadow_of_.end() ? -1 : it->second;
}

int PageSelector::usable_prefix_pages(const std::vector<uint64_t>& names) const {
  if (num_shadow_pages_ == 0) return 0;
  const int num = static_cast<int>(names.size());
  int sinks_ok = 0;  // leading pages (up to the sink pages) with shadows
  while (sinks_ok < std::min(num, num_sink_pages_) && find_shadow(names[static_cast<size_t>(sinks_ok)]) >= 0) ++sinks_ok;
  for (int k = num; k > 0; --k) {
    if (sinks_ok < std::min(k, num_sink_pages_)) continue;
    bool ok = true;
    for (int lp = std::max(num_sink_pages_, k - restore_window_pages()); lp < k && ok; ++lp) {
      ok = find_shadow(names[static_cast<size_t>(lp)]) >= 0;
    }
    if (ok) return k;
  }
  return 0;
}

std::pair<int, int> PageSelector::shadow_page_for(int64_t seq_id, int64_t logical_page, uint64_t name,
                                                  const std::vector<uint64_t>& chain) {
  if (num_shadow_pages_ == 0) return {-1, -1};
  for (size_t lp = 0; lp < std::min<size_t>(chain.size(), num_sink_pages_); ++lp) {
    const int shadow = find_shadow(chain[lp]);
    if (shadow >= 0) touch_shadow(shadow);
  }
  if (find_shadow(name) >= 0) {
    touch_shadow(find_shadow(name));
    return {-1, -1};
  }
  const auto it = seqs_.find(seq_id);
  LSERVE_CHECK(it != seqs_.end(), "page selector: sequence ", seq_id, " named a page without a slot");
  int32_t decode_ring[4], ring[4];
  rings_of(it->second, decode_ring, ring);
  const int shadow = shadow_lru_.front();  // least recently used: recycled
  if (shadow_used_[static_cast<size_t>(shadow)]) shadow_of_.erase(shadow_name_[static_cast<size_t>(shadow)]);
  shadow_name_[static_cast<size_t>(shadow)] = name;
  shadow_used_[static_cast<size_t>(shadow)] = 1;
  shadow_of_[name] = shadow;
  touch_shadow(shadow);
  return {static_cast<int>(stream_ring_page(ring, logical_page)), shadow_base() + shadow};
}

std::vector<std::pair<int, int>> PageSelector::restore_copies(int64_t seq_id, const std::vector<uint64_t>& names,
                                                              int64_t num_pages) {
  const auto it = seqs_.find(seq_id);
  LSERVE_CHECK(it != seqs_.end(), "page selector: restore for sequence ", seq_id, ", which holds no slot");
  int32_t decode_ring[4], ring[4];
  rings_of(it->second, decode_ring, ring);
  std::vector<std::pair<int, int>> copies;
  auto shadow_of = [&](int64_t lp) {
    const int shadow = find_shadow(names[static_cast<size_t>(lp)]);
    LSERVE_CHECK(shadow >= 0, "page selector: restore of logical page ", lp, " of sequence ", seq_id,
                 " without its shadow (usable_prefix_pages cut the hit wrongly)");
    touch_shadow(shadow);
    return shadow_base() + shadow;
  };
  const int64_t num_sinks = std::min<int64_t>(num_sink_pages_, num_pages);
  for (int64_t lp = 0; lp < num_sinks; ++lp) copies.emplace_back(shadow_of(lp), static_cast<int>(stream_ring_page(decode_ring, lp)));
  for (int64_t lp = std::max<int64_t>(num_sink_pages_, num_pages - decode_ring_pages_); lp < num_pages; ++lp) {
    copies.emplace_back(shadow_of(lp), static_cast<int>(stream_ring_page(decode_ring, lp)));
  }
  if (it->second.prefill_ring >= 0) {
    for (int64_t lp = std::max<int64_t>(num_sink_pages_, num_pages - prefill_restore_pages()); lp < num_pages; ++lp) {
      copies.emplace_back(shadow_of(lp), static_cast<int>(stream_ring_page(ring, lp)));
    }
  }
  return copies;
}

void PageSelector::allocate_store(Backend& backend, const std::vector<int>& num_dense_kv_heads) {
  LSERVE_CHECK(num_slots_ > 0, "PageSelector::allocate_store before size_memory");
  // Built aside and swapped in whole: a failure leaves the store as it was.
  std::vector<Store> stores(num_dense_kv_heads.size());
  for (size_t layer = 0; layer < num_dense_kv_heads.size(); ++layer) {
    const int64_t nd = num_dense_kv_heads[layer];
    if (nd == 0) continue;
    Store& store = stores[layer];
    // Per-head budgets: the layer's dense heads (ascending KV head index, the model's order) and
    // the store as wide as its largest.
    int width = num_select_;
    if (!sparsity_.head_token_budgets.empty()) {
      const int64_t num_kv = sparsity_.streaming_heads.empty()
                                 ? nd
                                 : static_cast<int64_t>(sparsity_.streaming_heads.size() / num_dense_kv_heads.size());
      std::vector<int32_t> pages;
      for (int64_t h = 0; h < num_kv; ++h) {
        const int64_t entry = static_cast<int64_t>(layer) * num_kv + h;
        if (!sparsity_.streaming_heads.empty() && sparsity_.streaming_heads[static_cast<size_t>(entry)] != 0) continue;
        pages.push_back(sparsity_.head_budget_pages(entry));
      }
      LSERVE_CHECK(static_cast<int64_t>(pages.size()) == nd, "page selector: layer ", layer, " has ", nd,
                   " dense KV heads, its streaming flags say ", pages.size());
      width = *std::max_element(pages.begin(), pages.end());
      store.head_select = backend.empty({nd}, DType::kI32);
      backend.copy(store.head_select, TensorView(pages.data(), DType::kI32, {nd}));
      backend.synchronize();  // before `pages` goes
    }
    store.selection = backend.empty({num_slots_, nd, width}, DType::kI32);
    backend.fill_zero(store.selection);
    store.count = backend.empty({num_slots_, nd}, DType::kI32);
    std::vector<int32_t> none(static_cast<size_t>(num_slots_ * nd), -1);
    backend.copy(store.count, TensorView(none.data(), DType::kI32, {num_slots_, nd}));
  }
  backend.synchronize();
  store_ = std::move(stores);
}

bool PageSelector::acquire(int64_t seq_id, int64_t prefill_tokens) {
  if (seqs_.count(seq_id) != 0) return true;
  const bool needs_ring = std::max<int64_t>(prefill_tokens, sparsity_.dense_below_tokens) > decode_slot_tokens();
  if (free_slots_.empty() || (needs_ring && free_rings_.empty())) return false;
  SeqState state;
  state.slot = free_slots_.back();
  free_slots_.pop_back();
  if (needs_ring) {
    state.prefill_ring = free_rings_.back();
    free_rings_.pop_back();
  }
  seqs_[seq_id] = state;
  return true;
}

bool PageSelector::fork(int64_t src_seq_id, int64_t dst_seq_id) {
  const auto src = seqs_.find(src_seq_id);
  LSERVE_CHECK(src != seqs_.end(), "page selector: fork of sequence ", src_seq_id, ", which holds no slot");
  LSERVE_CHECK(seqs_.count(dst_seq_id) == 0, "page selector: fork onto sequence ", dst_seq_id, ", which holds a slot");
  // A source still on a prefill ring (its context below dense_below_tokens) keeps its streaming keys
  // there, not in its slot alone: no fork.
  if (free_slots_.empty() || src->second.prefill_ring >= 0 || src->second.ends_prefill) return false;
  SeqState state = src->second;
  state.slot = free_slots_.back();
  free_slots_.pop_back();
  state.steps = 0;
  state.base_pages = 0;
  seqs_[dst_seq_id] = state;
  return true;
}

void PageSelector::release(int64_t seq_id) {
  const auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return;
  free_slots_.push_back(it->second.slot);
  if (it->second.prefill_ring >= 0) free_rings_.push_back(it->second.prefill_ring);
  seqs_.erase(it);
}

int PageSelector::slot_of(int64_t seq_id) const {
  const auto it = seqs_.find(seq_id);
  LSERVE_CHECK(it != seqs_.end(), "page selector: sequence ", seq_id, " holds no slot");
  return it->second.slot;
}

void PageSelector::plan_chunk(int64_t seq_id, int64_t start_position, int64_t num_new_tokens, int64_t num_pages,
                              bool samples, SparsePlan* plan) {
  const auto it = seqs_.find(seq_id);
  LSERVE_CHECK(it != seqs_.end(), "page selector: sequence ", seq_id, " was scheduled without a slot");
  SeqState& state = it->second;
  const int64_t end_position = start_position + num_new_tokens;
  LSERVE_CHECK(!state.decoding || num_new_tokens == 1, "page selector: sequence ", seq_id, " decodes ",
               num_new_tokens, " tokens in one step");

  // Where its streaming heads' keys live this step.
  int32_t decode_ring[4], ring[4];
  rings_of(state, decode_ring, ring);
  plan->stream_ring.insert(plan->stream_ring.end(), ring, ring + 4);
  const int64_t sink_end = static_cast<int64_t>(num_sink_pages_) * page_size_;
  const int64_t mirror_from = std::max(sink_end, end_position - static_cast<int64_t>(decode_ring_pages_) * page_size_);
  for (int64_t position = start_position; position < end_position; ++position) {
    const int64_t in_page = position % page_size_;
    plan->stream_slot_mapping.push_back(stream_ring_page(ring, position / page_size_) * page_size_ + in_page);
    int64_t mirror = -1;
    if (state.prefill_ring >= 0 && position >= mirror_from) {
      mirror = stream_ring_page(decode_ring, position / page_size_) * page_size_ + in_page;
    }
    plan->stream_mirror_mapping.push_back(mirror);
  }
  plan->window_sink.push_back(state.decoding ? sparsity_.decode_sink_tokens : sparsity_.prefill_sink_tokens);
  plan->window_local.push_back(state.decoding ? sparsity_.decode_local_tokens : sparsity_.prefill_local_tokens);

  // Dense heads: every page while prefilling or within the budget; past it a fresh selection every
  // selection_reuse_interval steps, the stored one in between.
  int32_t mode = kSelectDense, slot = -1, base = static_cast<int32_t>(num_pages);
  int64_t pages_read = num_pages;
  if (!state.decoding) {
    state.steps = 0;
  } else if (num_pages > num_select_) {
    slot = state.slot;
    if (state.steps == 0 || state.steps >= sparsity_.selection_reuse_interval) {
      state.steps = 1;
      state.base_pages = static_cast<int32_t>(num_pages);
      mode = kSelectFresh;
    } else {
      ++state.steps;
      mode = kSelectReuse;
      base = state.base_pages;
    }
    pages_read = std::min<int64_t>(mean_select_, base) + num_pages - base;
  }
  plan->select_mode.push_back(mode);
  plan->select_slot.push_back(slot);
  plan->select_base.push_back(base);
  plan->pages_read_per_head += pages_read;
  plan->pages_total_per_head += num_pages;

  state.ends_prefill = !state.decoding && samples;
  state.next_position = end_position;
  planned_.push_back(seq_id);
}

void PageSelector::commit() {
  for (const int64_t seq_id : planned_) {
    const auto it = seqs_.find(seq_id);
    if (it == seqs_.end()) continue;  // released meanwhile
    SeqState& state = it->second;
    // The next step's query sits at next_position, with a context of next_position + 1 tokens.
    if (state.ends_prefill && state.next_position + 1 >= sparsity_.dense_below_tokens) {
      state.decoding = true;
      if (state.prefill_ring >= 0) {
        free_rings_.push_back(state.prefill_ring);
        state.prefill_ring = -1;
      }
    }
    state.ends_prefill = false;
  }
  planned_.clear();
}

}  // namespace lserve
