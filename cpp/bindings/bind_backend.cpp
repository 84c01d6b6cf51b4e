// _C.Backend("cpu" | "cuda[:N]", num_threads): the one binding of the ops, any backend's, for tests
// and tools, one .def per op, and supports() (_C.Support). Tensors are numpy arrays or torch tensors
// (DLPack) on the backend's device or the host where the op allows; outputs are preallocated by the
// caller and written in place; the GIL is released while an op runs. Each call synchronises the
// backend before returning, so results are readable and errors surface at the op that caused them.
// _C.has_cuda_backend says whether this build registered the CUDA backend; _C.OPS names every op;
// _C.cpu_isa() / _C.cpu_isas() tell the CPU backend's kernel level (lserve/cpu_isa.h).
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "dlpack.h"
#include "lserve/backend.h"
#include "lserve/cpu_isa.h"
#include "lserve/ops/page_select.h"
#include "scalars.h"

namespace lserve::bindings {

namespace {

struct PyBackend {
  std::unique_ptr<Backend> backend;
};

// Runs op() with the GIL released, then waits for the device.
template <typename Fn>
void run(PyBackend& self, Fn&& op) {
  py::gil_scoped_release release;
  op();
  self.backend->synchronize();
}

}  // namespace

void bind_backend(py::module_& m) {
  m.attr("has_cuda_backend") = has_backend_factory(DeviceType::kCUDA);
  py::list op_names;
  for (OpKind op : kAllOps) op_names.append(op_name(op));
  m.attr("OPS") = py::tuple(op_names);
  m.def(
      "cpu_isa", [] { return std::string(cpu_isa_name(select_cpu_isa())); },
      "The kernel level ('generic' | 'avx2' | 'avx512' | 'avx512vnni') a CPU backend made now runs: "
      "LSERVE_CPU_ISA's value, or the best this CPU runs when unset; ValueError for a value that is not a "
      "level or that this CPU cannot run");
  m.def(
      "cpu_isas",
      [] {
        std::vector<std::string> names;
        for (CpuIsa isa : supported_cpu_isas()) names.emplace_back(cpu_isa_name(isa));
        return names;
      },
      "The kernel levels this CPU and OS run, lowest first: the values LSERVE_CPU_ISA accepts here");

  py::class_<Support>(m, "Support", "Backend.supports()'s answer: truthy when supported, else `reason` says why.")
      .def_readonly("supported", &Support::supported)
      .def_readonly("reason", &Support::reason)
      .def("__bool__", [](const Support& self) { return self.supported; })
      .def("__repr__", [](const Support& self) {
        return self.supported ? std::string("Support(True)") : "Support(False, '" + self.reason + "')";
      });

  py::class_<PyBackend>(m, "Backend",
                        "A backend by device name ('cpu', 'cuda', 'cuda:N'). Ops write preallocated outputs in "
                        "place; invalid inputs raise ValueError.")
      .def(py::init([](const std::string& device, int num_threads) {
             return PyBackend{make_backend(device, num_threads)};
           }),
           py::arg("device") = "cpu", py::arg("num_threads") = 0)
      .def_property_readonly("name", [](const PyBackend& self) { return self.backend->name(); })
      .def_property_readonly("device", [](const PyBackend& self) { return self.backend->device().str(); })
      .def(
          "supports",
          [](const PyBackend& self, const std::string& op, const std::string& dtype, const std::string& weight_dtype,
             const std::string& kv_cache_dtype, int64_t head_dim, bool window, bool stream_ring, bool selection,
             const std::string& group_score) {
            OpQuery query;
            query.op = op_kind_from_name(op);
            query.activation_dtype = dtype_from_string(dtype);
            query.weight_dtype = dtype_from_string(weight_dtype);
            query.kv_cache_dtype = dtype_from_string(kv_cache_dtype);
            query.head_dim = head_dim;
            query.window = window;
            query.stream_ring = stream_ring;
            query.selection = selection;
            query.group_score = group_score_from_string(group_score);
            return self.backend->supports(query);
          },
          py::arg("op"), py::kw_only(), py::arg("dtype") = "float32", py::arg("weight_dtype") = "float32",
          py::arg("kv_cache_dtype") = "float32", py::arg("head_dim") = 0, py::arg("window") = false,
          py::arg("stream_ring") = false, py::arg("selection") = false, py::arg("group_score") = "sum",
          "Can this backend run `op` (one of _C.OPS) with these argument kinds? dtype: the activations; "
          "head_dim 0: not asked; window / stream_ring / selection: attention's sparse policy; group_score: "
          "page_select's. The op itself refuses whatever this refuses (a backend's own limits with this reason; "
          "what no op contract allows through the contract's check, which fires first).")
      .def_property_readonly("low_precision_activations",
                             [](const PyBackend& self) { return self.backend->low_precision_activations(); })
      .def("memory_info", [](PyBackend& self) { return self.backend->memory_info(); },
           "(free, total) device bytes, or (-1, -1) on the host")
      .def("synchronize", [](PyBackend& self) { run(self, [] {}); })
      .def("begin_isolated", [](PyBackend& self) { self.backend->begin_isolated(); },
           "Opens the per-layer region where allocation, copies and synchronisation are counted as violations.")
      .def("end_isolated", [](PyBackend& self) { self.backend->end_isolated(); })
      .def_property_readonly("isolation_violations",
                             [](const PyBackend& self) { return self.backend->isolation_violations(); })
      .def(
          "copy",
          [](PyBackend& self, py::handle dst, py::handle src) {
            DlpackTensor dst_t(dst, "dst"), src_t(src, "src");
            run(self, [&] { self.backend->copy(dst_t.writable_view("dst"), src_t.view()); });
          },
          py::arg("dst"), py::arg("src"), "dst[...] = src, converting between float32/bfloat16/float16.")
      .def(
          "fill_zero",
          [](PyBackend& self, py::handle dst) {
            DlpackTensor dst_t(dst, "dst");
            run(self, [&] { self.backend->fill_zero(dst_t.writable_view("dst")); });
          },
          py::arg("dst"))
      .def(
          "embed",
          [](PyBackend& self, py::handle token_ids, py::handle weight, py::handle output,
             const std::string& weight_dtype) {
            DlpackTensor ids_t(token_ids, "token_ids"), weight_t(weight, "weight"), output_t(output, "output");
            const EmbedArgs args{ids_t.view(), block_view(weight_t.view(), weight_dtype, "weight"),
                                 output_t.writable_view("output")};
            run(self, [&] { self.backend->embed(args); });
          },
          py::arg("token_ids"), py::arg("weight"), py::arg("output"), py::arg("weight_dtype") = "",
          "output (num_tokens, hidden_size) = weight[token_ids]; weight_dtype q8_0 | q4_0 | q4_1: weight is the "
          "(vocab_size, row_bytes) uint8 array of its blocks")
      .def(
          "rms_norm",
          [](PyBackend& self, py::handle input, py::handle residual, py::handle weight, py::handle output,
             float eps) {
            std::vector<DlpackTensor> keep;
            DlpackTensor input_t(input, "input"), weight_t(weight, "weight"), output_t(output, "output");
            const TensorView residual_view = optional_view(residual, keep, "residual");
            if (residual_view.defined()) keep.back().writable_view("residual");  // updated in place
            const RmsNormArgs args{input_t.view(), residual_view, weight_t.view(), output_t.writable_view("output"),
                                   eps};
            run(self, [&] { self.backend->rms_norm(args); });
          },
          py::arg("input"), py::arg("residual"), py::arg("weight"), py::arg("output"), py::arg("eps") = 1e-6f)
      .def(
          "gemm",
          [](PyBackend& self, py::handle input, py::handle weight, py::handle bias, py::handle output, int repeat,
             const std::string& weight_dtype, bool pack) {
            std::vector<DlpackTensor> keep;
            DlpackTensor input_t(input, "input"), weight_t(weight, "weight"), output_t(output, "output");
            GemmArgs args{input_t.view(), block_view(weight_t.view(), weight_dtype, "weight"),
                          optional_view(bias, keep, "bias"), output_t.writable_view("output")};
            if (repeat < 1) throw py::value_error("repeat must be >= 1");
            Tensor packed;
            run(self, [&] {
              if (pack) {
                args.weight_layout = self.backend->pack_gemm_weight(args.weight, &packed);
                if (args.weight_layout != WeightLayout::kRows) args.weight = packed;
              }
              for (int i = 0; i < repeat; ++i) self.backend->gemm(args);
            });
          },
          py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("output"), py::arg("repeat") = 1,
          py::arg("weight_dtype") = "", py::arg("pack") = false,
          "output = input @ weight^T (+ bias); `repeat` launches it that many times before the one wait "
          "(benchmarks); weight_dtype q8_0 | q4_0 | q4_1: weight is the (out_features, row_bytes) uint8 array of "
          "its blocks; pack: first copy the weight into the layout the backend's gemm reads fastest "
          "(Backend::pack_gemm_weight; the CPU interleaves block formats in groups of 8 rows), as a model does at load")
      .def(
          "silu_mul",
          [](PyBackend& self, py::handle input, py::handle output) {
            DlpackTensor input_t(input, "input"), output_t(output, "output");
            const SiluMulArgs args{input_t.view(), output_t.writable_view("output")};
            run(self, [&] { self.backend->silu_mul(args); });
          },
          py::arg("input"), py::arg("output"))
      .def(
          "rope_kv_append",
          [](PyBackend& self, py::handle query, py::handle key, py::handle value, py::handle positions,
             py::handle cos_sin_cache, py::handle k_cache, py::handle v_cache, py::handle slot_mapping,
             py::handle mirror_slot_mapping) {
            DlpackTensor query_t(query, "query"), key_t(key, "key"), value_t(value, "value");
            DlpackTensor positions_t(positions, "positions"), table_t(cos_sin_cache, "cos_sin_cache");
            DlpackTensor k_cache_t(k_cache, "k_cache"), v_cache_t(v_cache, "v_cache");
            DlpackTensor slots_t(slot_mapping, "slot_mapping");
            std::vector<DlpackTensor> keep;
            RopeKvAppendArgs args{query_t.writable_view("query"), key_t.writable_view("key"), value_t.view(),
                                  positions_t.view(), table_t.view(), k_cache_t.writable_view("k_cache"),
                                  v_cache_t.writable_view("v_cache"), slots_t.view()};
            args.mirror_slot_mapping = optional_view(mirror_slot_mapping, keep, "mirror_slot_mapping");
            run(self, [&] { self.backend->rope_kv_append(args); });
          },
          py::arg("query"), py::arg("key"), py::arg("value"), py::arg("positions"), py::arg("cos_sin_cache"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"), py::kw_only(),
          py::arg("mirror_slot_mapping") = py::none())
      .def(
          "attention",
          [](PyBackend& self, py::handle query, py::handle k_cache, py::handle v_cache, py::handle qo_indptr,
             py::handle kv_page_indptr, py::handle kv_page_indices, py::handle kv_lens, py::handle output,
             float sm_scale, int max_q_len, int max_kv_len, int repeat, py::handle window_sink,
             py::handle window_local, py::handle stream_ring, py::handle selection, py::handle selection_count,
             py::handle select_slot, py::handle select_base) {
            DlpackTensor query_t(query, "query"), k_cache_t(k_cache, "k_cache"), v_cache_t(v_cache, "v_cache");
            DlpackTensor qo_indptr_t(qo_indptr, "qo_indptr"), kv_lens_t(kv_lens, "kv_lens");
            DlpackTensor output_t(output, "output");
            std::vector<DlpackTensor> keep;
            AttentionArgs args;
            args.query = query_t.view();
            args.k_cache = k_cache_t.view();
            args.v_cache = v_cache_t.view();
            args.qo_indptr = qo_indptr_t.view();
            args.kv_page_indptr = optional_view(kv_page_indptr, keep, "kv_page_indptr");
            args.kv_page_indices = optional_view(kv_page_indices, keep, "kv_page_indices");
            args.kv_lens = kv_lens_t.view();
            args.output = output_t.writable_view("output");
            args.sm_scale = sm_scale;
            args.window_sink = optional_view(window_sink, keep, "window_sink");
            args.window_local = optional_view(window_local, keep, "window_local");
            args.stream_ring = optional_view(stream_ring, keep, "stream_ring");
            args.selection = optional_view(selection, keep, "selection");
            args.selection_count = optional_view(selection_count, keep, "selection_count");
            args.select_slot = optional_view(select_slot, keep, "select_slot");
            args.select_base = optional_view(select_base, keep, "select_base");
            if (max_q_len < 0 || max_kv_len < 0) throw py::value_error("max_q_len and max_kv_len must be >= 0");
            args.max_q_len = max_q_len;  // host hints (0 = unknown): the device kernels need them
            args.max_kv_len = max_kv_len;
            if (repeat < 1) throw py::value_error("repeat must be >= 1");
            run(self, [&] {
              for (int i = 0; i < repeat; ++i) self.backend->attention(args);
            });
          },
          py::arg("query"), py::arg("k_cache"), py::arg("v_cache"), py::arg("qo_indptr"), py::arg("kv_page_indptr"),
          py::arg("kv_page_indices"), py::arg("kv_lens"), py::arg("output"), py::arg("sm_scale"),
          py::arg("max_q_len") = 0, py::arg("max_kv_len") = 0, py::arg("repeat") = 1, py::kw_only(),
          py::arg("window_sink") = py::none(), py::arg("window_local") = py::none(),
          py::arg("stream_ring") = py::none(), py::arg("selection") = py::none(),
          py::arg("selection_count") = py::none(), py::arg("select_slot") = py::none(),
          py::arg("select_base") = py::none(),
          "Paged causal GQA (ops/attention.h); kv_page_indptr/kv_page_indices may be None with stream_ring. "
          "The keywords are the sparse block-iterator policy.")
      .def(
          "gather_rows",
          [](PyBackend& self, py::handle input, py::handle indices, py::handle output) {
            DlpackTensor input_t(input, "input"), indices_t(indices, "indices"), output_t(output, "output");
            const GatherRowsArgs args{input_t.view(), indices_t.view(), output_t.writable_view("output")};
            run(self, [&] { self.backend->gather_rows(args); });
          },
          py::arg("input"), py::arg("indices"), py::arg("output"))
      .def(
          "sample",
          [](PyBackend& self, py::handle logits, py::handle temperature, py::handle top_k, py::handle top_p,
             py::handle min_p, py::handle seed, py::handle offset, py::handle output, py::handle history_indptr,
             py::handle history_token_ids, py::handle num_prompt_tokens, py::handle repetition_penalty,
             py::handle presence_penalty, py::handle frequency_penalty, py::handle workspace,
             py::handle banned_indptr, py::handle banned_token_ids, bool raise_invalid_rows) {
            DlpackTensor logits_t(logits, "logits"), temperature_t(temperature, "temperature");
            DlpackTensor top_k_t(top_k, "top_k"), top_p_t(top_p, "top_p"), min_p_t(min_p, "min_p");
            DlpackTensor seed_t(seed, "seed"), offset_t(offset, "offset"), output_t(output, "output");
            std::vector<DlpackTensor> keep;
            SampleArgs args;
            args.logits = logits_t.writable_view("logits");
            args.temperature = temperature_t.view();
            args.top_k = top_k_t.view();
            args.top_p = top_p_t.view();
            args.min_p = min_p_t.view();
            args.seed = seed_t.view();
            args.offset = offset_t.view();
            args.output = output_t.writable_view("output");
            args.history_indptr = optional_view(history_indptr, keep, "history_indptr");
            args.history_token_ids = optional_view(history_token_ids, keep, "history_token_ids");
            args.num_prompt_tokens = optional_view(num_prompt_tokens, keep, "num_prompt_tokens");
            args.repetition_penalty = optional_view(repetition_penalty, keep, "repetition_penalty");
            args.presence_penalty = optional_view(presence_penalty, keep, "presence_penalty");
            args.frequency_penalty = optional_view(frequency_penalty, keep, "frequency_penalty");
            args.workspace = optional_view(workspace, keep, "workspace");
            if (args.workspace.defined()) keep.back().writable_view("workspace");
            args.banned_indptr = optional_view(banned_indptr, keep, "banned_indptr");
            args.banned_token_ids = optional_view(banned_token_ids, keep, "banned_token_ids");
            args.raise_invalid_rows = raise_invalid_rows;
            run(self, [&] { self.backend->sample(args); });
          },
          py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
          py::arg("seed"), py::arg("offset"), py::arg("output"), py::kw_only(),
          py::arg("history_indptr") = py::none(), py::arg("history_token_ids") = py::none(),
          py::arg("num_prompt_tokens") = py::none(), py::arg("repetition_penalty") = py::none(),
          py::arg("presence_penalty") = py::none(), py::arg("frequency_penalty") = py::none(),
          py::arg("workspace") = py::none(), py::arg("banned_indptr") = py::none(),
          py::arg("banned_token_ids") = py::none(), py::arg("raise_invalid_rows") = true,
          "output[r] = one token sampled from logits[r] (used as scratch) with row r's parameters; see "
          "ops/sample.h. The penalty tensors (history_*, num_prompt_tokens, *_penalty, workspace of "
          "sample_workspace_bytes(num_rows, vocab_size) uint8) go together, as do banned_indptr/banned_token_ids. "
          "Invalid rows: CUDA writes -1; the CPU raises, or writes -1 with raise_invalid_rows=False.")
      .def(
          "logprobs",
          [](PyBackend& self, py::handle logits, py::handle row_indices, py::handle token_ids, py::handle logprobs,
             py::handle top_token_ids, py::handle top_logprobs) {
            DlpackTensor logits_t(logits, "logits"), row_indices_t(row_indices, "row_indices");
            DlpackTensor token_ids_t(token_ids, "token_ids"), logprobs_t(logprobs, "logprobs");
            DlpackTensor top_token_ids_t(top_token_ids, "top_token_ids"), top_logprobs_t(top_logprobs, "top_logprobs");
            const LogprobsArgs args{logits_t.view(),
                                    row_indices_t.view(),
                                    token_ids_t.view(),
                                    logprobs_t.writable_view("logprobs"),
                                    top_token_ids_t.writable_view("top_token_ids"),
                                    top_logprobs_t.writable_view("top_logprobs")};
            run(self, [&] { self.backend->logprobs(args); });
          },
          py::arg("logits"), py::arg("row_indices"), py::arg("token_ids"), py::arg("logprobs"),
          py::arg("top_token_ids"), py::arg("top_logprobs"),
          "logprobs[r] = log_softmax(logits[row_indices[r]])[token_ids[r]]; top_token_ids[r] / top_logprobs[r]: "
          "the row's num_top best tokens (larger logit first, lower id on ties) and their logprobs. See "
          "ops/logprobs.h.")
      .def(
          "page_select",
          [](PyBackend& self, py::handle query, py::handle kmax, py::handle kmin, py::handle kv_page_indptr,
             py::handle kv_page_indices, py::handle kv_lens, py::handle selected, py::handle num_selected,
             int physical_page_size, bool keep_first_page, const std::string& page_score, const std::string& group_score, py::handle qo_indptr,
             py::handle select_mode, py::handle select_slot, const py::handle& spread, int keep_last_pages,
             py::handle head_num_select) {
            DlpackTensor query_t(query, "query"), kmax_t(kmax, "kmax"), kmin_t(kmin, "kmin");
            DlpackTensor indptr_t(kv_page_indptr, "kv_page_indptr"), indices_t(kv_page_indices, "kv_page_indices");
            DlpackTensor kv_lens_t(kv_lens, "kv_lens"), selected_t(selected, "selected");
            DlpackTensor num_selected_t(num_selected, "num_selected");
            std::vector<DlpackTensor> keep;
            PageSelectArgs args{query_t.view(),     kmax_t.view(),    kmin_t.view(),
                                indptr_t.view(),    indices_t.view(), kv_lens_t.view(),
                                selected_t.writable_view("selected"),
                                num_selected_t.writable_view("num_selected"),
                                physical_page_size, keep_first_page, page_score_from_string(page_score),
                            group_score_from_string(group_score)};
            args.qo_indptr = optional_view(qo_indptr, keep, "qo_indptr");
            args.select_mode = optional_view(select_mode, keep, "select_mode");
            args.select_slot = optional_view(select_slot, keep, "select_slot");
            args.spread = float32_arg(spread, "spread");
            args.keep_last_pages = keep_last_pages;
            args.head_num_select = optional_view(head_num_select, keep, "head_num_select");
            run(self, [&] { self.backend->page_select(args); });
          },
          py::arg("query"), py::arg("kmax"), py::arg("kmin"), py::arg("kv_page_indptr"), py::arg("kv_page_indices"),
          py::arg("kv_lens"), py::arg("selected"), py::arg("num_selected"), py::arg("physical_page_size"),
          py::arg("keep_first_page") = true, py::arg("page_score") = "bound", py::arg("group_score") = "sum",
          py::kw_only(),
          py::arg("qo_indptr") = py::none(), py::arg("select_mode") = py::none(), py::arg("select_slot") = py::none(),
          py::arg("spread") = 0.0, py::arg("keep_last_pages") = 1, py::arg("head_num_select") = py::none(),
          "The selector's store: selected[slot, h, :num_selected[slot, h]] = the ascending page positions KV head h "
          "of each fresh sequence attends (select_mode 1; 0 dense and 2 reuse leave the store), slot = "
          "select_slot[s]; the query of sequence s is row qo_indptr[s+1]-1. See ops/page_select.h. page_score is "
          "'bound', 'center' or 'blend' (centre + spread x the bound's spread term); group_score 'sum', 'max' or "
          "'mass'. Every selection keeps the keep_last_pages newest pages; head_num_select (num_kv_heads,) int32 "
          "gives each head its own page count (at most the store's width).")
      .def(
          "page_stats_append",
          [](PyBackend& self, py::handle key, py::handle slot_mapping, py::handle kmax, py::handle kmin,
             int physical_page_size) {
            DlpackTensor key_t(key, "key"), slots_t(slot_mapping, "slot_mapping"), kmax_t(kmax, "kmax");
            DlpackTensor kmin_t(kmin, "kmin");
            const PageStatsAppendArgs args{key_t.view(), slots_t.view(), kmax_t.writable_view("kmax"),
                                           kmin_t.writable_view("kmin"), physical_page_size};
            run(self, [&] { self.backend->page_stats_append(args); });
          },
          py::arg("key"), py::arg("slot_mapping"), py::arg("kmax"), py::arg("kmin"), py::arg("physical_page_size"),
          "Folds each key into kmax/kmin of its slot's logical page (the first slot of a logical page resets "
          "it); see ops/page_select.h.");
}

}  // namespace lserve::bindings
