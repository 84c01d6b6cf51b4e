// _C.CpuBackend: the reference backend's ops for tests and tools. Every tensor argument is a numpy
// array or torch tensor (DLPack); outputs are preallocated by the caller and written in place;
// the GIL is released while an op runs. Also _C.rope_cos_sin_cache / _C.rope_frequencies, which
// take rope_scaling as Hugging Face's config dict.
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

// The Python object owns its backend; a distinct type so that other bindings may bind Backend.
struct PyCpuBackend {
  std::unique_ptr<Backend> backend;
};

// Runs op(backend) with the GIL released; the DlpackTensors that own the views must outlive it.
template <typename Fn>
void run_without_gil(Fn&& op) {
  py::gil_scoped_release release;
  op();
}

OpKind op_kind_from_string(const std::string& name) {
  if (name == "embed") return OpKind::kEmbed;
  if (name == "rms_norm") return OpKind::kRmsNorm;
  if (name == "gemm") return OpKind::kGemm;
  if (name == "silu_mul") return OpKind::kSiluMul;
  if (name == "rope_kv_append") return OpKind::kRopeKvAppend;
  if (name == "attention") return OpKind::kAttention;
  if (name == "gather_rows") return OpKind::kGatherRows;
  if (name == "sample") return OpKind::kSample;
  if (name == "logprobs") return OpKind::kLogprobs;
  if (name == "sparse_attention") return OpKind::kSparseAttention;
  if (name == "page_select") return OpKind::kPageSelect;
  LSERVE_THROW("unknown op '", name, "'");
}

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
  py::class_<PyCpuBackend>(m, "CpuBackend",
                           "The CPU reference backend. Ops take numpy arrays or torch tensors and write their "
                           "preallocated outputs in place; invalid inputs raise ValueError.")
      .def(py::init([](int num_threads) { return PyCpuBackend{make_cpu_backend(num_threads)}; }),
           py::arg("num_threads") = 0, "num_threads <= 0 uses every hardware thread.")
      .def_property_readonly("name", [](const PyCpuBackend& self) { return self.backend->name(); })
      .def(
          "supports",
          [](const PyCpuBackend& self, const std::string& op, const std::string& weight_dtype,
             const std::string& kv_cache_dtype) {
            return self.backend->supports(op_kind_from_string(op), dtype_from_string(weight_dtype),
                                          dtype_from_string(kv_cache_dtype));
          },
          py::arg("op"), py::arg("weight_dtype") = "float32", py::arg("kv_cache_dtype") = "float32")
      .def(
          "copy",
          [](PyCpuBackend& self, py::handle dst, py::handle src) {
            DlpackTensor dst_t(dst, "dst"), src_t(src, "src");
            const TensorView dst_view = dst_t.writable_view("dst");
            run_without_gil([&] { self.backend->copy(dst_view, src_t.view()); });
          },
          py::arg("dst"), py::arg("src"), "dst[...] = src, converting between float32/bfloat16/float16.")
      .def(
          "fill_zero",
          [](PyCpuBackend& self, py::handle dst) {
            DlpackTensor dst_t(dst, "dst");
            const TensorView dst_view = dst_t.writable_view("dst");
            run_without_gil([&] { self.backend->fill_zero(dst_view); });
          },
          py::arg("dst"))
      .def(
          "embed",
          [](PyCpuBackend& self, py::handle token_ids, py::handle weight, py::handle output,
             const std::string& weight_dtype) {
            DlpackTensor ids_t(token_ids, "token_ids"), weight_t(weight, "weight"), output_t(output, "output");
            const EmbedArgs args{ids_t.view(), block_view(weight_t.view(), weight_dtype, "weight"),
                                 output_t.writable_view("output")};
            run_without_gil([&] { self.backend->embed(args); });
          },
          py::arg("token_ids"), py::arg("weight"), py::arg("output"), py::arg("weight_dtype") = "",
          "output (num_tokens, hidden_size) f32 = weight[token_ids]; weight_dtype q8_0 | q4_0 | q4_1: weight is the "
          "(vocab_size, row_bytes) uint8 array of its blocks")
      .def(
          "rms_norm",
          [](PyCpuBackend& self, py::handle input, py::handle residual, py::handle weight, py::handle output,
             float eps) {
            std::vector<DlpackTensor> keep;
            DlpackTensor input_t(input, "input"), weight_t(weight, "weight"), output_t(output, "output");
            const TensorView residual_view = optional_view(residual, keep, "residual");
            if (residual_view.defined()) keep.back().writable_view("residual");  // updated in place
            const RmsNormArgs args{input_t.view(), residual_view, weight_t.view(), output_t.writable_view("output"),
                                   eps};
            run_without_gil([&] { self.backend->rms_norm(args); });
          },
          py::arg("input"), py::arg("residual"), py::arg("weight"), py::arg("output"), py::arg("eps") = 1e-6f,
          "output = rms_norm(input [+ residual, written back to residual]) * weight")
      .def(
          "gemm",
          [](PyCpuBackend& self, py::handle input, py::handle weight, py::handle bias, py::handle output,
             const std::string& weight_dtype) {
            std::vector<DlpackTensor> keep;
            DlpackTensor input_t(input, "input"), weight_t(weight, "weight"), output_t(output, "output");
            const GemmArgs args{input_t.view(), block_view(weight_t.view(), weight_dtype, "weight"),
                                optional_view(bias, keep, "bias"), output_t.writable_view("output")};
            run_without_gil([&] { self.backend->gemm(args); });
          },
          py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("output"), py::arg("weight_dtype") = "",
          "output (num_tokens, out_features) = input @ weight.T (+ bias); weight_dtype q8_0 | q4_0 | q4_1: weight "
          "is the (out_features, row_bytes) uint8 array of its blocks")
      .def(
          "silu_mul",
          [](PyCpuBackend& self, py::handle input, py::handle output) {
            DlpackTensor input_t(input, "input"), output_t(output, "output");
            const SiluMulArgs args{input_t.view(), output_t.writable_view("output")};
            run_without_gil([&] { self.backend->silu_mul(args); });
          },
          py::arg("input"), py::arg("output"), "output = silu(input[:, :d]) * input[:, d:]")
      .def(
          "rope_kv_append",
          [](PyCpuBackend& self, py::handle query, py::handle key, py::handle value, py::handle positions,
             py::handle cos_sin_cache, py::handle k_cache, py::handle v_cache, py::handle slot_mapping) {
            DlpackTensor query_t(query, "query"), key_t(key, "key"), value_t(value, "value");
            DlpackTensor positions_t(positions, "positions"), cache_t(cos_sin_cache, "cos_sin_cache");
            DlpackTensor k_cache_t(k_cache, "k_cache"), v_cache_t(v_cache, "v_cache");
            DlpackTensor slots_t(slot_mapping, "slot_mapping");
            const RopeKvAppendArgs args{query_t.writable_view("query"),     key_t.writable_view("key"),
                                        value_t.view(),                     positions_t.view(),
                                        cache_t.view(),                     k_cache_t.writable_view("k_cache"),
                                        v_cache_t.writable_view("v_cache"), slots_t.view()};
            run_without_gil([&] { self.backend->rope_kv_append(args); });
          },
          py::arg("query"), py::arg("key"), py::arg("value"), py::arg("positions"), py::arg("cos_sin_cache"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
          "Rotates query and key in place, then stores key and value at slot_mapping (slot < 0: skipped).")
      .def(
          "attention",
          [](PyCpuBackend& self, py::handle query, py::handle k_cache, py::handle v_cache, py::handle qo_indptr,
             py::object kv_page_indptr, py::object kv_page_indices, py::handle kv_lens, py::handle output,
             float sm_scale, py::object window_sink, py::object window_local, py::object stream_ring,
             py::object selection, py::object selection_count, py::object select_slot, py::object select_base) {
            DlpackTensor query_t(query, "query"), k_cache_t(k_cache, "k_cache"), v_cache_t(v_cache, "v_cache");
            DlpackTensor qo_indptr_t(qo_indptr, "qo_indptr"), kv_lens_t(kv_lens, "kv_lens");
            DlpackTensor output_t(output, "output");
            AttentionArgs args;
            args.query = query_t.view();
            args.k_cache = k_cache_t.view();
            args.v_cache = v_cache_t.view();
            args.qo_indptr = qo_indptr_t.view();
            args.kv_lens = kv_lens_t.view();
            args.output = output_t.writable_view("output");
            args.sm_scale = sm_scale;
            // Optional: the page list (absent with a stream ring) and the block-iterator policy.
            std::optional<DlpackTensor> optional_t[9];
            auto optional = [&](py::object& value, const char* name, int index, TensorView* field) {
              if (!value.is_none()) *field = optional_t[index].emplace(value, name).view();
            };
            optional(kv_page_indptr, "kv_page_indptr", 0, &args.kv_page_indptr);
            optional(kv_page_indices, "kv_page_indices", 1, &args.kv_page_indices);
            optional(window_sink, "window_sink", 2, &args.window_sink);
            optional(window_local, "window_local", 3, &args.window_local);
            optional(stream_ring, "stream_ring", 4, &args.stream_ring);
            optional(selection, "selection", 5, &args.selection);
            optional(selection_count, "selection_count", 6, &args.selection_count);
            optional(select_slot, "select_slot", 7, &args.select_slot);
            optional(select_base, "select_base", 8, &args.select_base);
            run_without_gil([&] { self.backend->attention(args); });
          },
          py::arg("query"), py::arg("k_cache"), py::arg("v_cache"), py::arg("qo_indptr"), py::arg("kv_page_indptr"),
          py::arg("kv_page_indices"), py::arg("kv_lens"), py::arg("output"), py::arg("sm_scale"),
          py::arg("window_sink") = py::none(), py::arg("window_local") = py::none(),
          py::arg("stream_ring") = py::none(), py::arg("selection") = py::none(),
          py::arg("selection_count") = py::none(), py::arg("select_slot") = py::none(),
          py::arg("select_base") = py::none(),
          "Causal GQA of each sequence's query chunk over its KV pages (a page list, or stream_ring with the "
          "page lists None), with the optional block-iterator policy: window_sink/window_local (Lambda mask) "
          "and the selection store selection/selection_count read through select_slot/select_base (see "
          "ops/attention.h).")
      .def(
          "gather_rows",
          [](PyCpuBackend& self, py::handle input, py::handle indices, py::handle output) {
            DlpackTensor input_t(input, "input"), indices_t(indices, "indices"), output_t(output, "output");
            const GatherRowsArgs args{input_t.view(), indices_t.view(), output_t.writable_view("output")};
            run_without_gil([&] { self.backend->gather_rows(args); });
          },
          py::arg("input"), py::arg("indices"), py::arg("output"), "output = input[indices]");

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
