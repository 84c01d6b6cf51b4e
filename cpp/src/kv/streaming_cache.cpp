// StreamingKvCache: per-sequence slots of sink + ring pages.
#include "lserve/kv/streaming_cache.h"

#include "lserve/check.h"

namespace lserve {

StreamingKvCache::StreamingKvCache(int num_slots, int page_size, int num_sink_pages, int num_ring_pages)
    : page_size_(page_size), num_sink_pages_(num_sink_pages), num_ring_pages_(num_ring_pages) {
  LSERVE_CHECK(num_slots >= 1, "streaming cache: needs at least one slot, got ", num_slots);
  LSERVE_CHECK(page_size >= 1, "streaming cache: page_size must be >= 1, got ", page_size);
  LSERVE_CHECK(num_sink_pages >= 0, "streaming cache: num_sink_pages must be >= 0, got ", num_sink_pages);
  LSERVE_CHECK(num_ring_pages >= 2, "streaming cache: the ring needs at least 2 pages, got ", num_ring_pages);
  owner_.assign(static_cast<size_t>(num_slots), -1);
  for (int s = num_slots - 1; s >= 0; --s) free_slots_.push_back(s);
}

int StreamingKvCache::ring_pages_for(int page_size, int64_t window_tokens, int64_t max_chunk_tokens) {
  LSERVE_CHECK(page_size >= 1 && window_tokens >= 1 && max_chunk_tokens >= 1,
               "streaming cache: page_size, window and chunk must be >= 1");
  // Positions (c0 - window, c1) must sit on distinct ring slots: window + chunk - 1 tokens, which
  // straddle at most ceil((window + chunk - 1) / page_size) + 1 pages.
  return static_cast<int>((window_tokens + max_chunk_tokens - 1 + page_size - 1) / page_size + 1);
}

int StreamingKvCache::acquire(int64_t seq_id) {
  const auto it = slots_.find(seq_id);
  if (it != slots_.end()) return it->second;
  if (free_slots_.empty()) return -1;
  const int slot = free_slots_.back();
  free_slots_.pop_back();
  owner_[static_cast<size_t>(slot)] = seq_id;
  slots_[seq_id] = slot;
  return slot;
}

void StreamingKvCache::release(int64_t seq_id) {
  const auto it = slots_.find(seq_id);
  if (it == slots_.end()) return;
  owner_[static_cast<size_t>(it->second)] = -1;
  free_slots_.push_back(it->second);
  slots_.erase(it);
}

int StreamingKvCache::slot(int64_t seq_id) const {
  const auto it = slots_.find(seq_id);
  LSERVE_CHECK(it != slots_.end(), "streaming cache: sequence ", seq_id, " holds no slot");
  return it->second;
}

int32_t StreamingKvCache::page_of(int slot, int64_t logical_page) const {
  LSERVE_CHECK(slot >= 0 && slot < num_slots(), "streaming cache: slot ", slot, " outside [0, ", num_slots(), ")");
  LSERVE_CHECK(logical_page >= 0, "streaming cache: negative logical page ", logical_page);
  const int64_t base = static_cast<int64_t>(slot) * pages_per_slot();
  if (logical_page < num_sink_pages_) return static_cast<int32_t>(base + logical_page);
  return static_cast<int32_t>(base + num_sink_pages_ + (logical_page - num_sink_pages_) % num_ring_pages_);
}

int64_t StreamingKvCache::token_slot(int slot, int64_t position) const {
  return static_cast<int64_t>(page_of(slot, position / page_size_)) * page_size_ + position % page_size_;
}

void StreamingKvCache::append_page_table(int slot, int64_t num_logical_pages, std::vector<int32_t>* out) const {
  for (int64_t lp = 0; lp < num_logical_pages; ++lp) out->push_back(page_of(slot, lp));
}

}  // namespace lserve
