// _C.SamplingParams (lserve/sampling.h). Sampling itself is the backends' sample op
// (_C.Backend.sample) and logprobs their logprobs op (_C.Backend.logprobs).
#include <pybind11/stl.h>

#include <sstream>

#include "bindings.h"
#include "dlpack.h"  // namespace py
#include "lserve/check.h"
#include "lserve/sampling.h"
#include "scalars.h"

namespace lserve::bindings {

namespace {

std::string repr(const SamplingParams& p) {
  std::ostringstream out;
  out << "SamplingParams(temperature=" << p.temperature << ", top_p=" << p.top_p << ", top_k=" << p.top_k
      << ", min_p=" << p.min_p << ", repetition_penalty=" << p.repetition_penalty
      << ", presence_penalty=" << p.presence_penalty << ", frequency_penalty=" << p.frequency_penalty
      << ", max_tokens=" << p.max_tokens << ", min_tokens=" << p.min_tokens << ", stop_token_ids=[";
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i) out << (i ? ", " : "") << p.stop_token_ids[i];
  out << "], ignore_eos=" << (p.ignore_eos ? "True" : "False") << ", logprobs=";
  if (p.logprobs) out << *p.logprobs; else out << "None";
  out << ", seed=";
  if (p.seed) out << *p.seed; else out << "None";
  out << ")";
  return out.str();
}

}  // namespace

// A property whose setter converts through scalars.h, naming "SamplingParams.<name>".
#define LSERVE_SAMPLING_FIELD(cls, name, convert)                                                      \
  cls.def_property(                                                                                   \
      #name, [](const SamplingParams& p) { return p.name; },                                         \
      [](SamplingParams& p, const py::handle& value) { p.name = convert(value, "SamplingParams." #name); })

void bind_sampling(py::module_& m) {
  py::class_<SamplingParams> cls(m, "SamplingParams",
                                 "vLLM-style sampling parameters (lserve/sampling.h); the constructor validates, "
                                 "raising ValueError that names the field, its value and the rule.");
  cls.def(py::init([](const py::handle& temperature, const py::handle& top_p, const py::handle& top_k,
                      const py::handle& min_p, const py::handle& repetition_penalty,
                      const py::handle& presence_penalty, const py::handle& frequency_penalty,
                      const py::handle& max_tokens, const py::handle& min_tokens, const py::handle& stop_token_ids,
                      const py::handle& ignore_eos, const py::handle& logprobs, const py::handle& seed) {
            SamplingParams p;
            p.temperature = float32_arg(temperature, "SamplingParams.temperature");
            p.top_p = float32_arg(top_p, "SamplingParams.top_p");
            p.top_k = int32_arg(top_k, "SamplingParams.top_k");
            p.min_p = float32_arg(min_p, "SamplingParams.min_p");
            p.repetition_penalty = float32_arg(repetition_penalty, "SamplingParams.repetition_penalty");
            p.presence_penalty = float32_arg(presence_penalty, "SamplingParams.presence_penalty");
            p.frequency_penalty = float32_arg(frequency_penalty, "SamplingParams.frequency_penalty");
            p.max_tokens = int32_arg(max_tokens, "SamplingParams.max_tokens");
            p.min_tokens = int32_arg(min_tokens, "SamplingParams.min_tokens");
            p.stop_token_ids = int32_list_arg(stop_token_ids, "SamplingParams.stop_token_ids");
            p.ignore_eos = bool_arg(ignore_eos, "SamplingParams.ignore_eos");
            p.logprobs = optional_int32_arg(logprobs, "SamplingParams.logprobs");
            p.seed = optional_int64_arg(seed, "SamplingParams.seed");
            p.validate();
            return p;
          }),
          py::kw_only(), py::arg("temperature") = 1.0, py::arg("top_p") = 1.0, py::arg("top_k") = 0,
          py::arg("min_p") = 0.0, py::arg("repetition_penalty") = 1.0, py::arg("presence_penalty") = 0.0,
          py::arg("frequency_penalty") = 0.0, py::arg("max_tokens") = 16, py::arg("min_tokens") = 0,
          py::arg("stop_token_ids") = py::list(), py::arg("ignore_eos") = false, py::arg("logprobs") = py::none(),
          py::arg("seed") = py::none());
  LSERVE_SAMPLING_FIELD(cls, temperature, float32_arg);
  LSERVE_SAMPLING_FIELD(cls, top_p, float32_arg);
  LSERVE_SAMPLING_FIELD(cls, top_k, int32_arg);
  LSERVE_SAMPLING_FIELD(cls, min_p, float32_arg);
  LSERVE_SAMPLING_FIELD(cls, repetition_penalty, float32_arg);
  LSERVE_SAMPLING_FIELD(cls, presence_penalty, float32_arg);
  LSERVE_SAMPLING_FIELD(cls, frequency_penalty, float32_arg);
  LSERVE_SAMPLING_FIELD(cls, max_tokens, int32_arg);
  LSERVE_SAMPLING_FIELD(cls, min_tokens, int32_arg);
  LSERVE_SAMPLING_FIELD(cls, stop_token_ids, int32_list_arg);  // a copy as a list: assign a new list to change it
  LSERVE_SAMPLING_FIELD(cls, ignore_eos, bool_arg);
  LSERVE_SAMPLING_FIELD(cls, logprobs, optional_int32_arg);
  LSERVE_SAMPLING_FIELD(cls, seed, optional_int64_arg);
  cls.def("validate", &SamplingParams::validate, "Raises ValueError naming the parameter, its value and its range.")
      .def("validate_for_model", &SamplingParams::validate_for_model, py::arg("vocab_size"),
           py::arg("eos_token_ids") = std::vector<int32_t>(),
           "validate(), and that min_tokens masking leaves some token of the vocabulary to sample.")
      .def("__repr__", &repr);
}

#undef LSERVE_SAMPLING_FIELD

}  // namespace lserve::bindings
