// Host-side helpers of the ops: _C.sample_workspace_bytes, and _C.rope_cos_sin_cache /
// _C.rope_frequencies, which take rope_scaling as Hugging Face's config dict. The ops themselves are
// _C.Backend's (bind_backend.cpp).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "dlpack.h"
#include "lserve/backend.h"
#include "lserve/model/rope.h"

namespace lserve::bindings {

namespace {

// Reads an optional number from a Hugging Face rope_scaling dict (absent or None: fallback).
double dict_number(const py::dict& dict, const char* key, double fallback) {
  if (!dict.contains(key) || dict[key].is_none()) return fallback;
  return dict[key].cast<double>();
}

// ModelConfig holding what the rope tables read. rope_scaling follows transformers' rope dict:
// "rope_type" (or legacy "type"), "factor", ...; "rope_theta" / "partial_rotary_factor" inside
// it take precedence, as in transformers' rope_parameters. A yarn dict without "factor" uses
// max_position_embeddings / original_max_position_embeddings, as transformers does.
ModelConfig rope_config(int head_dim, double rope_theta, double partial_rotary_factor, const py::object& rope_scaling,
                        int max_position_embeddings) {
  ModelConfig config;
  config.head_dim = head_dim;
  config.rope_theta = rope_theta;
  config.partial_rotary_factor = partial_rotary_factor;
  config.max_position_embeddings = max_position_embeddings;
  if (rope_scaling.is_none()) return config;
  const py::dict dict = rope_scaling.cast<py::dict>();
  RopeScaling& scaling = config.rope_scaling;
  if (dict.contains("rope_type") && !dict["rope_type"].is_none()) {
    scaling.rope_type = dict["rope_type"].cast<std::string>();
  } else if (dict.contains("type") && !dict["type"].is_none()) {
    scaling.rope_type = dict["type"].cast<std::string>();
  }
  config.rope_theta = dict_number(dict, "rope_theta", config.rope_theta);
  config.partial_rotary_factor = dict_number(dict, "partial_rotary_factor", config.partial_rotary_factor);
  scaling.original_max_position_embeddings =
      static_cast<int>(dict_number(dict, "original_max_position_embeddings", 0.0));
  const bool has_factor = dict.contains("factor") && !dict["factor"].is_none();
  if (has_factor) {
    scaling.factor = dict["factor"].cast<double>();
  } else if (scaling.rope_type == "yarn") {
    const int original = scaling.original_max_position_embeddings > 0 ? scaling.original_max_position_embeddings
                                                                      : max_position_embeddings;
    scaling.factor = static_cast<double>(max_position_embeddings) / original;
  } else if (scaling.rope_type == "linear" || scaling.rope_type == "llama3") {
    LSERVE_THROW("rope_scaling of type '", scaling.rope_type, "' needs 'factor'");
  }
  scaling.low_freq_factor = dict_number(dict, "low_freq_factor", scaling.low_freq_factor);
  scaling.high_freq_factor = dict_number(dict, "high_freq_factor", scaling.high_freq_factor);
  scaling.beta_fast = dict_number(dict, "beta_fast", scaling.beta_fast);
  scaling.beta_slow = dict_number(dict, "beta_slow", scaling.beta_slow);
  scaling.attention_factor = dict_number(dict, "attention_factor", 0.0);
  scaling.mscale = dict_number(dict, "mscale", 0.0);
  scaling.mscale_all_dim = dict_number(dict, "mscale_all_dim", 0.0);
  if (dict.contains("truncate") && !dict["truncate"].is_none()) scaling.truncate = dict["truncate"].cast<bool>();
  return config;
}

}  // namespace

void bind_ops(py::module_& m) {
  m.def("sample_workspace_bytes", &sample_workspace_bytes, py::arg("num_rows"), py::arg("vocab_size"),
        "Bytes of the sample op's workspace (uint8) for num_rows rows of vocab_size logits.");
  m.def(
      "rope_cos_sin_cache",
      [](int head_dim, double rope_theta, int max_positions, double partial_rotary_factor, py::object rope_scaling,
         int max_position_embeddings) {
        const ModelConfig config =
            rope_config(head_dim, rope_theta, partial_rotary_factor, rope_scaling, max_position_embeddings);
        const std::vector<float> cache = rope_cos_sin_cache(config, max_positions);
        const int64_t rotary_dim = static_cast<int64_t>(rope_frequencies(config).inv_freq.size()) * 2;
        return to_numpy(cache.data(), {max_positions, rotary_dim});
      },
      py::arg("head_dim"), py::arg("rope_theta"), py::arg("max_positions"), py::arg("partial_rotary_factor") = 1.0,
      py::arg("rope_scaling") = py::none(), py::arg("max_position_embeddings") = 2048,
      "(max_positions, rotary_dim) float32: row p = [cos(p * inv_freq) | sin(p * inv_freq)] * attention_scaling; "
      "rope_scaling is Hugging Face's dict (rope_type default, linear, llama3 or yarn).");
  m.def(
      "rope_frequencies",
      [](int head_dim, double rope_theta, double partial_rotary_factor, py::object rope_scaling,
         int max_position_embeddings) {
        const RopeFrequencies frequencies = rope_frequencies(
            rope_config(head_dim, rope_theta, partial_rotary_factor, rope_scaling, max_position_embeddings));
        py::array_t<double> inv_freq(static_cast<py::ssize_t>(frequencies.inv_freq.size()));
        std::copy(frequencies.inv_freq.begin(), frequencies.inv_freq.end(), inv_freq.mutable_data());
        return py::make_tuple(inv_freq, frequencies.attention_scaling);
      },
      py::arg("head_dim"), py::arg("rope_theta"), py::arg("partial_rotary_factor") = 1.0,
      py::arg("rope_scaling") = py::none(), py::arg("max_position_embeddings") = 2048,
      "(inv_freq (rotary_dim / 2,) float64, attention_scaling) as transformers' ROPE_INIT_FUNCTIONS return them.");
}

}  // namespace lserve::bindings
