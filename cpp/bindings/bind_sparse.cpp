// Bindings of the sparse-attention reference ops (page selection, page statistics) for tests.
#include "bindings.h"
#include "dlpack.h"
#include "lserve/ops/page_select.h"
#include "lserve/sparsity.h"

#include <pybind11/stl.h>

namespace lserve::bindings {

namespace py = pybind11;

PageScore page_score_from_string(const std::string& name) {
  if (name == "bound") return PageScore::kBound;
  if (name == "center") return PageScore::kCenter;
  throw Error("page_score must be 'bound' or 'center', got '" + name + "'");
}

namespace {

std::string page_score_name(PageScore score) { return score == PageScore::kCenter ? "center" : "bound"; }

}  // namespace

void bind_sparse(py::module_& m) {
  py::class_<SparsityConfig>(m, "SparsityConfig")
      .def(py::init<>())
      .def_readwrite("enabled", &SparsityConfig::enabled)
      .def_readwrite("streaming_heads", &SparsityConfig::streaming_heads)
      .def_readwrite("prefill_sink_tokens", &SparsityConfig::prefill_sink_tokens)
      .def_readwrite("prefill_local_tokens", &SparsityConfig::prefill_local_tokens)
      .def_readwrite("decode_sink_tokens", &SparsityConfig::decode_sink_tokens)
      .def_readwrite("decode_local_tokens", &SparsityConfig::decode_local_tokens)
      .def_readwrite("physical_page_size", &SparsityConfig::physical_page_size)
      .def_readwrite("logical_page_size", &SparsityConfig::logical_page_size)
      .def_readwrite("decode_token_budget", &SparsityConfig::decode_token_budget)
      .def_readwrite("selection_reuse_interval", &SparsityConfig::selection_reuse_interval)
      .def_readwrite("dense_below_tokens", &SparsityConfig::dense_below_tokens)
      .def_readwrite("always_select_sink_page", &SparsityConfig::always_select_sink_page)
      .def_property(
          "page_score", [](const SparsityConfig& config) { return page_score_name(config.page_score); },
          [](SparsityConfig& config, const std::string& name) { config.page_score = page_score_from_string(name); })
      .def("validate", &SparsityConfig::validate, py::arg("num_layers"), py::arg("num_kv_heads"));
  m.def(
      "page_select",
      [](py::handle query, py::handle kmax, py::handle kmin, py::handle kv_page_indptr, py::handle kv_page_indices,
         py::handle kv_lens, py::handle selected, py::handle num_selected, int physical_page_size,
         bool keep_first_page, const std::string& page_score) {
        DlpackTensor t_query(query, "query"), t_kmax(kmax, "kmax"), t_kmin(kmin, "kmin"),
            t_indptr(kv_page_indptr, "kv_page_indptr"), t_indices(kv_page_indices, "kv_page_indices"),
            t_lens(kv_lens, "kv_lens"), t_selected(selected, "selected"), t_num(num_selected, "num_selected");
        t_selected.writable_view("selected");
        t_num.writable_view("num_selected");
        PageSelectArgs args{t_query.view(), t_kmax.view(),     t_kmin.view(), t_indptr.view(),
                            t_indices.view(), t_lens.view(),   t_selected.view(), t_num.view(),
                            physical_page_size, keep_first_page, page_score_from_string(page_score)};
        args.validate(Device{});
        py::gil_scoped_release release;
        cpu_page_select(args);
      },
      py::arg("query"), py::arg("kmax"), py::arg("kmin"), py::arg("kv_page_indptr"), py::arg("kv_page_indices"),
      py::arg("kv_lens"), py::arg("selected"), py::arg("num_selected"), py::arg("physical_page_size"),
      py::arg("keep_first_page") = true, py::arg("page_score") = "bound");
  m.def(
      "page_stats_append",
      [](py::handle key, py::handle slot_mapping, py::handle kmax, py::handle kmin, int physical_page_size) {
        DlpackTensor t_key(key, "key"), t_slots(slot_mapping, "slot_mapping"), t_kmax(kmax, "kmax"),
            t_kmin(kmin, "kmin");
        PageStatsAppendArgs args{t_key.view(), t_slots.view(), t_kmax.view(), t_kmin.view(), physical_page_size};
        args.validate(Device{});
        py::gil_scoped_release release;
        cpu_page_stats_append(args);
      },
      py::arg("key"), py::arg("slot_mapping"), py::arg("kmax"), py::arg("kmin"), py::arg("physical_page_size"));
}

}  // namespace lserve::bindings
