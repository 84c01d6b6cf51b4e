// Bindings of the sparse-attention reference ops (page selection, page statistics) for tests.
#include "bindings.h"
#include "dlpack.h"
#include "lserve/kv/page_selector.h"
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

GroupScore group_score_from_string(const std::string& name) {
  if (name == "sum") return GroupScore::kSum;
  if (name == "max") return GroupScore::kMax;
  if (name == "mass") return GroupScore::kMass;
  throw Error("group_score must be 'sum', 'max' or 'mass', got '" + name + "'");
}

namespace {

std::string page_score_name(PageScore score) { return score == PageScore::kCenter ? "center" : "bound"; }
std::string group_score_name(GroupScore score) {
  return score == GroupScore::kMax ? "max" : score == GroupScore::kMass ? "mass" : "sum";
}

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
      .def_property(
          "group_score", [](const SparsityConfig& config) { return group_score_name(config.group_score); },
          [](SparsityConfig& config, const std::string& name) { config.group_score = group_score_from_string(name); })
      .def("validate", &SparsityConfig::validate, py::arg("num_layers"), py::arg("num_kv_heads"));
  py::class_<PageSelector>(m, "PageSelector",
                           "The sparse-attention state owner (kv/page_selector.h), bound for tests of its policy.")
      .def(py::init<const SparsityConfig&, int, int, int, int>(), py::arg("sparsity"), py::arg("page_size"),
           py::arg("max_num_seqs"), py::arg("max_num_batched_tokens"), py::arg("max_model_len"))
      .def("size_memory", &PageSelector::size_memory, py::arg("budget"), py::arg("stream_bytes_per_token"),
           py::arg("dense_bytes_per_token"))
      .def_property_readonly("num_sink_pages", &PageSelector::num_sink_pages)
      .def_property_readonly("decode_ring_pages", &PageSelector::decode_ring_pages)
      .def_property_readonly("slot_pages", &PageSelector::slot_pages)
      .def_property_readonly("prefill_ring_pages", &PageSelector::prefill_ring_pages)
      .def_property_readonly("num_select", &PageSelector::num_select)
      .def_property_readonly("decode_slot_tokens", &PageSelector::decode_slot_tokens)
      .def_property_readonly("num_slots", &PageSelector::num_slots)
      .def_property_readonly("num_prefill_rings", &PageSelector::num_prefill_rings)
      .def_property_readonly("num_stream_pages", &PageSelector::num_stream_pages)
      .def_property_readonly("num_free_slots", &PageSelector::num_free_slots)
      .def_property_readonly("num_free_prefill_rings", &PageSelector::num_free_prefill_rings)
      .def("acquire", &PageSelector::acquire, py::arg("seq_id"), py::arg("prefill_tokens"))
      .def("release", &PageSelector::release, py::arg("seq_id"))
      .def("has", &PageSelector::has, py::arg("seq_id"))
      .def("slot_of", &PageSelector::slot_of, py::arg("seq_id"))
      .def(
          "plan_chunk",
          [](PageSelector& self, int64_t seq_id, int64_t start_position, int64_t num_new_tokens, int64_t num_pages,
             bool samples) {
            SparsePlan plan;
            self.plan_chunk(seq_id, start_position, num_new_tokens, num_pages, samples, &plan);
            py::dict out;
            out["stream_slot_mapping"] = plan.stream_slot_mapping;
            out["stream_mirror_mapping"] = plan.stream_mirror_mapping;
            out["stream_ring"] = plan.stream_ring;
            out["window_sink"] = plan.window_sink[0];
            out["window_local"] = plan.window_local[0];
            out["select_mode"] = plan.select_mode[0];
            out["select_slot"] = plan.select_slot[0];
            out["select_base"] = plan.select_base[0];
            out["pages_read_per_head"] = plan.pages_read_per_head;
            return out;
          },
          py::arg("seq_id"), py::arg("start_position"), py::arg("num_new_tokens"), py::arg("num_pages"),
          py::arg("samples"), "One chunk's plan (what Engine::step appends to the step's SparsePlan), as a dict.")
      .def("commit", &PageSelector::commit);
  m.def(
      "page_select",
      [](py::handle query, py::handle kmax, py::handle kmin, py::handle kv_page_indptr, py::handle kv_page_indices,
         py::handle kv_lens, py::handle selected, py::handle num_selected, int physical_page_size,
         bool keep_first_page, const std::string& page_score, const std::string& group_score, py::handle qo_indptr, py::handle select_mode,
         py::handle select_slot) {
        DlpackTensor t_query(query, "query"), t_kmax(kmax, "kmax"), t_kmin(kmin, "kmin"),
            t_indptr(kv_page_indptr, "kv_page_indptr"), t_indices(kv_page_indices, "kv_page_indices"),
            t_lens(kv_lens, "kv_lens"), t_selected(selected, "selected"), t_num(num_selected, "num_selected");
        t_selected.writable_view("selected");
        t_num.writable_view("num_selected");
        std::vector<DlpackTensor> keep;
        PageSelectArgs args{t_query.view(), t_kmax.view(),     t_kmin.view(), t_indptr.view(),
                            t_indices.view(), t_lens.view(),   t_selected.view(), t_num.view(),
                            physical_page_size, keep_first_page, page_score_from_string(page_score),
                            group_score_from_string(group_score)};
        args.qo_indptr = optional_view(qo_indptr, keep, "qo_indptr");
        args.select_mode = optional_view(select_mode, keep, "select_mode");
        args.select_slot = optional_view(select_slot, keep, "select_slot");
        args.validate(Device{});
        LSERVE_CHECK(args.query.dtype == DType::kF32, "page_select (reference): query must be float32");
        py::gil_scoped_release release;
        cpu_page_select(args);
      },
      py::arg("query"), py::arg("kmax"), py::arg("kmin"), py::arg("kv_page_indptr"), py::arg("kv_page_indices"),
      py::arg("kv_lens"), py::arg("selected"), py::arg("num_selected"), py::arg("physical_page_size"),
      py::arg("keep_first_page") = true, py::arg("page_score") = "bound", py::arg("group_score") = "sum",
          py::kw_only(),
      py::arg("qo_indptr") = py::none(), py::arg("select_mode") = py::none(), py::arg("select_slot") = py::none());
  m.def(
      "page_stats_append",
      [](py::handle key, py::handle slot_mapping, py::handle kmax, py::handle kmin, int physical_page_size) {
        DlpackTensor t_key(key, "key"), t_slots(slot_mapping, "slot_mapping"), t_kmax(kmax, "kmax"),
            t_kmin(kmin, "kmin");
        PageStatsAppendArgs args{t_key.view(), t_slots.view(), t_kmax.view(), t_kmin.view(), physical_page_size};
        args.validate(Device{});
        LSERVE_CHECK(args.key.dtype == DType::kF32, "page_stats_append (reference): key must be float32");
        py::gil_scoped_release release;
        cpu_page_stats_append(args);
      },
      py::arg("key"), py::arg("slot_mapping"), py::arg("kmax"), py::arg("kmin"), py::arg("physical_page_size"));
}

}  // namespace lserve::bindings
