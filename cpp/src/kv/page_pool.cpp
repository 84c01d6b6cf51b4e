// PagePool (reference-counted pages, LIFO free list) and KvCacheManager (per-sequence page tables
// sized in tokens). Contract: cpp/include/lserve/kv/page_pool.h. Every operation either succeeds
// whole or changes nothing; tests/kv/test_page_pool.py checks this against a Python model.
#include "lserve/kv/page_pool.h"

#include <algorithm>
#include <limits>

#include "lserve/check.h"

namespace lserve {

// ---- PagePool -----------------------------------------------------------------------------------

PagePool::PagePool(int num_pages) {
  LSERVE_CHECK(num_pages >= 1, "PagePool: num_pages must be >= 1, got ", num_pages);
  refcounts_.assign(static_cast<size_t>(num_pages), 0);
  // Pushed in reverse so that a fresh pool hands out pages 0, 1, 2, ... in order.
  free_list_.reserve(static_cast<size_t>(num_pages));
  for (int page_idx = num_pages - 1; page_idx >= 0; --page_idx) free_list_.push_back(page_idx);
}

void PagePool::check_page(int page_idx) const {
  LSERVE_CHECK(page_idx >= 0 && page_idx < num_pages(), "PagePool: page index ", page_idx,
               " out of range [0, ", num_pages(), ")");
}

int PagePool::allocate() {
  if (free_list_.empty()) return -1;
  const int page_idx = free_list_.back();
  free_list_.pop_back();
  refcounts_[page_idx] = 1;
  return page_idx;
}

void PagePool::incref(int page_idx) {
  check_page(page_idx);
  LSERVE_CHECK(refcounts_[page_idx] > 0, "PagePool: incref of free page ", page_idx,
               " (only an allocated page can gain owners)");
  ++refcounts_[page_idx];
}

void PagePool::decref(int page_idx) {
  check_page(page_idx);
  LSERVE_CHECK(refcounts_[page_idx] > 0, "PagePool: decref of free page ", page_idx,
               " (double free?)");
  if (--refcounts_[page_idx] == 0) free_list_.push_back(page_idx);
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

}  // namespace

KvCacheManager::KvCacheManager(int num_pages, int page_size) : pool_(num_pages), page_size_(page_size) {
  LSERVE_CHECK(page_size >= 1, "KvCacheManager: page_size must be >= 1, got ", page_size);
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
}

void KvCacheManager::release(int64_t seq_id) {
  auto it = tables_.find(seq_id);
  if (it == tables_.end()) return;
  // Last page first, so that the LIFO free list hands the sequence's pages out again in order.
  for (auto page = it->second.rbegin(); page != it->second.rend(); ++page) pool_.decref(*page);
  tables_.erase(it);
}

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
