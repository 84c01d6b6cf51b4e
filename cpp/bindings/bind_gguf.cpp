// Python view of the GGUF reader (cpp/include/lserve/model/gguf.h): _C.GgufFile (metadata as Python
// values, arrays as lists; tensors as float32 numpy arrays), _C.gguf_model_config_dict (a llama
// file's ModelConfig as a dict), _C.gguf_hf_weights (Hugging Face-named float32 weights) and
// _C.gguf_load_stored_weights (weights as stored, into an Engine with native weights).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "bindings.h"
#include "dlpack.h"
#include "lserve/engine.h"
#include "lserve/model/gguf.h"

namespace lserve::bindings {

namespace {

// `where` names the file and the key: "model.gguf: metadata 'tokenizer.ggml.tokens'".
py::object string_to_python(const std::string& text, const std::string& where, size_t item_idx) {
  PyObject* decoded = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), "strict");
  if (decoded == nullptr) {
    PyErr_Clear();
    throw Error(where + " holds a string that is not valid UTF-8 (item " + std::to_string(item_idx) + ")");
  }
  return py::reinterpret_steal<py::object>(decoded);
}

py::object item_to_python(const GgufValue& value, size_t item_idx, const std::string& where) {
  switch (value.element_type) {
    case GgufValueType::kU64: return py::int_(static_cast<uint64_t>(value.ints[item_idx]));
    case GgufValueType::kBool: return py::bool_(value.ints[item_idx] != 0);
    case GgufValueType::kF32: case GgufValueType::kF64: return py::float_(value.floats[item_idx]);
    case GgufValueType::kString: return string_to_python(value.strings[item_idx], where, item_idx);
    case GgufValueType::kArray: {
      const GgufValue& inner = value.arrays[item_idx];
      py::list out(inner.num_items());
      for (size_t idx = 0; idx < inner.num_items(); ++idx) out[idx] = item_to_python(inner, idx, where);
      return std::move(out);
    }
    default: return py::int_(value.ints[item_idx]);
  }
}

py::object value_to_python(const GgufFile& file, const std::string& key) {
  const GgufValue& value = file.get(key);
  const std::string where = file.path() + ": metadata '" + key + "'";
  if (!value.is_array()) return item_to_python(value, 0, where);
  py::list out(value.num_items());
  for (size_t idx = 0; idx < value.num_items(); ++idx) out[idx] = item_to_python(value, idx, where);
  return std::move(out);
}

py::dict tensor_info_dict(const GgufTensorInfo& info) {
  py::dict out;
  out["name"] = info.name;
  out["shape"] = py::cast(info.shape);
  out["type"] = info.ggml_type;
  out["type_name"] = ggml_type_name(info.ggml_type);
  out["offset"] = info.offset;
  out["nbytes"] = info.nbytes;
  return out;
}

py::array_t<float> read_f32_numpy(const GgufFile& file, const std::string& name) {
  const GgufTensorInfo& info = file.tensor(name);
  py::array_t<float> out(std::vector<py::ssize_t>(info.shape.begin(), info.shape.end()));
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    file.read_f32(info, dst);
  }
  return out;
}

py::dict model_config_dict(const GgufFile& file) {
  const ModelConfig config = gguf_model_config(file);
  py::dict scaling;
  scaling["rope_type"] = config.rope_scaling.rope_type;
  scaling["factor"] = config.rope_scaling.factor;
  scaling["low_freq_factor"] = config.rope_scaling.low_freq_factor;
  scaling["high_freq_factor"] = config.rope_scaling.high_freq_factor;
  scaling["original_max_position_embeddings"] = config.rope_scaling.original_max_position_embeddings;
  scaling["beta_fast"] = config.rope_scaling.beta_fast;
  scaling["beta_slow"] = config.rope_scaling.beta_slow;
  scaling["attention_factor"] = config.rope_scaling.attention_factor;
  scaling["mscale"] = config.rope_scaling.mscale;
  scaling["mscale_all_dim"] = config.rope_scaling.mscale_all_dim;
  scaling["truncate"] = config.rope_scaling.truncate;
  py::dict out;
  out["architecture"] = config.architecture;
  out["vocab_size"] = config.vocab_size;
  out["hidden_size"] = config.hidden_size;
  out["intermediate_size"] = config.intermediate_size;
  out["num_layers"] = config.num_layers;
  out["num_qo_heads"] = config.num_qo_heads;
  out["num_kv_heads"] = config.num_kv_heads;
  out["head_dim"] = config.head_dim;
  out["rms_norm_eps"] = config.rms_norm_eps;
  out["rope_theta"] = config.rope_theta;
  out["partial_rotary_factor"] = config.partial_rotary_factor;
  out["rope_scaling"] = scaling;
  out["max_position_embeddings"] = config.max_position_embeddings;
  out["tie_word_embeddings"] = config.tie_word_embeddings;
  out["attention_bias"] = config.attention_bias;
  out["bos_token_id"] = config.bos_token_id;
  out["eos_token_id"] = config.eos_token_id;
  return out;
}

