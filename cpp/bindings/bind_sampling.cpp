// _C.SamplingParams (lserve/sampling.h). Sampling itself is the backends' sample op
// (_C.Backend.sample) and logprobs their logprobs op (_C.Backend.logprobs).
#include <pybind11/stl.h>

#include <limits>
#include <sstream>

#include "bindings.h"
#include "dlpack.h"  // namespace py
#include "lserve/check.h"
#include "lserve/sampling.h"

namespace lserve::bindings {

namespace {

// The C++ fields are int32: a Python int beyond that is refused naming the field (ValueError), not
// wrapped or turned into pybind11's TypeError. Ints beyond int64 still fail pybind11's conversion;
// lserve.SamplingParams checks every field's range before it gets here.
int32_t to_int32(int64_t value, const char* name) {
  LSERVE_CHECK(value >= std::numeric_limits<int32_t>::min() && value <= std::numeric_limits<int32_t>::max(),
               "SamplingParams.", name, " must fit a 32-bit int, got ", value);
  return static_cast<int32_t>(value);
}

std::string repr(const SamplingParams& p) {
  std::ostringstream out;
  out << "SamplingParams(temperature=" << p.temperature << ", top_p=" << p.top_p << ", top_k=" << p.top_k
      << ", min_p=" << p.min_p << ", repetition_penalty=" << p.repetition_penalty
      << ", presence_penalty=" << p.presence_penalty << ", frequency_penalty=" << p.frequency_penalty
      << ", max_tokens=" << p.max_tokens << ", min_tokens=" << p.min_tokens << ", stop_token_ids=[";
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i) out << (i ? ", " : "") << p.stop_token_ids[i];
  out << "], ignore_eos=" << (p.ignore_eos ? "True" : "False") << ", logprobs=" << p.logprobs
      << ", seed=" << p.seed << ")";
  return out.str();
}

}  // namespace

void bind_sampling(py::module_& m) {
  const SamplingParams defaults;
  py::class_<SamplingParams>(m, "SamplingParams",
                             "vLLM-style sampling parameters; the constructor validates (ValueError).")
      .def(py::init([](float temperature, float top_p, int64_t top_k, float min_p, float repetition_penalty,
                       float presence_penalty, float frequency_penalty, int64_t max_tokens, int64_t min_tokens,
                       const std::vector<int64_t>& stop_token_ids, bool ignore_eos, int64_t logprobs,
                       int64_t seed) {
             SamplingParams p;
             p.temperature = temperature;
             p.top_p = top_p;
             p.top_k = to_int32(top_k, "top_k");
             p.min_p = min_p;
             p.repetition_penalty = repetition_penalty;
             p.presence_penalty = presence_penalty;
             p.frequency_penalty = frequency_penalty;
             p.max_tokens = to_int32(max_tokens, "max_tokens");
             p.min_tokens = to_int32(min_tokens, "min_tokens");
             p.stop_token_ids.reserve(stop_token_ids.size());
             for (int64_t token_id : stop_token_ids) p.stop_token_ids.push_back(to_int32(token_id, "stop_token_ids"));
             p.ignore_eos = ignore_eos;
             p.logprobs = to_int32(logprobs, "logprobs");
             p.seed = seed;
             p.validate();
             return p;
           }),
           py::kw_only(), py::arg("temperature") = defaults.temperature, py::arg("top_p") = defaults.top_p,
           py::arg("top_k") = defaults.top_k, py::arg("min_p") = defaults.min_p,
           py::arg("repetition_penalty") = defaults.repetition_penalty,
           py::arg("presence_penalty") = defaults.presence_penalty,
           py::arg("frequency_penalty") = defaults.frequency_penalty, py::arg("max_tokens") = defaults.max_tokens,
           py::arg("min_tokens") = defaults.min_tokens, py::arg("stop_token_ids") = defaults.stop_token_ids,
           py::arg("ignore_eos") = defaults.ignore_eos, py::arg("logprobs") = defaults.logprobs,
           py::arg("seed") = defaults.seed)
      .def_readwrite("temperature", &SamplingParams::temperature)
      .def_readwrite("top_p", &SamplingParams::top_p)
      .def_readwrite("top_k", &SamplingParams::top_k)
      .def_readwrite("min_p", &SamplingParams::min_p)
      .def_readwrite("repetition_penalty", &SamplingParams::repetition_penalty)
      .def_readwrite("presence_penalty", &SamplingParams::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplingParams::frequency_penalty)
      .def_readwrite("max_tokens", &SamplingParams::max_tokens)
      .def_readwrite("min_tokens", &SamplingParams::min_tokens)
      .def_readwrite("stop_token_ids", &SamplingParams::stop_token_ids,
                     "A copy as a list: assign a new list to change it.")
      .def_readwrite("ignore_eos", &SamplingParams::ignore_eos)
      .def_readwrite("logprobs", &SamplingParams::logprobs)
      .def_readwrite("seed", &SamplingParams::seed)
      .def("validate", &SamplingParams::validate, "Raises ValueError naming the parameter and its range.")
      .def("validate_for_model", &SamplingParams::validate_for_model, py::arg("vocab_size"),
           py::arg("eos_token_ids") = std::vector<int32_t>(),
           "validate(), and that min_tokens masking leaves some token of the vocabulary to sample.")
      .def("__repr__", &repr);
}

}  // namespace lserve::bindings
