// PYBIND11_MODULE(_C): lserve::Error becomes ValueError (_C.Error); each area binds itself.
#include <pybind11/pybind11.h>

#include <cstring>

#include "bindings.h"
#include "lserve/check.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "lserve C++ core";
  static pybind11::exception<lserve::Error>& error_type =
      pybind11::register_exception<lserve::Error>(m, "Error", PyExc_ValueError);
  // Tried before pybind11's own translator: a message may quote bytes of a corrupt input that are
  // not UTF-8, which PyErr_SetString would turn into a UnicodeDecodeError; escape them instead.
  pybind11::register_exception_translator([](std::exception_ptr raised) {
    try {
      if (raised) std::rethrow_exception(raised);
    } catch (const lserve::Error& error) {
      const char* what = error.what();
      PyObject* message = PyUnicode_DecodeUTF8(what, static_cast<Py_ssize_t>(std::strlen(what)), "backslashreplace");
      PyErr_SetObject(error_type.ptr(), message);
      Py_XDECREF(message);
    }
  });
  lserve::bindings::bind_ops(m);
  lserve::bindings::bind_kv(m);
  lserve::bindings::bind_sampling(m);
  lserve::bindings::bind_gguf(m);
  lserve::bindings::bind_sparse(m);  // before bind_engine: EngineConfig.sparsity is a SparsityConfig
  lserve::bindings::bind_engine(m);
  lserve::bindings::bind_backend(m);
}