// callback(hf_name, array) for each weight when given (returns None), else {hf_name: array}.
py::object hf_weights(const GgufFile& file, const py::object& callback) {
  const ModelConfig config = gguf_model_config(file);
  py::dict out;
  gguf_for_each_weight(file, config, [&](const std::string& hf_name, const TensorView& weight) {
    std::vector<int64_t> shape(weight.shape.begin(), weight.shape.begin() + weight.ndim);
    py::array_t<float> array = to_numpy(weight.data_ptr<float>(), shape);
    if (callback.is_none()) {
      out[py::str(hf_name)] = std::move(array);
    } else {
      callback(hf_name, std::move(array));
    }
  });
  if (callback.is_none()) return std::move(out);
  return py::none();
}

// engine.load_weight(hf_name, weight as stored) for each weight, straight from the mapping (whole
// matrices the engine can serve as stored stay views into it, keeping it mapped);
// callback(hf_name) after each when given (a progress bar).
void load_stored_weights(const GgufFile& file, Engine& engine, const py::object& callback) {
  gguf_for_each_stored_weight(file, engine.model_config(), [&](const std::string& hf_name, const TensorView& weight,
                                                                const std::shared_ptr<const void>& mapping) {
    bool kept;
    {
      py::gil_scoped_release release;
      kept = engine.load_weight(hf_name, weight, mapping);
    }
    if (!callback.is_none()) callback(hf_name);
    return kept;
  });
}

}  // namespace

void bind_gguf(pybind11::module_& m) {
  py::class_<GgufFile>(m, "GgufFile", "A GGUF file, memory-mapped read-only; raises ValueError on corrupt input.")
      .def(py::init([](const py::object& path) {
             return std::make_unique<GgufFile>(py::module_::import("os").attr("fspath")(path).cast<std::string>());
           }),
           py::arg("path"))
      .def_property_readonly("path", &GgufFile::path)
      .def_property_readonly("version", &GgufFile::version)
      .def_property_readonly("alignment", &GgufFile::alignment)
      .def_property_readonly("data_offset", &GgufFile::data_offset)
      .def("keys", &GgufFile::keys, "Metadata keys in file order.")
      .def("has_key", &GgufFile::has_key, py::arg("key"))
      .def("__contains__", &GgufFile::has_key, py::arg("key"))
      .def("get", [](const GgufFile& file, const std::string& key) { return value_to_python(file, key); },
           py::arg("key"), "The value of a metadata key (arrays as lists); ValueError when missing.")
      .def("value_type",
           [](const GgufFile& file, const std::string& key) {
             const GgufValue& value = file.get(key);
             return py::make_tuple(gguf_value_type_name(value.type), gguf_value_type_name(value.element_type));
           },
           py::arg("key"), "(type, item type) names, e.g. ('array', 'string').")
      .def("tensor_names",
           [](const GgufFile& file) {
             std::vector<std::string> names;
             for (const GgufTensorInfo& info : file.tensors()) names.push_back(info.name);
             return names;
           })
      .def("tensor_info", [](const GgufFile& file, const std::string& name) { return tensor_info_dict(file.tensor(name)); },
           py::arg("name"), "{name, shape (row-major), type, type_name, offset (absolute), nbytes}.")
      .def("read_f32", &read_f32_numpy, py::arg("name"), "Dequantised float32 numpy array of the tensor's shape.");
  m.def("gguf_model_config_dict", &model_config_dict, py::arg("file"),
        "ModelConfig fields of a llama GGUF as a dict (rope_scaling nested).");
  m.def("gguf_hf_weights", &hf_weights, py::arg("file"), py::arg("callback") = py::none(),
        "Hugging Face-named float32 weights: {name: array}, or callback(name, array) for each.");
  m.def("gguf_load_stored_weights", &load_stored_weights, py::arg("file"), py::arg("engine"),
        py::arg("callback") = py::none(),
        "engine.load_weight(name, weight) for every weight as stored (q4_1 stays q4_1: an Engine with dtype "
        "'native'), then callback(name) when given.");
}

}  // namespace lserve::bindings
