// GGUF reader (mmap + bounds-checked cursor), dequantisation, llama config and HF name mapping.
#include "lserve/model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <regex>

#include "lserve/check.h"

namespace lserve {

namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kMaxCount = 1ULL << 32;    // sanity bound for counts and lengths

// Reads little-endian values from the mapped file; every read checks the remaining bytes.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& path) : data_(data), size_(size), path_(path) {}
  size_t position() const { return position_; }
  void need(uint64_t num_bytes, const char* what) const {
    LSERVE_CHECK(num_bytes <= size_ - position_, "GGUF file '", path_, "' is truncated: ", what, " needs ", num_bytes,
                 " bytes at offset ", position_, ", only ", size_ - position_, " left");
  }
  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, data_ + position_, sizeof(T));
    position_ += sizeof(T);
    return value;
  }
  std::string read_string(const char* what) {
    const uint64_t length = read<uint64_t>(what);
    LSERVE_CHECK(length < kMaxCount, "GGUF file '", path_, "': ", what, " has an absurd length ", length);
    need(length, what);
    std::string out(reinterpret_cast<const char*>(data_ + position_), static_cast<size_t>(length));
    position_ += static_cast<size_t>(length);
    return out;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t position_ = 0;
  const std::string& path_;
};

bool is_integer_type(GgufValueType type) {
  switch (type) {
    case GgufValueType::kU8: case GgufValueType::kI8: case GgufValueType::kU16: case GgufValueType::kI16:
    case GgufValueType::kU32: case GgufValueType::kI32: case GgufValueType::kU64: case GgufValueType::kI64:
    case GgufValueType::kBool:
      return true;
    default:
      return false;
  }
}

int64_t read_integer(Cursor& cursor, GgufValueType type) {
  switch (type) {
    case GgufValueType::kU8: return cursor.read<uint8_t>("u8");
    case GgufValueType::kI8: return cursor.read<int8_t>("i8");
    case GgufValueType::kU16: return cursor.read<uint16_t>("u16");
    case GgufValueType::kI16: return cursor.read<int16_t>("i16");
    case GgufValueType::kU32: return cursor.read<uint32_t>("u32");
    case GgufValueType::kI32: return cursor.read<int32_t>("i32");
    case GgufValueType::kU64: return static_cast<int64_t>(cursor.read<uint64_t>("u64"));
    case GgufValueType::kI64: return cursor.read<int64_t>("i64");
    case GgufValueType::kBool: return cursor.read<uint8_t>("bool") != 0;
    default: return 0;
  }
}

GgufValue read_value(Cursor& cursor, uint32_t raw_type, const std::string& key, const std::string& path) {
  LSERVE_CHECK(raw_type <= 12, "GGUF file '", path, "': key '", key, "' has unknown value type ", raw_type);
  GgufValue value;
  value.type = static_cast<GgufValueType>(raw_type);
  if (is_integer_type(value.type)) {
    value.int_value = read_integer(cursor, value.type);
  } else if (value.type == GgufValueType::kF32) {
    value.float_value = cursor.read<float>("f32");
  } else if (value.type == GgufValueType::kF64) {
    value.float_value = cursor.read<double>("f64");
  } else if (value.type == GgufValueType::kString) {
    value.string_value = cursor.read_string("string value");
  } else {  // array
    const uint32_t element_type = cursor.read<uint32_t>("array type");
    const uint64_t count = cursor.read<uint64_t>("array length");
    LSERVE_CHECK(element_type <= 12 && element_type != 9, "GGUF file '", path, "': key '", key,
                 "' has an array of unsupported type ", element_type);
    LSERVE_CHECK(count < kMaxCount, "GGUF file '", path, "': key '", key, "' has an absurd array length ", count);
    value.array_type = static_cast<GgufValueType>(element_type);
    for (uint64_t i = 0; i < count; ++i) {
      if (is_integer_type(value.array_type)) {
        value.ints.push_back(read_integer(cursor, value.array_type));
      } else if (value.array_type == GgufValueType::kF32) {
        value.floats.push_back(cursor.read<float>("f32"));
      } else if (value.array_type == GgufValueType::kF64) {
        value.floats.push_back(cursor.read<double>("f64"));
      } else {
        value.strings.push_back(cursor.read_string("string array element"));
      }
    }
  }
  return value;
}

