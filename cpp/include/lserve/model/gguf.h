// GGUF (v2/v3) reading: metadata, tensor infos, and bit-exact dequantisation (as gguf-py's
// dequantize does) of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors into float32. The file is
// memory-mapped; every read is bounds-checked so a corrupt or truncated file raises lserve::Error
// naming the path and the reason. gguf_model_config / gguf_for_each_weight turn a llama GGUF
// into a ModelConfig and Hugging Face-named weights (llama.cpp's q/k rotary permutation undone).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "lserve/model/config.h"
#include "lserve/tensor.h"

namespace lserve {

enum class GgufValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9,
  kU64 = 10, kI64 = 11, kF64 = 12,
};

struct GgufValue {
  GgufValueType type = GgufValueType::kU8;
  GgufValueType array_type = GgufValueType::kU8;  // element type when type == kArray
  int64_t int_value = 0;                          // integer and bool scalars
  double float_value = 0.0;                       // float scalars
  std::string string_value;
  std::vector<int64_t> ints;                      // integer / bool arrays
  std::vector<double> floats;                     // float arrays
  std::vector<std::string> strings;               // string arrays
};

// ggml tensor types lserve can dequantise.
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kBF16 = 30 };
const char* ggml_type_name(uint32_t type);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> shape;  // row-major (torch) order: ggml's ne reversed
  uint32_t type = 0;           // ggml type id
  uint64_t offset = 0;         // from the start of the data section
  uint64_t num_bytes = 0;
  int64_t numel() const;
};

class GgufFile {
 public:
  explicit GgufFile(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  std::vector<std::string> keys() const;
  bool has_key(const std::string& key) const { return metadata_.count(key) != 0; }
  const GgufValue& value(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;  // accepts integer values too
  bool get_bool(const std::string& key) const;
  const std::vector<std::string>& get_string_array(const std::string& key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool has_tensor(const std::string& name) const { return tensor_index_.count(name) != 0; }
  const GgufTensorInfo& tensor(const std::string& name) const;
  // Dequantised float32 values of a tensor, row-major in tensor(name).shape.
  std::vector<float> read_f32(const std::string& name) const;

 private:
  std::string path_;
  void* mapping_ = nullptr;
  size_t file_size_ = 0;
  uint32_t version_ = 0;
  uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// ModelConfig of a llama-architecture GGUF (other architectures raise, naming it).
ModelConfig gguf_model_config(const GgufFile& file);

// Hugging Face names of the weights the GGUF holds, in file order.
std::vector<std::string> gguf_hf_weight_names(const GgufFile& file);
// One weight under its Hugging Face name: float32, q/k rows un-permuted to Hugging Face's layout.
std::vector<float> gguf_read_hf_weight(const GgufFile& file, const ModelConfig& config, const std::string& hf_name,
                                       std::vector<int64_t>* shape);
// Calls fn(hf_name, float32 tensor) for every weight; raises on a tensor it cannot map.
void gguf_for_each_weight(const GgufFile& file, const ModelConfig& config,
                          const std::function<void(const std::string&, const TensorView&)>& fn);

}  // namespace lserve
