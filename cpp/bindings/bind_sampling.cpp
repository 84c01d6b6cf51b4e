// Bindings of SamplingParams and the host sampler (sample_token, Generator for seeded streams).
#include <pybind11/stl.h>

#include <sstream>

#include "bindings.h"
#include "dlpack.h"
#include "lserve/sampling.h"

namespace lserve::bindings {

namespace py = pybind11;

namespace {

py::tuple sample_with(std::mt19937_64& rng, const py::handle& logits, const SamplingParams& params,
                      const std::vector<int32_t>& prompt_ids, const std::vector<int32_t>& output_ids,
                      int32_t eos_token_id) {
  DlpackTensor tensor(logits, "logits");
  const TensorView& view = tensor.view();
  LSERVE_CHECK(view.ndim == 1 && view.dtype == DType::kF32 && view.is_contiguous(),
               "logits must be a contiguous float32 vector, got ", dtype_name(view.dtype), " ", view.shape_str());
  params.validate();
  std::vector<float> scratch(view.data_ptr<float>(), view.data_ptr<float>() + view.numel());
  SampledToken token = sample_token(scratch.data(), static_cast<int>(scratch.size()), params, prompt_ids, output_ids,
                                    eos_token_id, rng);
  return py::make_tuple(token.token_id, token.logprob, token.top_logprobs);
}

}  // namespace

void bind_sampling(py::module_& m) {
  py::class_<SamplingParams>(m, "SamplingParams")
      .def(py::init<>())
      .def_readwrite("temperature", &SamplingParams::temperature)
      .def_readwrite("top_p", &SamplingParams::top_p)
      .def_readwrite("top_k", &SamplingParams::top_k)
      .def_readwrite("min_p", &SamplingParams::min_p)
      .def_readwrite("repetition_penalty", &SamplingParams::repetition_penalty)
      .def_readwrite("presence_penalty", &SamplingParams::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplingParams::frequency_penalty)
      .def_readwrite("max_tokens", &SamplingParams::max_tokens)
      .def_readwrite("min_tokens", &SamplingParams::min_tokens)
      .def_readwrite("stop_token_ids", &SamplingParams::stop_token_ids)
      .def_readwrite("ignore_eos", &SamplingParams::ignore_eos)
      .def_readwrite("logprobs", &SamplingParams::logprobs)
      .def_readwrite("seed", &SamplingParams::seed)
      .def("validate", &SamplingParams::validate)
      .def("__repr__", [](const SamplingParams& p) {
        std::ostringstream out;
        out << "SamplingParams(temperature=" << p.temperature << ", top_p=" << p.top_p << ", top_k=" << p.top_k
            << ", min_p=" << p.min_p << ", max_tokens=" << p.max_tokens << ", seed=" << p.seed << ")";
        return out.str();
      });

  py::class_<std::mt19937_64>(m, "Generator", "A seeded generator for drawing many samples from one stream.")
      .def(py::init([](uint64_t seed) { return std::mt19937_64(seed); }), py::arg("seed"))
      .def("sample", &sample_with, py::arg("logits"), py::arg("params"), py::arg("prompt_ids") = std::vector<int32_t>{},
           py::arg("output_ids") = std::vector<int32_t>{}, py::arg("eos_token_id") = -1);

  m.def(
      "sample_token",
      [](const py::handle& logits, const SamplingParams& params, const std::vector<int32_t>& prompt_ids,
         const std::vector<int32_t>& output_ids, int32_t eos_token_id, uint64_t seed) {
        std::mt19937_64 rng(seed);
        return sample_with(rng, logits, params, prompt_ids, output_ids, eos_token_id);
      },
      py::arg("logits"), py::arg("params"), py::arg("prompt_ids") = std::vector<int32_t>{},
      py::arg("output_ids") = std::vector<int32_t>{}, py::arg("eos_token_id") = -1, py::arg("seed") = 0);
}

}  // namespace lserve::bindings
