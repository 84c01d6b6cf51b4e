// StreamingKvCache: constant-memory KV storage for LServe's streaming heads.
//
// A sequence admitted to the engine takes one slot. Slot s owns the contiguous pages
// [s * pages_per_slot, (s + 1) * pages_per_slot): num_sink_pages sink pages, then a ring of
// num_ring_pages local pages. Token position p lies on logical page lp = p / page_size, stored on
// sink page lp when lp < num_sink_pages and otherwise on ring page (lp - num_sink_pages) mod
// num_ring_pages, which later tokens overwrite once the window has moved past it. Attention over
// streaming heads reads only sink and window tokens (the Lambda mask), so evicted tokens are never
// read. The ring holds every token a query of one prefill chunk can see:
// ring_pages_for(page_size, window, chunk) = ceil((window + chunk) / page_size) + 1.
//
// Memory per sequence is pages_per_slot pages whatever the context length.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace lserve {

class StreamingKvCache {
 public:
  StreamingKvCache(int num_slots, int page_size, int num_sink_pages, int num_ring_pages);

  // Ring pages needed so that a chunk of max_chunk_tokens queries, each seeing window_tokens
  // tokens back, never reads a page the chunk itself overwrote.
  static int ring_pages_for(int page_size, int64_t window_tokens, int64_t max_chunk_tokens);

  int num_slots() const { return static_cast<int>(owner_.size()); }
  int num_free_slots() const { return static_cast<int>(free_slots_.size()); }
  int page_size() const { return page_size_; }
  int num_sink_pages() const { return num_sink_pages_; }
  int num_ring_pages() const { return num_ring_pages_; }
  int pages_per_slot() const { return num_sink_pages_ + num_ring_pages_; }
  int num_pages() const { return num_slots() * pages_per_slot(); }

  // Takes a free slot for seq_id (its current one if it holds one); -1 when none is free.
  int acquire(int64_t seq_id);
  // Frees seq_id's slot (no-op for an unknown sequence).
  void release(int64_t seq_id);
  bool has(int64_t seq_id) const { return slots_.count(seq_id) != 0; }
  // seq_id's slot; raises lserve::Error for a sequence without one.
  int slot(int64_t seq_id) const;

  // Physical page holding logical page `logical_page` of the sequence in `slot`.
  int32_t page_of(int slot, int64_t logical_page) const;
  // Cache slot (page * page_size + offset) of token `position`.
  int64_t token_slot(int slot, int64_t position) const;
  // Appends the physical pages of logical pages [0, num_logical_pages) to `out`; evicted logical
  // pages map to the ring page that now holds later tokens (never read by the Lambda mask).
  void append_page_table(int slot, int64_t num_logical_pages, std::vector<int32_t>* out) const;

 private:
  int page_size_;
  int num_sink_pages_;
  int num_ring_pages_;
  std::vector<int64_t> owner_;   // per slot: owning seq_id or -1
  std::vector<int> free_slots_;  // LIFO
  std::unordered_map<int64_t, int> slots_;
};

}  // namespace lserve
