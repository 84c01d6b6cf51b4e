// One bind_<area>() per binding file; module.cpp calls them all. Binding files hold .def lines
// and argument conversion only (through dlpack.h), no logic.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "lserve/ops/page_select.h"

namespace lserve::bindings {

void bind_ops(pybind11::module_& m);       // bind_ops.cpp: host helpers of the ops (rope tables, workspace size)
void bind_kv(pybind11::module_& m);        // bind_kv.cpp: PagePool, KvCacheManager
void bind_sampling(pybind11::module_& m);  // bind_sampling.cpp: SamplingParams
void bind_gguf(pybind11::module_& m);      // bind_gguf.cpp: GgufFile reader
void bind_engine(pybind11::module_& m);    // bind_engine.cpp: ModelConfig, EngineConfig, Engine
void bind_sparse(pybind11::module_& m);    // bind_sparse.cpp: SparsityConfig, PageSelector
void bind_backend(pybind11::module_& m);   // bind_backend.cpp: Backend("cpu" | "cuda[:N]"), the one binding of the ops

// "bound" | "center" -> PageScore, else lserve::Error (bind_sparse.cpp).
PageScore page_score_from_string(const std::string& name);
// "sum" | "max" | "mass" -> GroupScore, else lserve::Error (bind_sparse.cpp).
GroupScore group_score_from_string(const std::string& name);

}  // namespace lserve::bindings
