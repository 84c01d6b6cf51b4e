// PYBIND11_MODULE(_C): lserve::Error becomes ValueError; each area binds itself.
#include <pybind11/pybind11.h>

#include "bindings.h"
#include "lserve/check.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lserve C++ core";
  pybind11::register_exception<lserve::Error>(m, "Error", PyExc_ValueError);
  lserve::bindings::bind_ops(m);
  lserve::bindings::bind_kv(m);
  lserve::bindings::bind_sampling(m);
  lserve::bindings::bind_gguf(m);
  lserve::bindings::bind_sparse(m);  // before bind_engine: EngineConfig.sparsity is a SparsityConfig
  lserve::bindings::bind_engine(m);
  lserve::bindings::bind_backend(m);
}
