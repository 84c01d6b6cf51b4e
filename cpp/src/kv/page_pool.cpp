// PagePool (reference-counted pages, LIFO free list, an evictable set of cached pages) and
// KvCacheManager (per-sequence page tables sized in tokens, prefix caching). Contract:
// cpp/include/lserve/kv/page_pool.h. Every operation either succeeds whole or changes nothing;
// tests/kv/test_page_pool.py and tests/kv/test_prefix_cache.py check this against Python models.
#include "lserve/kv/page_pool.h"

#include <algorithm>
#include <limits>

#include "lserve/check.h"

namespace lserve {

// ---- PagePool -----------------------------------------------------------------------------------

PagePool::PagePool(int num_pages) {
  LSERVE_CHECK(num_pages >= 1, "PagePool: num_pages must be >= 1, got ", num_pages);
  refcounts_.assign(static_cast<size_t>(num_pages), 0);
  hash_.assign(static_cast<size_t>(num_pages), 0);
  cached_.assign(static_cast<size_t>(num_pages), 0);
  lru_prev_.assign(static_cast<size_t>(num_pages), -1);
  lru_next_.assign(static_cast<size_t>(num_pages), -1);
  // Pushed in reverse so that a fresh pool hands out pages 0, 1, 2, ... in order.
  free_list_.reserve(static_cast<size_t>(num_pages));
  for (int page_idx = num_pages - 1; page_idx >= 0; --page_idx) free_list_.push_back(page_idx);
}

void PagePool::check_page(int page_idx) const {
  LSERVE_CHECK(page_idx >= 0 && page_idx < num_pages(), "PagePool: page index ", page_idx,
               " out of range [0, ", num_pages(), ")");
}

void PagePool::lru_remove(int page_idx) {
  const int prev = lru_prev_[page_idx], next = lru_next_[page_idx];
  (prev >= 0 ? lru_next_[prev] : lru_head_) = next;
  (next >= 0 ? lru_prev_[next] : lru_tail_) = prev;
  lru_prev_[page_idx] = lru_next_[page_idx] = -1;
  --num_evictable_;
}

void PagePool::lru_push_back(int page_idx) {
  lru_prev_[page_idx] = lru_tail_;
  lru_next_[page_idx] = -1;
  (lru_tail_ >= 0 ? lru_next_[lru_tail_] : lru_head_) = page_idx;
  lru_tail_ = page_idx;
  ++num_evictable_;
}

int PagePool::allocate() {
  int page_idx = -1;
  if (!free_list_.empty()) {
    page_idx = free_list_.back();
    free_list_.pop_back();
  } else if (lru_head_ >= 0) {  // evict the least recently released cached page
    page_idx = lru_head_;
    lru_remove(page_idx);
    index_.erase(hash_[page_idx]);
    cached_[page_idx] = 0;
    ++num_evictions_;
  } else {
    return -1;
  }
  refcounts_[page_idx] = 1;
  return page_idx;
}

void PagePool::incref(int page_idx) {
  check_page(page_idx);
  if (refcounts_[page_idx] == 0 && cached_[page_idx]) {  // a cache hit on an unreferenced page
    lru_remove(page_idx);
    refcounts_[page_idx] = 1;
    return;
  }
  LSERVE_CHECK(refcounts_[page_idx] > 0, "PagePool: incref of free page ", page_idx,
               " (only an allocated or cached page can gain owners)");
  ++refcounts_[page_idx];
}

void PagePool::decref(int page_idx) {
  check_page(page_idx);
  LSERVE_CHECK(refcounts_[page_idx] > 0, "PagePool: decref of free page ", page_idx,
               " (double free?)");
  if (--refcounts_[page_idx] > 0) return;
  if (cached_[page_idx]) {
    lru_push_back(page_idx);
  } else {
    free_list_.push_back(page_idx);
  }
}

bool PagePool::cache(int page_idx, uint64_t hash) {
  check_page(page_idx);
  LSERVE_CHECK(refcounts_[page_idx] > 0, "PagePool: cache of free page ", page_idx, " (only an owned page is cached)");
  if (cached_[page_idx] || index_.count(hash) != 0) return false;
  index_.emplace(hash, page_idx);
  hash_[page_idx] = hash;
  cached_[page_idx] = 1;
  return true;
}

int PagePool::lookup(uint64_t hash) const {
  const auto it = index_.find(hash);
  return it == index_.end() ? -1 : it->second;
}

bool PagePool::is_cached(int page_idx) const {
  check_page(page_idx);
  return cached_[page_idx] != 0;
}

void PagePool::uncache_all() {
  while (lru_head_ >= 0) {  // least recent first onto the LIFO list: the most recent is reused first
    const int page_idx = lru_head_;
    lru_remove(page_idx);
    free_list_.push_back(page_idx);
  }
  for (const auto& entry : index_) cached_[entry.second] = 0;
  index_.clear();
}

int PagePool::refcount(int page_idx) const {
  check_page(page_idx);
  return refcounts_[page_idx];
}

// ---- KvCacheManager -----------------------------------------------------------------------------

namespace {

// ceil(num_tokens / page_size) for num_tokens >= 0.
int64_t pages_for_tokens(int64_t num_tokens, int page_size) {
  return num_tokens / page_size + (num_tokens % page_size != 0 ? 1 : 0);
}

// splitmix64's finaliser: a well-mixed 64-bit step for the page-name chain.
uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

KvCacheManager::KvCacheManager(int num_pages, int page_size, bool enable_prefix_caching, uint64_t prefix_cache_salt)
    : pool_(num_pages), page_size_(page_size), prefix_caching_(enable_prefix_caching), salt_(prefix_cache_salt) {
  LSERVE_CHECK(page_size >= 1, "KvCacheManager: page_size must be >= 1, got ", page_size);
  if (prefix_caching_) {
    page_parent_.assign(static_cast<size_t>(num_pages), 0);
    page_tokens_.assign(static_cast<size_t>(num_pages) * static_cast<size_t>(page_size), 0);
  }
}

int KvCacheManager::pages_needed(int64_t seq_id, int64_t num_tokens) const {
  LSERVE_CHECK(num_tokens >= 0, "KvCacheManager::pages_needed: num_tokens must be >= 0, got ",
               num_tokens, " (seq ", seq_id, ")");
  auto it = tables_.find(seq_id);
  const int64_t num_held = it == tables_.end() ? 0 : static_cast<int64_t>(it->second.size());
  const int64_t needed = std::max<int64_t>(0, pages_for_tokens(num_tokens, page_size_) - num_held);
  // Clamped to int: a count that large can never be satisfied by the pool anyway.
  return static_cast<int>(std::min<int64_t>(needed, std::numeric_limits<int>::max()));
}

bool KvCacheManager::reserve(int64_t seq_id, int64_t num_tokens) {
  const int needed = pages_needed(seq_id, num_tokens);  // checks num_tokens
  if (needed > pool_.num_free()) return false;
  std::vector<int32_t>& table = tables_[seq_id];  // creates an empty table for a new sequence
  table.reserve(table.size() + static_cast<size_t>(needed));
  for (int i = 0; i < needed; ++i) table.push_back(pool_.allocate());
  return true;
}

void KvCacheManager::fork(int64_t src_seq_id, int64_t dst_seq_id, int64_t num_tokens) {
  LSERVE_CHECK(num_tokens >= 0, "KvCacheManager::fork: num_tokens must be >= 0, got ", num_tokens);
  LSERVE_CHECK(!has(dst_seq_id), "KvCacheManager::fork: destination sequence ", dst_seq_id,
               " already exists");
  auto src = tables_.find(src_seq_id);
  LSERVE_CHECK(src != tables_.end(), "KvCacheManager::fork: unknown source sequence ", src_seq_id);
  // Only pages that the first num_tokens tokens fill completely are shared: a partly filled page
  // would be written by both sequences. The caller reserves the rest of dst afterwards.
  const int64_t num_shared = num_tokens / page_size_;
  LSERVE_CHECK(num_shared <= static_cast<int64_t>(src->second.size()), "KvCacheManager::fork: source sequence ",
               src_seq_id, " holds ", src->second.size(), " pages (", src->second.size() * page_size_,
               " tokens), fewer than the ", num_shared, " full pages of ", num_tokens, " tokens");
  std::vector<int32_t> table(src->second.begin(), src->second.begin() + num_shared);
  for (int32_t page_idx : table) pool_.incref(page_idx);
  tables_.emplace(dst_seq_id, std::move(table));
  const auto chain = chains_.find(src_seq_id);
  if (chain != chains_.end()) {
    const size_t named = std::min<size_t>(chain->second.size(), static_cast<size_t>(num_shared));
    chains_[dst_seq_id].assign(chain->second.begin(), chain->second.begin() + named);
  }
}

void KvCacheManager::release(int64_t seq_id) {
  auto it = tables_.find(seq_id);
  if (it == tables_.end()) return;
  // Last page first, so that the LIFO free list hands the sequence's pages out again in order (and
  // a prefix's pages become evictable deepest first: its first pages, the most shared, go last).
  for (auto page = it->second.rbegin(); page != it->second.rend(); ++page) pool_.decref(*page);
  tables_.erase(it);
  chains_.erase(seq_id);
}

uint64_t KvCacheManager::page_hash(uint64_t parent, const TokenRuns& tokens, int64_t page) const {
  uint64_t h = mix64(parent ^ 0x6c73657276650000ULL);  // "lserve"
  for (int64_t i = page * page_size_; i < (page + 1) * page_size_; ++i) {
    h = mix64(h ^ static_cast<uint32_t>(tokens[i]));
  }
  return h;
}

bool KvCacheManager::page_matches(int page_idx, uint64_t parent, const TokenRuns& tokens, int64_t page) const {
  if (page_parent_[static_cast<size_t>(page_idx)] != parent) return false;
  const int32_t* stored = page_tokens_.data() + static_cast<size_t>(page_idx) * page_size_;
  for (int64_t i = 0; i < page_size_; ++i) {
    if (stored[i] != tokens[page * page_size_ + i]) return false;
  }
  return true;
}

int64_t KvCacheManager::match_prefix(int64_t seq_id, const TokenRuns& tokens, int64_t max_tokens) {
  if (!prefix_caching_) return 0;
  LSERVE_CHECK(!has(seq_id), "KvCacheManager::match_prefix: sequence ", seq_id, " already holds pages");
  max_tokens = std::min(max_tokens, tokens.size());
  std::vector<int32_t> table;
  std::vector<uint64_t> chain;
  uint64_t parent = salt_;
  for (int64_t page = 0; (page + 1) * page_size_ <= max_tokens; ++page) {
    const uint64_t hash = page_hash(parent, tokens, page);
    const int page_idx = pool_.lookup(hash);
    if (page_idx < 0 || !page_matches(page_idx, parent, tokens, page)) break;
    table.push_back(page_idx);
    chain.push_back(hash);
    parent = hash;
  }
  if (table.empty()) return 0;
  for (int32_t page_idx : table) pool_.incref(page_idx);
  const int64_t matched = static_cast<int64_t>(table.size()) * page_size_;
  tables_.emplace(seq_id, std::move(table));
  chains_[seq_id] = std::move(chain);
  return matched;
}

void KvCacheManager::cache_full_pages(int64_t seq_id, const TokenRuns& tokens, int64_t num_computed) {
  if (!prefix_caching_) return;
  const auto table = tables_.find(seq_id);
  if (table == tables_.end()) return;
  std::vector<uint64_t>& chain = chains_[seq_id];
  const int64_t num_full = std::min<int64_t>(std::min(num_computed, tokens.size()) / page_size_,
                                             static_cast<int64_t>(table->second.size()));
  for (int64_t page = static_cast<int64_t>(chain.size()); page < num_full; ++page) {
    const uint64_t parent = page == 0 ? salt_ : chain.back();
    const uint64_t hash = page_hash(parent, tokens, page);
    const int page_idx = table->second[static_cast<size_t>(page)];
    // A page with these contents may be cached already (two sequences computed it at once): the
    // chain goes on with the same name either way, and this copy stays uncached.
    if (pool_.cache(page_idx, hash)) {
      page_parent_[static_cast<size_t>(page_idx)] = parent;
      int32_t* stored = page_tokens_.data() + static_cast<size_t>(page_idx) * page_size_;
      for (int64_t i = 0; i < page_size_; ++i) stored[i] = tokens[page * page_size_ + i];
    }
    chain.push_back(hash);
  }
}

void KvCacheManager::reset_prefix_cache() { pool_.uncache_all(); }

const std::vector<int32_t>& KvCacheManager::pages(int64_t seq_id) const {
  static const std::vector<int32_t> kEmpty;
  auto it = tables_.find(seq_id);
  return it == tables_.end() ? kEmpty : it->second;
}

int64_t KvCacheManager::slot(int64_t seq_id, int64_t position) const {
  auto it = tables_.find(seq_id);
  LSERVE_CHECK(it != tables_.end(), "KvCacheManager::slot: unknown sequence ", seq_id);
  const int64_t capacity = static_cast<int64_t>(it->second.size()) * page_size_;
  LSERVE_CHECK(position >= 0 && position < capacity, "KvCacheManager::slot: position ", position,
               " outside the ", capacity, " reserved tokens of sequence ", seq_id);
  return static_cast<int64_t>(it->second[position / page_size_]) * page_size_ + position % page_size_;
}

}  // namespace lserve