// (bytes per block, elements per block) of a ggml type; 0 when unsupported.
std::pair<uint64_t, uint64_t> block_layout(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32: return {4, 1};
    case GgmlType::kF16: return {2, 1};
    case GgmlType::kBF16: return {2, 1};
    case GgmlType::kQ8_0: return {34, 32};
    case GgmlType::kQ4_0: return {18, 32};
    case GgmlType::kQ4_1: return {20, 32};
  }
  return {0, 0};
}

float half_at(const uint8_t* bytes) {
  f16_t value;
  std::memcpy(&value.bits, bytes, 2);
  return f16_to_float(value);
}

}  // namespace

const char* ggml_type_name(uint32_t type) {
  switch (type) {
    case 0: return "F32";
    case 1: return "F16";
    case 2: return "Q4_0";
    case 3: return "Q4_1";
    case 6: return "Q5_0";
    case 7: return "Q5_1";
    case 8: return "Q8_0";
    case 10: return "Q2_K";
    case 11: return "Q3_K";
    case 12: return "Q4_K";
    case 13: return "Q5_K";
    case 14: return "Q6_K";
    case 15: return "Q8_K";
    case 30: return "BF16";
  }
  return "unknown";
}

int64_t GgufTensorInfo::numel() const {
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  return count;
}

GgufFile::GgufFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  LSERVE_CHECK(fd >= 0, "cannot open GGUF file '", path, "': ", std::strerror(errno));
  struct stat info;
  if (::fstat(fd, &info) != 0 || info.st_size < 24) {
    ::close(fd);
    LSERVE_THROW("GGUF file '", path, "' is too short to hold a header");
  }
  file_size_ = static_cast<size_t>(info.st_size);
  mapping_ = ::mmap(nullptr, file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  LSERVE_CHECK(mapping_ != MAP_FAILED, "cannot map GGUF file '", path, "': ", std::strerror(errno));
  try {
    Cursor cursor(static_cast<const uint8_t*>(mapping_), file_size_, path_);
    LSERVE_CHECK(cursor.read<uint32_t>("magic") == kGgufMagic, "'", path, "' is not a GGUF file (bad magic)");
    version_ = cursor.read<uint32_t>("version");
    LSERVE_CHECK(version_ == 2 || version_ == 3, "GGUF file '", path, "' has unsupported version ", version_,
                 " (lserve reads versions 2 and 3)");
    const uint64_t tensor_count = cursor.read<uint64_t>("tensor count");
    const uint64_t kv_count = cursor.read<uint64_t>("metadata count");
    LSERVE_CHECK(tensor_count < (1u << 20) && kv_count < (1u << 20), "GGUF file '", path, "' declares ",
                 tensor_count, " tensors and ", kv_count, " metadata entries: corrupt header");
    for (uint64_t i = 0; i < kv_count; ++i) {
      std::string key = cursor.read_string("metadata key");
      const uint32_t type = cursor.read<uint32_t>("metadata type");
      metadata_[key] = read_value(cursor, type, key, path_);
    }
    for (uint64_t i = 0; i < tensor_count; ++i) {
      GgufTensorInfo tensor;
      tensor.name = cursor.read_string("tensor name");
      const uint32_t num_dims = cursor.read<uint32_t>("tensor rank");
      LSERVE_CHECK(num_dims >= 1 && num_dims <= 4, "GGUF file '", path, "': tensor '", tensor.name, "' has rank ",
                   num_dims);
      std::vector<int64_t> ne(num_dims);
      for (uint32_t d = 0; d < num_dims; ++d) {
        const uint64_t extent = cursor.read<uint64_t>("tensor dim");
        LSERVE_CHECK(extent >= 1 && extent < kMaxCount, "GGUF file '", path, "': tensor '", tensor.name,
                     "' has dimension ", extent);
        ne[d] = static_cast<int64_t>(extent);
      }
      tensor.shape.assign(ne.rbegin(), ne.rend());
      tensor.type = cursor.read<uint32_t>("tensor type");
      tensor.offset = cursor.read<uint64_t>("tensor offset");
      const auto [block_bytes, block_elems] = block_layout(tensor.type);
      if (block_bytes != 0) {
        LSERVE_CHECK(ne[0] % static_cast<int64_t>(block_elems) == 0, "GGUF file '", path, "': tensor '", tensor.name,
                     "' rows of ", ne[0], " are not whole ", ggml_type_name(tensor.type), " blocks");
        tensor.num_bytes = static_cast<uint64_t>(tensor.numel()) / block_elems * block_bytes;
      }
      LSERVE_CHECK(!tensor_index_.count(tensor.name), "GGUF file '", path, "': tensor '", tensor.name,
                   "' appears twice");
      tensor_index_[tensor.name] = tensors_.size();
      tensors_.push_back(std::move(tensor));
    }
    uint64_t alignment = 32;
    if (has_key("general.alignment")) {
      alignment = static_cast<uint64_t>(get_int("general.alignment"));
      LSERVE_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, "GGUF file '", path,
                   "': general.alignment ", alignment, " is not a power of two");
    }
    data_offset_ = (cursor.position() + alignment - 1) / alignment * alignment;
    for (const GgufTensorInfo& tensor : tensors_) {
      LSERVE_CHECK(tensor.offset % alignment == 0, "GGUF file '", path, "': tensor '", tensor.name, "' offset ",
                   tensor.offset, " is not aligned to ", alignment);
      LSERVE_CHECK(data_offset_ + tensor.offset + tensor.num_bytes <= file_size_, "GGUF file '", path,
                   "' is truncated: tensor '", tensor.name, "' ends at byte ",
                   data_offset_ + tensor.offset + tensor.num_bytes, " of ", file_size_);
    }
  } catch (...) {
    ::munmap(mapping_, file_size_);
    mapping_ = nullptr;
    throw;
  }
}

