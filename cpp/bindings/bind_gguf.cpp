// Bindings of the GGUF reader: metadata as Python values, tensors as float32 numpy arrays, the
// llama ModelConfig and Hugging Face-named weights.
#include <pybind11/stl.h>

#include "bindings.h"
#include "dlpack.h"
#include "lserve/model/gguf.h"

namespace lserve::bindings {

namespace py = pybind11;

namespace {

py::object to_python(const GgufValue& value) {
  switch (value.type) {
    case GgufValueType::kBool: return py::bool_(value.int_value != 0);
    case GgufValueType::kF32: case GgufValueType::kF64: return py::float_(value.float_value);
    case GgufValueType::kString: return py::str(value.string_value);
    case GgufValueType::kArray:
      if (value.array_type == GgufValueType::kString) return py::cast(value.strings);
      if (value.array_type == GgufValueType::kF32 || value.array_type == GgufValueType::kF64) {
        return py::cast(value.floats);
      }
      if (value.array_type == GgufValueType::kBool) {
        py::list out;
        for (int64_t v : value.ints) out.append(py::bool_(v != 0));
        return out;
      }
      return py::cast(value.ints);
    default: return py::int_(value.int_value);
  }
}

py::array_t<float> weight_array(std::vector<float> values, const std::vector<int64_t>& shape) {
  return to_numpy(values.data(), shape);
}

}  // namespace

void bind_gguf(py::module_& m) {
  py::class_<GgufFile>(m, "GgufFile")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("path", &GgufFile::path)
      .def_property_readonly("version", &GgufFile::version)
      .def("keys", &GgufFile::keys)
      .def("__contains__", &GgufFile::has_key)
      .def("get", [](const GgufFile& self, const std::string& key, py::object fallback) {
            return self.has_key(key) ? to_python(self.value(key)) : fallback;
          }, py::arg("key"), py::arg("default") = py::none())
      .def("tensor_names", [](const GgufFile& self) {
        std::vector<std::string> names;
        for (const auto& tensor : self.tensors()) names.push_back(tensor.name);
        return names;
      })
      .def("tensor_info", [](const GgufFile& self, const std::string& name) {
        const GgufTensorInfo& info = self.tensor(name);
        py::dict out;
        out["name"] = info.name;
        out["shape"] = info.shape;
        out["type"] = info.type;
        out["type_name"] = ggml_type_name(info.type);
        out["offset"] = info.offset;
        out["num_bytes"] = info.num_bytes;
        return out;
      }, py::arg("name"))
      .def("read_f32", [](const GgufFile& self, const std::string& name) {
        std::vector<float> values;
        {
          py::gil_scoped_release release;
          values = self.read_f32(name);
        }
        return weight_array(std::move(values), self.tensor(name).shape);
      }, py::arg("name"));

  m.def("gguf_model_config", &gguf_model_config, py::arg("file"));
  m.def("gguf_hf_weight_names", &gguf_hf_weight_names, py::arg("file"));
  m.def("gguf_read_hf_weight", [](const GgufFile& file, const ModelConfig& config, const std::string& name) {
    std::vector<int64_t> shape;
    std::vector<float> values;
    {
      py::gil_scoped_release release;
      values = gguf_read_hf_weight(file, config, name, &shape);
    }
    return weight_array(std::move(values), shape);
  }, py::arg("file"), py::arg("config"), py::arg("name"));
}

}  // namespace lserve::bindings
