// PagePool: a fixed pool of KV pages with reference counts (a page shared by several sequences,
// e.g. a common prefix, is freed when its last owner lets go). KvCacheManager: per-sequence page
// tables on top of the pool, sized in tokens. Neither touches device memory: they hand out page
// indices into the per-layer caches the Engine allocates. Reference: nano-vLLM's block_manager.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace lserve {

class PagePool {
 public:
  explicit PagePool(int num_pages);

  int num_pages() const { return static_cast<int>(refcounts_.size()); }
  int num_free() const { return static_cast<int>(free_list_.size()); }
  // A free page with reference count 1, or -1 when none is left.
  int allocate();
  void incref(int page_idx);
  // Drops one reference; the page returns to the free list at zero.
  void decref(int page_idx);
  int refcount(int page_idx) const;

 private:
  void check_page(int page_idx) const;
  std::vector<int> refcounts_;
  std::vector<int> free_list_;  // LIFO: recently freed pages are reused first
};

class KvCacheManager {
 public:
  KvCacheManager(int num_pages, int page_size);

  int page_size() const { return page_size_; }
  int num_total_pages() const { return pool_.num_pages(); }
  int num_free_pages() const { return pool_.num_free(); }
  const PagePool& pool() const { return pool_; }

  // Pages seq_id still needs so that it holds num_tokens tokens (0 if it has them).
  int pages_needed(int64_t seq_id, int64_t num_tokens) const;
  // Grows seq_id's page table to hold num_tokens tokens. Returns false and changes nothing
  // when the pool has too few free pages.
  bool reserve(int64_t seq_id, int64_t num_tokens);
  // Makes dst share src's first num_tokens tokens' pages (dst must not exist yet); whole pages only.
  void fork(int64_t src_seq_id, int64_t dst_seq_id, int64_t num_tokens);
  // Releases every page of seq_id (no-op for an unknown sequence).
  void release(int64_t seq_id);

  bool has(int64_t seq_id) const { return tables_.count(seq_id) != 0; }
  // seq_id's pages in token order (empty for an unknown sequence).
  const std::vector<int32_t>& pages(int64_t seq_id) const;
  // Cache slot of token `position` of seq_id: page_idx * page_size + position % page_size.
  int64_t slot(int64_t seq_id, int64_t position) const;
  int64_t num_seqs() const { return static_cast<int64_t>(tables_.size()); }

 private:
  PagePool pool_;
  int page_size_;
  std::unordered_map<int64_t, std::vector<int32_t>> tables_;
};

}  // namespace lserve
