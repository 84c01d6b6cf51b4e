// Bindings of ModelConfig, EngineConfig, Engine and its outputs.
#include <pybind11/stl.h>

#include "bindings.h"
#include "dlpack.h"
#include "lserve/engine.h"
#include "lserve/model/llama.h"
#include "scalars.h"

namespace lserve::bindings {

namespace py = pybind11;

void bind_engine(py::module_& m) {
  // Setters convert through scalars.h (a wrong kind raises ValueError naming "ModelConfig.<field>");
  // ModelConfig::validate() holds every rule.
#define LSERVE_CONFIG_FIELD(cls, Type, prefix, name, convert)                                          \
  cls.def_property(                                                                                   \
      #name, [](const Type& c) { return c.name; },                                                   \
      [](Type& c, const py::handle& value) { c.name = convert(value, prefix #name); })
  py::class_<RopeScaling> rope(m, "RopeScaling");
  rope.def(py::init<>());
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", rope_type, str_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", factor, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", low_freq_factor, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", high_freq_factor, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", original_max_position_embeddings, int32_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", beta_fast, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", beta_slow, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", attention_factor, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", mscale, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", mscale_all_dim, float64_arg);
  LSERVE_CONFIG_FIELD(rope, RopeScaling, "rope_scaling.", truncate, bool_arg);

  py::class_<ModelConfig> model(m, "ModelConfig");
  model.def(py::init<>());
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", architecture, str_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", vocab_size, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", hidden_size, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", intermediate_size, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", num_layers, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", num_qo_heads, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", num_kv_heads, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", head_dim, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", rms_norm_eps, float64_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", rope_theta, float64_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", partial_rotary_factor, float64_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", max_position_embeddings, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", tie_word_embeddings, bool_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", attention_bias, bool_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", bos_token_id, int32_arg);
  LSERVE_CONFIG_FIELD(model, ModelConfig, "", eos_token_id, int32_arg);
#undef LSERVE_CONFIG_FIELD
  m.def(
      "weight_shapes",
      [](const ModelConfig& config) {
        std::vector<std::pair<std::string, py::tuple>> shapes;
        for (const LlamaModel::WeightSpec& spec : LlamaModel::weight_specs(config)) {
          shapes.emplace_back(spec.name, py::cast(spec.shape));
        }
        return shapes;
      },
      py::arg("model_config"),
      "[(Hugging Face name, shape)] of every tensor a checkpoint of this config holds, in model order "
      "(LlamaModel::weight_specs, the one table); validates the config.");
  model.def_readwrite("rope_scaling", &ModelConfig::rope_scaling)
      .def("validate", &ModelConfig::validate,
           "Derives head_dim (0: hidden_size / num_qo_heads) and checks every field; ValueError names it.");

  py::class_<EngineConfig>(m, "EngineConfig")
      .def(py::init<>())
      .def_readwrite("device", &EngineConfig::device)
      .def_readwrite("dtype", &EngineConfig::dtype)
      .def_readwrite("kv_cache_dtype", &EngineConfig::kv_cache_dtype)
      .def_readwrite("max_model_len", &EngineConfig::max_model_len)
      .def_readwrite("max_num_seqs", &EngineConfig::max_num_seqs)
      .def_readwrite("max_num_batched_tokens", &EngineConfig::max_num_batched_tokens)
      .def_readwrite("kv_cache_memory", &EngineConfig::kv_cache_memory)
      .def_readwrite("num_kv_pages", &EngineConfig::num_kv_pages)
      .def_readwrite("gpu_memory_utilization", &EngineConfig::gpu_memory_utilization)
      .def_readwrite("enforce_eager", &EngineConfig::enforce_eager)
      .def_readwrite("page_size", &EngineConfig::page_size)
      .def_readwrite("num_threads", &EngineConfig::num_threads)
      .def_readwrite("seed", &EngineConfig::seed)
      .def_readwrite("capture_logits", &EngineConfig::capture_logits)
      .def_readwrite("eos_token_ids", &EngineConfig::eos_token_ids)
      .def_readwrite("sparsity", &EngineConfig::sparsity)
      .def_readwrite("enable_prefix_caching", &EngineConfig::enable_prefix_caching)
      .def("validate", &EngineConfig::validate);

  py::class_<TokenLogprob>(m, "TokenLogprob")
      .def_readonly("logprob", &TokenLogprob::logprob)
      .def_readonly("top_logprobs", &TokenLogprob::top_logprobs);

  py::class_<RequestOutput>(m, "StepOutput")
      .def_readonly("request_id", &RequestOutput::request_id)
      .def_readonly("new_token_ids", &RequestOutput::new_token_ids)
      .def_readonly("new_logprobs", &RequestOutput::new_logprobs)
      .def_readonly("finished", &RequestOutput::finished)
      .def_readonly("finish_reason", &RequestOutput::finish_reason)
      .def_readonly("error", &RequestOutput::error)
      .def_readonly("num_prompt_tokens", &RequestOutput::num_prompt_tokens)
      .def_readonly("num_output_tokens", &RequestOutput::num_output_tokens)
      .def_readonly("num_cached_tokens", &RequestOutput::num_cached_tokens)
      .def_property_readonly("logits", [](const RequestOutput& self) -> py::object {
        if (self.logits.empty()) return py::none();
        return to_numpy(self.logits.data(), {static_cast<int64_t>(self.logits.size())});
      });

  py::class_<EngineStats>(m, "EngineStats")
      .def_readonly("num_running", &EngineStats::num_running)
      .def_readonly("num_waiting", &EngineStats::num_waiting)
      .def_readonly("num_total_pages", &EngineStats::num_total_pages)
      .def_readonly("num_free_pages", &EngineStats::num_free_pages)
      .def_readonly("page_size", &EngineStats::page_size)
      .def_readonly("num_preemptions", &EngineStats::num_preemptions)
      .def_readonly("num_steps", &EngineStats::num_steps)
      .def_readonly("kv_cache_bytes", &EngineStats::kv_cache_bytes)
      .def_readonly("kv_cache_bytes_in_use", &EngineStats::kv_cache_bytes_in_use)
      .def_readonly("num_stream_slots", &EngineStats::num_stream_slots)
      .def_readonly("num_free_stream_slots", &EngineStats::num_free_stream_slots)
      .def_readonly("num_prefill_rings", &EngineStats::num_prefill_rings)
      .def_readonly("num_free_prefill_rings", &EngineStats::num_free_prefill_rings)
      .def_readonly("streaming_bytes_per_seq", &EngineStats::streaming_bytes_per_seq)
      .def_readonly("streaming_kv_bytes", &EngineStats::streaming_kv_bytes)
      .def_readonly("num_shadow_pages", &EngineStats::num_shadow_pages)
      .def_readonly("streaming_kv_bytes_in_use", &EngineStats::streaming_kv_bytes_in_use)
      .def_readonly("last_step_pages_selected", &EngineStats::last_step_pages_selected)
      .def_readonly("last_step_pages_total", &EngineStats::last_step_pages_total)
      .def_readonly("graph_batch_sizes", &EngineStats::graph_batch_sizes)
      .def_readonly("num_graph_replays", &EngineStats::num_graph_replays)
      .def_readonly("prefix_caching", &EngineStats::prefix_caching)
      .def_readonly("num_cached_pages", &EngineStats::num_cached_pages)
      .def_readonly("prefix_cache_queries", &EngineStats::prefix_cache_queries)
      .def_readonly("prefix_cache_hits", &EngineStats::prefix_cache_hits)
      .def_readonly("num_prompt_tokens_computed", &EngineStats::num_prompt_tokens_computed)
      .def_readonly("num_forked_samples", &EngineStats::num_forked_samples)
      .def_readonly("isolation_violations", &EngineStats::isolation_violations)
      .def_readonly("weight_bytes_mapped", &EngineStats::weight_bytes_mapped)
      .def_readonly("weight_bytes_packed", &EngineStats::weight_bytes_packed);

  py::class_<Engine>(m, "Engine")
      .def(py::init<const ModelConfig&, const EngineConfig&>(), py::arg("model_config"), py::arg("config"))
      .def_static("from_gguf", &Engine::from_gguf, py::arg("path"), py::arg("config"),
                  py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("model_config", &Engine::model_config)
      .def_property_readonly("config", &Engine::config)
      .def("load_weight",
           [](Engine& self, const std::string& name, const py::handle& array) {
             DlpackTensor tensor(array, name.c_str());
             py::gil_scoped_release release;
             self.load_weight(name, tensor.view());
           },
           py::arg("name"), py::arg("tensor"))
      .def("finalize", &Engine::finalize, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("ready", &Engine::ready)
      .def(
          "add_request",
          [](Engine& self, int64_t request_id, const py::handle& prompt_token_ids, const SamplingParams& params) {
            self.add_request(request_id, int32_list_arg(prompt_token_ids, "prompt_token_ids"), params);
          },
          py::arg("request_id"), py::arg("prompt_token_ids"), py::arg("params"),
          "Queues one request; raises ValueError naming what is wrong (empty prompt, a token id outside the "
          "vocabulary, a prompt that leaves max_model_len no room, the params).")
      .def(
          "add_request_group",
          [](Engine& self, const std::vector<int64_t>& request_ids, const py::handle& prompt_token_ids,
             const std::vector<SamplingParams>& params) {
            self.add_request_group(request_ids, int32_list_arg(prompt_token_ids, "prompt_token_ids"), params);
          },
          py::arg("request_ids"), py::arg("prompt_token_ids"), py::arg("params"))
      .def("abort_request", &Engine::abort_request, py::arg("request_id"))
      .def("reset_prefix_cache", &Engine::reset_prefix_cache)
      .def("set_decode_sparsity", &Engine::set_decode_sparsity, py::arg("sparsity"))
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("has_unfinished_requests", &Engine::has_unfinished_requests)
      .def("stats", &Engine::stats)
      .def("generate", &Engine::generate, py::arg("prompts"), py::arg("params"),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace lserve::bindings
