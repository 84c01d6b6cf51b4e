// _C.SparsityConfig (its setters convert through scalars.h, validate() names field and value) and
// _C.PageSelector, bound for tests of its policy. The page_select / page_stats_append ops are
// _C.Backend's.
#include "bindings.h"
#include "dlpack.h"
#include "lserve/kv/page_selector.h"
#include "lserve/ops/page_select.h"
#include "lserve/sparsity.h"
#include "scalars.h"

#include <pybind11/stl.h>

namespace lserve::bindings {

namespace py = pybind11;

PageScore page_score_from_string(const std::string& name) {
  if (name == "bound") return PageScore::kBound;
  if (name == "center") return PageScore::kCenter;
  if (name == "blend") return PageScore::kBlend;
  throw Error("page_score must be 'bound', 'center' or 'blend', got '" + name + "'");
}

GroupScore group_score_from_string(const std::string& name) {
  if (name == "sum") return GroupScore::kSum;
  if (name == "max") return GroupScore::kMax;
  if (name == "mass") return GroupScore::kMass;
  throw Error("group_score must be 'sum', 'max' or 'mass', got '" + name + "'");
}

namespace {

std::string page_score_name(PageScore score) {
  return score == PageScore::kCenter ? "center" : score == PageScore::kBlend ? "blend" : "bound";
}
std::string group_score_name(GroupScore score) {
  return score == GroupScore::kMax ? "max" : score == GroupScore::kMass ? "mass" : "sum";
}

}  // namespace

void bind_sparse(py::module_& m) {
  py::class_<SparsityConfig> config(m, "SparsityConfig",
                                    "LServe sparse attention settings (lserve/sparsity.h); setters refuse values "
                                    "of the wrong kind and validate() the rest, raising ValueError naming the field.");
  config.def(py::init<>());
#define LSERVE_SPARSITY_FIELD(name, convert)                                                           \
  config.def_property(                                                                                \
      #name, [](const SparsityConfig& c) { return c.name; },                                         \
      [](SparsityConfig& c, const py::handle& value) { c.name = convert(value, "SparsityConfig." #name); })
  LSERVE_SPARSITY_FIELD(enabled, bool_arg);
  LSERVE_SPARSITY_FIELD(prefill_sink_tokens, int32_arg);
  LSERVE_SPARSITY_FIELD(prefill_local_tokens, int32_arg);
  LSERVE_SPARSITY_FIELD(decode_sink_tokens, int32_arg);
  LSERVE_SPARSITY_FIELD(decode_local_tokens, int32_arg);
  LSERVE_SPARSITY_FIELD(physical_page_size, int32_arg);
  LSERVE_SPARSITY_FIELD(logical_page_size, int32_arg);
  LSERVE_SPARSITY_FIELD(decode_token_budget, int32_arg);
  LSERVE_SPARSITY_FIELD(selection_reuse_interval, int32_arg);
  LSERVE_SPARSITY_FIELD(dense_below_tokens, int32_arg);
  LSERVE_SPARSITY_FIELD(always_select_sink_page, bool_arg);
  LSERVE_SPARSITY_FIELD(page_score_spread, float32_arg);
  LSERVE_SPARSITY_FIELD(select_recent_tokens, int32_arg);
#undef LSERVE_SPARSITY_FIELD
  config.def_readwrite("streaming_heads", &SparsityConfig::streaming_heads)
      .def_readwrite("head_token_budgets", &SparsityConfig::head_token_budgets,
                     "Per-head decode budgets in tokens, num_layers * num_kv_heads layer-major (streaming heads' "
                     "entries ignored); empty: decode_token_budget for every dense head.")
      .def_property(
          "page_score", [](const SparsityConfig& config) { return page_score_name(config.page_score); },
          [](SparsityConfig& config, const std::string& name) { config.page_score = page_score_from_string(name); })
      .def_property(
          "group_score", [](const SparsityConfig& config) { return group_score_name(config.group_score); },
          [](SparsityConfig& config, const std::string& name) { config.group_score = group_score_from_string(name); })
      .def_property_readonly("forced_pages", &SparsityConfig::forced_pages,
                             "Pages every selection holds whatever the scores: the pages of the newest "
                             "select_recent_tokens (at least one) and, with always_select_sink_page, page 0.")
      .def("validate", py::overload_cast<>(&SparsityConfig::validate, py::const_),
           "The settings alone; raises ValueError naming the field, its value and the rule.")
      .def("validate", py::overload_cast<int, int>(&SparsityConfig::validate, py::const_), py::arg("num_layers"),
           py::arg("num_kv_heads"), "validate(), and streaming_heads against the model's shape (when enabled).");
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
}

}  // namespace lserve::bindings
