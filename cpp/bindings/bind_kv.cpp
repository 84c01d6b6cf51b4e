// _C.PagePool and _C.KvCacheManager: the page allocator and per-sequence page tables
// (cpp/include/lserve/kv/page_pool.h), bound method for method.
#include <pybind11/stl.h>

#include "bindings.h"
#include "lserve/kv/page_pool.h"

namespace lserve::bindings {

namespace py = pybind11;

void bind_kv(py::module_& m) {
  py::class_<PagePool>(m, "PagePool", "Fixed pool of KV pages with reference counts; LIFO free list.")
      .def(py::init<int>(), py::arg("num_pages"))
      .def("num_pages", &PagePool::num_pages)
      .def("num_free", &PagePool::num_free)
      .def("allocate", &PagePool::allocate, "A free page with reference count 1, or -1 when none is left.")
      .def("incref", &PagePool::incref, py::arg("page_idx"))
      .def("decref", &PagePool::decref, py::arg("page_idx"),
           "Drops one reference; the page returns to the free list at zero.")
      .def("refcount", &PagePool::refcount, py::arg("page_idx"))
      .def("is_cached", &PagePool::is_cached, py::arg("page_idx"))
      .def("num_cached", &PagePool::num_cached)
      .def("num_evictable", &PagePool::num_evictable)
      .def("num_evictions", &PagePool::num_evictions);

  py::class_<KvCacheManager>(m, "KvCacheManager",
                             "Per-sequence page tables over a PagePool, sized in tokens.\n\n"
                             "Example: kv = KvCacheManager(num_pages=8, page_size=16); kv.reserve(0, 20);\n"
                             "kv.pages(0) == [0, 1]; kv.slot(0, 17) == 1 * 16 + 1")
      .def(py::init<int, int, bool, uint64_t>(), py::arg("num_pages"), py::arg("page_size"),
           py::arg("enable_prefix_caching") = false, py::arg("prefix_cache_salt") = 0)
      .def("prefix_caching", &KvCacheManager::prefix_caching)
      .def("page_size", &KvCacheManager::page_size)
      .def("num_total_pages", &KvCacheManager::num_total_pages)
      .def("num_free_pages", &KvCacheManager::num_free_pages)
      .def("num_seqs", &KvCacheManager::num_seqs)
      // A copy: a reference would let Python allocate or free pages behind the manager's back.
      .def("pool", &KvCacheManager::pool, py::return_value_policy::copy,
           "A snapshot of the underlying PagePool (refcounts, free count).")
      .def("pages_needed", &KvCacheManager::pages_needed, py::arg("seq_id"), py::arg("num_tokens"),
           "Pages seq_id still needs to hold num_tokens tokens (0 if it has them).")
      .def("reserve", &KvCacheManager::reserve, py::arg("seq_id"), py::arg("num_tokens"),
           "Grows seq_id's page table to hold num_tokens tokens; False (and no change) when the pool "
           "has too few free pages.")
      .def("fork", &KvCacheManager::fork, py::arg("src_seq_id"), py::arg("dst_seq_id"), py::arg("num_tokens"),
           "New sequence dst shares the pages that src's first num_tokens tokens fill completely.")
      .def("release", &KvCacheManager::release, py::arg("seq_id"),
           "Releases every page of seq_id (no-op for an unknown sequence).")
      .def("match_prefix",
           [](KvCacheManager& self, int64_t seq_id, const std::vector<int32_t>& tokens, int64_t max_tokens) {
             return self.match_prefix(seq_id, TokenRuns{tokens.data(), static_cast<int64_t>(tokens.size())},
                                      max_tokens);
           },
           py::arg("seq_id"), py::arg("tokens"), py::arg("max_tokens"),
           "A new sequence takes the longest cached run of full pages of tokens[:max_tokens]; returns the "
           "tokens mapped (0: nothing, and no table).")
      .def("cache_full_pages",
           [](KvCacheManager& self, int64_t seq_id, const std::vector<int32_t>& tokens, int64_t num_computed) {
             self.cache_full_pages(seq_id, TokenRuns{tokens.data(), static_cast<int64_t>(tokens.size())},
                                   num_computed);
           },
           py::arg("seq_id"), py::arg("tokens"), py::arg("num_computed"),
           "Names seq_id's pages that its first num_computed tokens fill, so later sequences can find them.")
      .def("reset_prefix_cache", &KvCacheManager::reset_prefix_cache)
      .def("has", &KvCacheManager::has, py::arg("seq_id"))
      .def("pages", &KvCacheManager::pages, py::arg("seq_id"),
           "seq_id's pages in token order, as a new list (empty for an unknown sequence).")
      .def("slot", &KvCacheManager::slot, py::arg("seq_id"), py::arg("position"),
           "Cache slot of token `position`: page_idx * page_size + position % page_size.");
}

}  // namespace lserve::bindings
