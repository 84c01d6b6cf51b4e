// Bindings of PagePool and KvCacheManager (property tests drive them from Python).
#include <pybind11/stl.h>

#include "bindings.h"
#include "lserve/kv/page_pool.h"

namespace lserve::bindings {

namespace py = pybind11;

void bind_kv(py::module_& m) {
  py::class_<PagePool>(m, "PagePool")
      .def(py::init<int>(), py::arg("num_pages"))
      .def_property_readonly("num_pages", &PagePool::num_pages)
      .def_property_readonly("num_free", &PagePool::num_free)
      .def("allocate", &PagePool::allocate)
      .def("incref", &PagePool::incref, py::arg("page_idx"))
      .def("decref", &PagePool::decref, py::arg("page_idx"))
      .def("refcount", &PagePool::refcount, py::arg("page_idx"));

  py::class_<KvCacheManager>(m, "KvCacheManager")
      .def(py::init<int, int>(), py::arg("num_pages"), py::arg("page_size"))
      .def_property_readonly("page_size", &KvCacheManager::page_size)
      .def_property_readonly("num_total_pages", &KvCacheManager::num_total_pages)
      .def_property_readonly("num_free_pages", &KvCacheManager::num_free_pages)
      .def_property_readonly("num_seqs", &KvCacheManager::num_seqs)
      .def("refcount", [](const KvCacheManager& self, int page_idx) { return self.pool().refcount(page_idx); })
      .def("pages_needed", &KvCacheManager::pages_needed, py::arg("seq_id"), py::arg("num_tokens"))
      .def("reserve", &KvCacheManager::reserve, py::arg("seq_id"), py::arg("num_tokens"))
      .def("fork", &KvCacheManager::fork, py::arg("src_seq_id"), py::arg("dst_seq_id"), py::arg("num_tokens"))
      .def("release", &KvCacheManager::release, py::arg("seq_id"))
      .def("has", &KvCacheManager::has, py::arg("seq_id"))
      .def("pages", &KvCacheManager::pages, py::arg("seq_id"))
      .def("slot", &KvCacheManager::slot, py::arg("seq_id"), py::arg("position"));
}

}  // namespace lserve::bindings
