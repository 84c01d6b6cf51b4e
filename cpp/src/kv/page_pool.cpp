// PagePool (reference-counted pages, LIFO free list) and KvCacheManager (per-sequence page tables).
#include "lserve/kv/page_pool.h"

#include <algorithm>

#include "lserve/check.h"

namespace lserve {

PagePool::PagePool(int num_pages) {
  LSERVE_CHECK(num_pages >= 1, "a page pool needs at least one page, got ", num_pages);
  refcounts_.assign(static_cast<size_t>(num_pages), 0);
  free_list_.reserve(static_cast<size_t>(num_pages));
  for (int page = num_pages - 1; page >= 0; --page) free_list_.push_back(page);  // page 0 handed out first
}

void PagePool::check_page(int page_idx) const {
  LSERVE_CHECK(page_idx >= 0 && page_idx < num_pages(), "page index ", page_idx, " outside [0, ", num_pages(), ")");
}

int PagePool::allocate() {
  if (free_list_.empty()) return -1;
  const int page = free_list_.back();
  free_list_.pop_back();
  refcounts_[page] = 1;
  return page;
}

void PagePool::incref(int page_idx) {
  check_page(page_idx);
  LSERVE_CHECK(refcounts_[page_idx] > 0, "incref of free page ", page_idx);
  ++refcounts_[page_idx];
}

void PagePool::decref(int page_idx) {
  check_page(page_idx);
  LSERVE_CHECK(refcounts_[page_idx] > 0, "decref of free page ", page_idx);
  if (--refcounts_[page_idx] == 0) free_list_.push_back(page_idx);
}

int PagePool::refcount(int page_idx) const {
  check_page(page_idx);
  return refcounts_[page_idx];
}

KvCacheManager::KvCacheManager(int num_pages, int page_size) : pool_(num_pages), page_size_(page_size) {
  LSERVE_CHECK(page_size >= 1, "page_size must be >= 1, got ", page_size);
}

int KvCacheManager::pages_needed(int64_t seq_id, int64_t num_tokens) const {
  LSERVE_CHECK(num_tokens >= 0, "negative token count ", num_tokens);
  const int64_t wanted = (num_tokens + page_size_ - 1) / page_size_;
  const auto it = tables_.find(seq_id);
  const int64_t held = it == tables_.end() ? 0 : static_cast<int64_t>(it->second.size());
  return static_cast<int>(std::max<int64_t>(0, wanted - held));
}

bool KvCacheManager::reserve(int64_t seq_id, int64_t num_tokens) {
  const int needed = pages_needed(seq_id, num_tokens);
  if (needed > pool_.num_free()) return false;
  std::vector<int32_t>& table = tables_[seq_id];
  for (int i = 0; i < needed; ++i) table.push_back(pool_.allocate());
  return true;
}

void KvCacheManager::fork(int64_t src_seq_id, int64_t dst_seq_id, int64_t num_tokens) {
  LSERVE_CHECK(!has(dst_seq_id), "fork: sequence ", dst_seq_id, " already exists");
  LSERVE_CHECK(num_tokens >= 0 && num_tokens % page_size_ == 0, "fork shares whole pages: ", num_tokens,
               " is not a multiple of page_size ", page_size_);
  const std::vector<int32_t>& src = pages(src_seq_id);
  const size_t num_pages = static_cast<size_t>(num_tokens / page_size_);
  LSERVE_CHECK(num_pages <= src.size(), "fork: sequence ", src_seq_id, " holds ", src.size(), " pages, not ",
               num_pages);
  std::vector<int32_t> shared(src.begin(), src.begin() + static_cast<int64_t>(num_pages));
  for (int32_t page : shared) pool_.incref(page);
  tables_[dst_seq_id] = std::move(shared);
}

void KvCacheManager::release(int64_t seq_id) {
  auto it = tables_.find(seq_id);
  if (it == tables_.end()) return;
  for (int32_t page : it->second) pool_.decref(page);
  tables_.erase(it);
}

const std::vector<int32_t>& KvCacheManager::pages(int64_t seq_id) const {
  static const std::vector<int32_t> kEmpty;
  const auto it = tables_.find(seq_id);
  return it == tables_.end() ? kEmpty : it->second;
}

int64_t KvCacheManager::slot(int64_t seq_id, int64_t position) const {
  const std::vector<int32_t>& table = pages(seq_id);
  LSERVE_CHECK(position >= 0 && position / page_size_ < static_cast<int64_t>(table.size()), "token ", position,
               " of sequence ", seq_id, " has no page (", table.size(), " pages held)");
  return static_cast<int64_t>(table[position / page_size_]) * page_size_ + position % page_size_;
}

}  // namespace lserve