GgufFile::~GgufFile() {
  if (mapping_) ::munmap(mapping_, file_size_);
}

std::vector<std::string> GgufFile::keys() const {
  std::vector<std::string> out;
  for (const auto& entry : metadata_) out.push_back(entry.first);
  return out;
}

const GgufValue& GgufFile::value(const std::string& key) const {
  auto it = metadata_.find(key);
  LSERVE_CHECK(it != metadata_.end(), "GGUF file '", path_, "' has no metadata key '", key, "'");
  return it->second;
}

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = value(key);
  LSERVE_CHECK(v.type == GgufValueType::kString, "GGUF metadata '", key, "' is not a string");
  return v.string_value;
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& v = value(key);
  LSERVE_CHECK(is_integer_type(v.type), "GGUF metadata '", key, "' is not an integer");
  return v.int_value;
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& v = value(key);
  if (is_integer_type(v.type)) return static_cast<double>(v.int_value);
  LSERVE_CHECK(v.type == GgufValueType::kF32 || v.type == GgufValueType::kF64, "GGUF metadata '", key,
               "' is not a number");
  return v.float_value;
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = value(key);
  LSERVE_CHECK(is_integer_type(v.type), "GGUF metadata '", key, "' is not a bool");
  return v.int_value != 0;
}

const std::vector<std::string>& GgufFile::get_string_array(const std::string& key) const {
  const GgufValue& v = value(key);
  LSERVE_CHECK(v.type == GgufValueType::kArray && v.array_type == GgufValueType::kString, "GGUF metadata '", key,
               "' is not a string array");
  return v.strings;
}

const GgufTensorInfo& GgufFile::tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  LSERVE_CHECK(it != tensor_index_.end(), "GGUF file '", path_, "' has no tensor '", name, "'");
  return tensors_[it->second];
}

std::vector<float> GgufFile::read_f32(const std::string& name) const {
  const GgufTensorInfo& info = tensor(name);
  const auto [block_bytes, block_elems] = block_layout(info.type);
  LSERVE_CHECK(block_bytes != 0, "GGUF file '", path_, "': tensor '", name, "' has type ", ggml_type_name(info.type),
               " (", info.type, "), which lserve cannot dequantise (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
  const uint8_t* data = static_cast<const uint8_t*>(mapping_) + data_offset_ + info.offset;
  const int64_t count = info.numel();
  std::vector<float> out(static_cast<size_t>(count));
  switch (static_cast<GgmlType>(info.type)) {
    case GgmlType::kF32:
      std::memcpy(out.data(), data, static_cast<size_t>(count) * 4);
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < count; ++i) out[i] = half_at(data + 2 * i);
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < count; ++i) {
        bf16_t value;
        std::memcpy(&value.bits, data + 2 * i, 2);
        out[i] = bf16_to_float(value);
      }
      break;
    case GgmlType::kQ8_0:  // d (f16), 32 x int8: x = d * q
      for (int64_t block = 0; block < count / 32; ++block) {
        const uint8_t* b = data + block * 34;
        const float d = half_at(b);
        for (int j = 0; j < 32; ++j) out[block * 32 + j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
      }
      break;
    case GgmlType::kQ4_0:  // d (f16), 16 bytes of nibbles: low nibbles first, x = d * (q - 8)
      for (int64_t block = 0; block < count / 32; ++block) {
        const uint8_t* b = data + block * 18;
        const float d = half_at(b);
        for (int j = 0; j < 16; ++j) {
          out[block * 32 + j] = d * static_cast<float>(static_cast<int>(b[2 + j] & 0x0f) - 8);
          out[block * 32 + 16 + j] = d * static_cast<float>(static_cast<int>(b[2 + j] >> 4) - 8);
        }
      }
      break;
    case GgmlType::kQ4_1:  // d (f16), m (f16), 16 bytes of nibbles: x = d * q + m
      for (int64_t block = 0; block < count / 32; ++block) {
        const uint8_t* b = data + block * 20;
        const float d = half_at(b), m = half_at(b + 2);
        for (int j = 0; j < 16; ++j) {
          const float low = d * static_cast<float>(b[4 + j] & 0x0f);
          const float high = d * static_cast<float>(b[4 + j] >> 4);
          out[block * 32 + j] = low + m;
          out[block * 32 + 16 + j] = high + m;
        }
      }
      break;
  }
  return out;
}

