// Bindings of ModelConfig, EngineConfig, Engine and its outputs.
#include <pybind11/stl.h>

#include "bindings.h"
#include "dlpack.h"
#include "lserve/engine.h"
#include "scalars.h"

namespace lserve::bindings {

namespace py = pybind11;

void bind_engine(py::module_& m) {
  py::class_<RopeScaling>(m, "RopeScaling")
      .def(py::init<>())
      .def_readwrite("rope_type", &RopeScaling::rope_type)
      .def_readwrite("factor", &RopeScaling::factor)
      .def_readwrite("low_freq_factor", &RopeScaling::low_freq_factor)
      .def_readwrite("high_freq_factor", &RopeScaling::high_freq_factor)
      .def_readwrite("original_max_position_embeddings", &RopeScaling::original_max_position_embeddings)
      .def_readwrite("beta_fast", &RopeScaling::beta_fast)
      .def_readwrite("beta_slow", &RopeScaling::beta_slow)
      .def_readwrite("attention_factor", &RopeScaling::attention_factor)
      .def_readwrite("mscale", &RopeScaling::mscale)
      .def_readwrite("mscale_all_dim", &RopeScaling::mscale_all_dim)
      .def_readwrite("truncate", &RopeScaling::truncate);

  py::class_<ModelConfig>(m, "ModelConfig")
      .def(py::init<>())
      .def_readwrite("architecture", &ModelConfig::architecture)
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_layers", &ModelConfig::num_layers)
      .def_readwrite("num_qo_heads", &ModelConfig::num_qo_heads)
      .def_readwrite("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("rope_theta", &ModelConfig::rope_theta)
      .def_readwrite("partial_rotary_factor", &ModelConfig::partial_rotary_factor)
      .def_readwrite("rope_scaling", &ModelConfig::rope_scaling)
      .def_readwrite("max_position_embeddings", &ModelConfig::max_position_embeddings)
      .def_readwrite("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def_readwrite("attention_bias", &ModelConfig::attention_bias)
      .def_readwrite("bos_token_id", &ModelConfig::bos_token_id)
      .def_readwrite("eos_token_id", &ModelConfig::eos_token_id)
      .def("validate", &ModelConfig::validate);

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
      .def_readonly("isolation_violations", &EngineStats::isolation_violations);

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
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>())
      .def("has_unfinished_requests", &Engine::has_unfinished_requests)
      .def("stats", &Engine::stats)
      .def("generate", &Engine::generate, py::arg("prompts"), py::arg("params"),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace lserve::bindings
