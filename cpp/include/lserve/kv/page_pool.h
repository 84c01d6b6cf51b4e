// PagePool: a fixed pool of KV pages with reference counts (a page shared by several sequences,
// e.g. a common prefix, is freed when its last owner lets go). KvCacheManager: per-sequence page
// tables on top of the pool, sized in tokens, and automatic prefix caching. Neither touches device
// memory: they hand out page indices into the per-layer caches the Engine allocates.
// References: nano-vLLM's block_manager; vLLM V1's KV cache manager (hashed full blocks, a free
// queue that keeps cached blocks until they are needed).
//
// Prefix caching. A full page is named by a hash chained over (its parent page's hash, its token
// ids), seeded with a salt that stands for everything else that changes the page's K/V (model,
// dtypes, attention settings). Pages become cached once their tokens' K/V are computed
// (cache_full_pages); a new sequence maps the longest cached run of its prompt's full pages into its
// table (match_prefix), taking a reference on each. A cached page whose last owner lets go stays in
// the pool, unreferenced and evictable, least recently released first, until allocate() needs it.
// A hit is verified token by token (and by parent hash), so a hash collision is a miss, never a
// wrong page.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace lserve {

class PagePool {
 public:
  explicit PagePool(int num_pages);

  int num_pages() const { return static_cast<int>(refcounts_.size()); }
  // Pages allocate() can hand out: never used or released uncached, plus cached but unreferenced.
  int num_free() const { return static_cast<int>(free_list_.size()) + num_evictable_; }
  // A free page with reference count 1, or -1 when none is left. Uncached free pages go first
  // (most recently freed first); then the least recently released cached page, which leaves the cache.
  int allocate();
  // Adds an owner. A cached page without owners is taken back from the evictable set.
  void incref(int page_idx);
  // Drops one reference; at zero the page returns to the free list, or (cached) to the evictable set.
  void decref(int page_idx);
  int refcount(int page_idx) const;

  // The cache index. cache: names an owned page `hash`; false (nothing changes) when another page
  // has that name already. lookup: the page named `hash`, or -1. uncache_all: forgets every name
  // (unreferenced cached pages become ordinary free pages).
  bool cache(int page_idx, uint64_t hash);
  int lookup(uint64_t hash) const;
  bool is_cached(int page_idx) const;
  void uncache_all();
  int num_cached() const { return static_cast<int>(index_.size()); }
  int num_evictable() const { return num_evictable_; }
  int64_t num_evictions() const { return num_evictions_; }

 private:
  void check_page(int page_idx) const;
  void lru_remove(int page_idx);
  void lru_push_back(int page_idx);
  std::vector<int> refcounts_;
  std::vector<int> free_list_;  // LIFO: recently freed pages are reused first
  // Cached pages: name per page, name -> page, and the unreferenced ones as an intrusive list in
  // release order (head: least recent, evicted first).
  std::vector<uint64_t> hash_;
  std::vector<char> cached_;
  std::unordered_map<uint64_t, int> index_;
  std::vector<int> lru_prev_, lru_next_;
  int lru_head_ = -1, lru_tail_ = -1, num_evictable_ = 0;
  int64_t num_evictions_ = 0;
};

// A sequence's tokens as two runs (prompt, then generated), without copying them.
struct TokenRuns {
  const int32_t* first = nullptr;
  int64_t num_first = 0;
  const int32_t* second = nullptr;
  int64_t num_second = 0;

  int64_t size() const { return num_first + num_second; }
  int32_t operator[](int64_t i) const { return i < num_first ? first[i] : second[i - num_first]; }
};

class KvCacheManager {
 public:
  // prefix_cache_salt: the hash chain's seed; prefix caching is on when enable_prefix_caching.
  KvCacheManager(int num_pages, int page_size, bool enable_prefix_caching = false, uint64_t prefix_cache_salt = 0);

  int page_size() const { return page_size_; }
  int num_total_pages() const { return pool_.num_pages(); }
  int num_free_pages() const { return pool_.num_free(); }
  const PagePool& pool() const { return pool_; }
  bool prefix_caching() const { return prefix_caching_; }

  // Pages seq_id still needs so that it holds num_tokens tokens (0 if it has them).
  int pages_needed(int64_t seq_id, int64_t num_tokens) const;
  // Grows seq_id's page table to hold num_tokens tokens. Returns false and changes nothing
  // when the pool has too few free pages.
  bool reserve(int64_t seq_id, int64_t num_tokens);
  // Makes dst share src's first num_tokens tokens' pages (dst must not exist yet); whole pages only.
  void fork(int64_t src_seq_id, int64_t dst_seq_id, int64_t num_tokens);
  // Releases every page of seq_id (no-op for an unknown sequence).
  void release(int64_t seq_id);

  // Prefix caching (no-ops returning 0 when it is off). match_prefix: a new sequence (no table yet)
  // takes the longest cached run of full pages of tokens[0, max_tokens); returns the tokens mapped
  // (a multiple of page_size; 0 leaves no table). cache_full_pages: names seq_id's pages that its
  // first num_computed tokens fill completely (their K/V written), from where it left off.
  // reset_prefix_cache: forgets every cached page (pages in use stay with their owners).
  int64_t match_prefix(int64_t seq_id, const TokenRuns& tokens, int64_t max_tokens);
  void cache_full_pages(int64_t seq_id, const TokenRuns& tokens, int64_t num_computed);
  void reset_prefix_cache();

  bool has(int64_t seq_id) const { return tables_.count(seq_id) != 0; }
  // seq_id's pages in token order (empty for an unknown sequence).
  const std::vector<int32_t>& pages(int64_t seq_id) const;
  // Cache slot of token `position` of seq_id: page_idx * page_size + position % page_size.
  int64_t slot(int64_t seq_id, int64_t position) const;
  int64_t num_seqs() const { return static_cast<int64_t>(tables_.size()); }

 private:
  uint64_t page_hash(uint64_t parent, const TokenRuns& tokens, int64_t page) const;
  bool page_matches(int page_idx, uint64_t parent, const TokenRuns& tokens, int64_t page) const;

  PagePool pool_;
  int page_size_;
  bool prefix_caching_;
  uint64_t salt_;
  std::unordered_map<int64_t, std::vector<int32_t>> tables_;
  // Prefix caching: per sequence, the names of its leading full pages named so far (the chain);
  // per cached page, its parent's name and its tokens, to verify a hit.
  std::unordered_map<int64_t, std::vector<uint64_t>> chains_;
  std::vector<uint64_t> page_parent_;
  std::vector<int32_t> page_tokens_;
};

}  // namespace lserve