ModelConfig gguf_model_config(const GgufFile& file) {
  const std::string arch = file.has_key("general.architecture") ? file.get_string("general.architecture") : "";
  LSERVE_CHECK(arch == "llama", "GGUF file '", file.path(), "' has architecture '", arch,
               "'; lserve reads llama-architecture GGUF files");
  auto key = [&](const std::string& suffix) { return arch + "." + suffix; };
  ModelConfig config;
  config.architecture = "LlamaForCausalLM";
  config.num_layers = static_cast<int>(file.get_int(key("block_count")));
  config.hidden_size = static_cast<int>(file.get_int(key("embedding_length")));
  config.intermediate_size = static_cast<int>(file.get_int(key("feed_forward_length")));
  config.num_qo_heads = static_cast<int>(file.get_int(key("attention.head_count")));
  config.num_kv_heads = file.has_key(key("attention.head_count_kv"))
                            ? static_cast<int>(file.get_int(key("attention.head_count_kv")))
                            : config.num_qo_heads;
  if (file.has_key(key("attention.key_length"))) {
    config.head_dim = static_cast<int>(file.get_int(key("attention.key_length")));
  } else if (config.num_qo_heads > 0) {
    config.head_dim = config.hidden_size / config.num_qo_heads;
  }
  if (file.has_key(key("rope.dimension_count")) && config.head_dim > 0) {
    config.partial_rotary_factor = static_cast<double>(file.get_int(key("rope.dimension_count"))) / config.head_dim;
  }
  config.rms_norm_eps = file.get_float(key("attention.layer_norm_rms_epsilon"));
  config.rope_theta = file.has_key(key("rope.freq_base")) ? file.get_float(key("rope.freq_base")) : 10000.0;
  config.max_position_embeddings =
      file.has_key(key("context_length")) ? static_cast<int>(file.get_int(key("context_length"))) : 2048;
  if (file.has_key("tokenizer.ggml.tokens")) {
    config.vocab_size = static_cast<int>(file.get_string_array("tokenizer.ggml.tokens").size());
  } else {
    config.vocab_size = static_cast<int>(file.get_int(key("vocab_size")));
  }
  if (file.has_key(key("rope.scaling.type"))) {
    const std::string type = file.get_string(key("rope.scaling.type"));
    if (type != "none") {
      config.rope_scaling.rope_type = type;
      config.rope_scaling.factor = file.get_float(key("rope.scaling.factor"));
      if (file.has_key(key("rope.scaling.original_context_length"))) {
        config.rope_scaling.original_max_position_embeddings =
            static_cast<int>(file.get_int(key("rope.scaling.original_context_length")));
      }
    }
  }
  config.tie_word_embeddings = !file.has_tensor("output.weight");
  config.attention_bias = file.has_tensor("blk.0.attn_q.bias");
  if (file.has_key("tokenizer.ggml.bos_token_id")) {
    config.bos_token_id = static_cast<int>(file.get_int("tokenizer.ggml.bos_token_id"));
  }
  if (file.has_key("tokenizer.ggml.eos_token_id")) {
    config.eos_token_id = static_cast<int>(file.get_int("tokenizer.ggml.eos_token_id"));
  }
  config.validate();
  return config;
}

namespace {

// GGUF name -> Hugging Face name; empty when the name is unknown.
std::string hf_name_of(const std::string& gguf_name) {
  static const std::map<std::string, std::string> kGlobal = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  static const std::map<std::string, std::string> kLayer = {
      {"attn_q", "self_attn.q_proj"},   {"attn_k", "self_attn.k_proj"},   {"attn_v", "self_attn.v_proj"},
      {"attn_output", "self_attn.o_proj"}, {"ffn_gate", "mlp.gate_proj"}, {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"},    {"attn_norm", "input_layernorm"}, {"ffn_norm", "post_attention_layernorm"},
  };
  auto global = kGlobal.find(gguf_name);
  if (global != kGlobal.end()) return global->second;
  static const std::regex kPattern(R"(blk\.(\d+)\.([a-z_]+)\.(weight|bias))");
  std::smatch match;
  if (!std::regex_match(gguf_name, match, kPattern)) return "";
  auto layer = kLayer.find(match[2].str());
  if (layer == kLayer.end()) return "";
  return "model.layers." + match[1].str() + "." + layer->second + "." + match[3].str();
}

std::string gguf_name_of(const GgufFile& file, const std::string& hf_name) {
  for (const GgufTensorInfo& tensor : file.tensors()) {
    if (hf_name_of(tensor.name) == hf_name) return tensor.name;
  }
  LSERVE_THROW("GGUF file '", file.path(), "' has no tensor for weight '", hf_name, "'");
}

// Undoes llama.cpp's rotary permutation of q/k rows: within each head, GGUF stores row
// (i * 2 + j) where Hugging Face has row (j * half + i), half = rows_per_head / 2.
std::vector<float> unpermute_rows(const std::vector<float>& values, int64_t num_rows, int64_t row_width,
                                  int64_t num_heads) {
  const int64_t rows_per_head = num_rows / num_heads, half = rows_per_head / 2;
  std::vector<float> out(values.size());
  for (int64_t head = 0; head < num_heads; ++head) {
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t src = head * rows_per_head + i * 2 + j, dst = head * rows_per_head + j * half + i;
        std::memcpy(&out[static_cast<size_t>(dst * row_width)], &values[static_cast<size_t>(src * row_width)],
                    static_cast<size_t>(row_width) * sizeof(float));
      }
    }
  }
  return out;
}

}  // namespace

std::vector<std::string> gguf_hf_weight_names(const GgufFile& file) {
  std::vector<std::string> names;
  for (const GgufTensorInfo& tensor : file.tensors()) {
    const std::string name = hf_name_of(tensor.name);
    LSERVE_CHECK(!name.empty(), "GGUF file '", file.path(), "' has tensor '", tensor.name,
                 "', which lserve cannot map to a llama weight");
    names.push_back(name);
  }
  return names;
}

std::vector<float> gguf_read_hf_weight(const GgufFile& file, const ModelConfig& config, const std::string& hf_name,
                                       std::vector<int64_t>* shape) {
  const std::string gguf_name = gguf_name_of(file, hf_name);
  const GgufTensorInfo& info = file.tensor(gguf_name);
  std::vector<float> values = file.read_f32(gguf_name);
  if (shape) *shape = info.shape;
  const bool is_q = hf_name.find("self_attn.q_proj.") != std::string::npos;
  const bool is_k = hf_name.find("self_attn.k_proj.") != std::string::npos;
  if (is_q || is_k) {
    const int64_t num_rows = info.shape[0];
    const int64_t row_width = info.shape.size() > 1 ? info.shape[1] : 1;
    const int64_t num_heads = is_q ? config.num_qo_heads : config.num_kv_heads;
    LSERVE_CHECK(num_rows % (2 * num_heads) == 0, "GGUF tensor '", gguf_name, "' has ", num_rows,
                 " rows, not a multiple of 2 * ", num_heads, " heads");
    values = unpermute_rows(values, num_rows, row_width, num_heads);
  }
  return values;
}

void gguf_for_each_weight(const GgufFile& file, const ModelConfig& config,
                          const std::function<void(const std::string&, const TensorView&)>& fn) {
  for (const std::string& name : gguf_hf_weight_names(file)) {
    std::vector<int64_t> shape;
    std::vector<float> values = gguf_read_hf_weight(file, config, name, &shape);
    fn(name, TensorView::contiguous(values.data(), DType::kF32, shape.data(), static_cast<int>(shape.size())));
  }
}

}  // namespace lserve
