// GGUF reader: mmap, bounds-checked parsing of header / metadata / tensor infos, dequantisation to
// float32 (bit-exact with gguf-py quants.py), and the llama -> ModelConfig / Hugging Face weight
// mapping. Layout reference: ggml docs/gguf.md and gguf-py gguf_reader.py; name mapping and the
// rotary un-permutation: transformers modeling_gguf_pytorch_utils.py (LlamaTensorProcessor).
#include "lserve/model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <sstream>

namespace lserve {

namespace {

constexpr uint64_t kMaxAlignment = uint64_t{1} << 30;
constexpr int kMaxArrayDepth = 16;  // arrays of arrays; deeper nesting is treated as corruption
constexpr uint32_t kMaxTensorDims = 4;  // GGML_MAX_DIMS
constexpr double kPi = 3.14159265358979323846;

// (block_size, type_size) per ggml type id: gguf-py constants.GGML_QUANT_SIZES. Lets tensors of
// any known type be parsed and bounds-checked, though read_f32 dequantises only six of them.
struct GgmlTypeTraits {
  uint32_t id;
  const char* name;
  uint64_t block_size;
  uint64_t type_size;
};
constexpr GgmlTypeTraits kGgmlTypes[] = {
    {0, "F32", 1, 4},          {1, "F16", 1, 2},          {2, "Q4_0", 32, 18},
    {3, "Q4_1", 32, 20},       {6, "Q5_0", 32, 22},       {7, "Q5_1", 32, 24},
    {8, "Q8_0", 32, 34},       {9, "Q8_1", 32, 40},       {10, "Q2_K", 256, 84},
    {11, "Q3_K", 256, 110},    {12, "Q4_K", 256, 144},    {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},    {15, "Q8_K", 256, 292},    {16, "IQ2_XXS", 256, 66},
    {17, "IQ2_XS", 256, 74},   {18, "IQ3_XXS", 256, 98},  {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},    {21, "IQ3_S", 256, 110},   {22, "IQ2_S", 256, 82},
    {23, "IQ4_XS", 256, 136},  {24, "I8", 1, 1},          {25, "I16", 1, 2},
    {26, "I32", 1, 4},         {27, "I64", 1, 8},         {28, "F64", 1, 8},
    {29, "IQ1_M", 256, 56},    {30, "BF16", 1, 2},        {34, "TQ1_0", 256, 54},
    {35, "TQ2_0", 256, 66},    {39, "MXFP4", 32, 17},     {40, "NVFP4", 64, 36},
    {41, "Q1_0", 128, 18},
};

const GgmlTypeTraits* find_ggml_type(uint32_t id) {
  for (const GgmlTypeTraits& traits : kGgmlTypes) {
    if (traits.id == id) return &traits;
  }
  return nullptr;
}

// Bytes one item of a metadata type occupies at least (strings: the length prefix; arrays: the
// item type and count). Bounds the item count of an array before anything is allocated.
uint64_t min_item_bytes(GgufValueType type) {
  switch (type) {
    case GgufValueType::kU8: case GgufValueType::kI8: case GgufValueType::kBool: return 1;
    case GgufValueType::kU16: case GgufValueType::kI16: return 2;
    case GgufValueType::kU32: case GgufValueType::kI32: case GgufValueType::kF32: return 4;
    case GgufValueType::kU64: case GgufValueType::kI64: case GgufValueType::kF64: return 8;
    case GgufValueType::kString: return 8;
    case GgufValueType::kArray: return 12;
  }
  return 1;
}

bool is_integer_type(GgufValueType type) {
  switch (type) {
    case GgufValueType::kU8: case GgufValueType::kI8: case GgufValueType::kU16: case GgufValueType::kI16:
    case GgufValueType::kU32: case GgufValueType::kI32: case GgufValueType::kU64: case GgufValueType::kI64:
      return true;
    default:
      return false;
  }
}

bool is_float_type(GgufValueType type) { return type == GgufValueType::kF32 || type == GgufValueType::kF64; }

bool is_known_value_type(uint32_t raw) { return raw <= static_cast<uint32_t>(GgufValueType::kF64); }

// True when `text` is well-formed UTF-8 (no overlongs, surrogates or code points past U+10FFFF).
bool is_valid_utf8(const std::string& text) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(text.data());
  const size_t size = text.size();
  size_t pos = 0;
  while (pos < size) {
    const unsigned char lead = bytes[pos];
    size_t length;
    uint32_t code_point;
    if (lead < 0x80) {
      ++pos;
      continue;
    } else if ((lead & 0xe0) == 0xc0) {
      length = 2, code_point = lead & 0x1f;
    } else if ((lead & 0xf0) == 0xe0) {
      length = 3, code_point = lead & 0x0f;
    } else if ((lead & 0xf8) == 0xf0) {
      length = 4, code_point = lead & 0x07;
    } else {
      return false;
    }
    if (length > size - pos) return false;
    for (size_t idx = 1; idx < length; ++idx) {
      if ((bytes[pos + idx] & 0xc0) != 0x80) return false;
      code_point = (code_point << 6) | (bytes[pos + idx] & 0x3f);
    }
    constexpr uint32_t kMinForLength[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (code_point < kMinForLength[length] || code_point > 0x10ffff || (code_point >= 0xd800 && code_point <= 0xdfff)) {
      return false;
    }
    pos += length;
  }
  return true;
}

// A bounds-checked little-endian reader over the mapping. Every failure names the file, what was
// being read and the offset.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& path) : data_(data), size_(size), path_(path) {}

  size_t offset() const { return offset_; }
  uint64_t remaining() const { return size_ - offset_; }

  void need(uint64_t num_bytes, const std::string& what) const {
    if (num_bytes > remaining()) {
      LSERVE_THROW(path_, ": truncated file: ", what, " needs ", num_bytes, " bytes at offset ", offset_,
                   " but the file has ", size_, " bytes");
    }
  }

  template <typename T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, data_ + offset_, sizeof(T));
    offset_ += sizeof(T);
    return value;
  }

  std::string read_string(const std::string& what) {
    const uint64_t length = read<uint64_t>(what + " (length)");
    if (length > remaining()) {
      LSERVE_THROW(path_, ": ", what, " claims ", length, " bytes at offset ", offset_, " but only ", remaining(),
                   " remain in the file");
    }
    std::string out(reinterpret_cast<const char*>(data_ + offset_), static_cast<size_t>(length));
    offset_ += static_cast<size_t>(length);
    return out;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t offset_ = 0;
  const std::string& path_;
};

GgufValue read_value(Cursor& cursor, GgufValueType type, const std::string& what, const std::string& path,
                     int depth);

// Appends one item of `type` to `value` (which holds the vectors).
void read_item(Cursor& cursor, GgufValueType type, GgufValue& value, const std::string& what,
               const std::string& path, int depth) {
  switch (type) {
    case GgufValueType::kU8: value.ints.push_back(cursor.read<uint8_t>(what)); break;
    case GgufValueType::kI8: value.ints.push_back(cursor.read<int8_t>(what)); break;
    case GgufValueType::kU16: value.ints.push_back(cursor.read<uint16_t>(what)); break;
    case GgufValueType::kI16: value.ints.push_back(cursor.read<int16_t>(what)); break;
    case GgufValueType::kU32: value.ints.push_back(cursor.read<uint32_t>(what)); break;
    case GgufValueType::kI32: value.ints.push_back(cursor.read<int32_t>(what)); break;
    case GgufValueType::kU64: value.ints.push_back(static_cast<int64_t>(cursor.read<uint64_t>(what))); break;
    case GgufValueType::kI64: value.ints.push_back(cursor.read<int64_t>(what)); break;
    case GgufValueType::kF32: value.floats.push_back(cursor.read<float>(what)); break;
    case GgufValueType::kF64: value.floats.push_back(cursor.read<double>(what)); break;
    case GgufValueType::kBool: {
      const uint8_t byte = cursor.read<uint8_t>(what);
      if (byte > 1) {
        LSERVE_THROW(path, ": ", what, " is a bool stored as ", static_cast<int>(byte), " (expected 0 or 1) at offset ",
                     cursor.offset() - 1);
      }
      value.ints.push_back(byte);
      break;
    }
    case GgufValueType::kString: value.strings.push_back(cursor.read_string(what)); break;
    case GgufValueType::kArray: value.arrays.push_back(read_value(cursor, type, what, path, depth + 1)); break;
  }
}

GgufValue read_value(Cursor& cursor, GgufValueType type, const std::string& what, const std::string& path,
                     int depth) {
  GgufValue value;
  value.type = type;
  value.element_type = type;
  if (type != GgufValueType::kArray) {
    read_item(cursor, type, value, what, path, depth);
    return value;
  }
  if (depth > kMaxArrayDepth) {
    LSERVE_THROW(path, ": ", what, " nests arrays more than ", kMaxArrayDepth, " deep at offset ", cursor.offset());
  }
  const uint32_t raw_element_type = cursor.read<uint32_t>(what + " (array item type)");
  if (!is_known_value_type(raw_element_type)) {
    LSERVE_THROW(path, ": ", what, " has unknown array item type ", raw_element_type, " at offset ",
                 cursor.offset() - 4);
  }
  value.element_type = static_cast<GgufValueType>(raw_element_type);
  const uint64_t num_items = cursor.read<uint64_t>(what + " (array length)");
  const uint64_t item_bytes = min_item_bytes(value.element_type);
  if (num_items > cursor.remaining() / item_bytes) {
    LSERVE_THROW(path, ": ", what, " claims ", num_items, " items of type ", gguf_value_type_name(value.element_type),
                 " but only ", cursor.remaining(), " bytes remain in the file");
  }
  const size_t count = static_cast<size_t>(num_items);
  switch (value.element_type) {
    case GgufValueType::kF32: case GgufValueType::kF64: value.floats.reserve(count); break;
    case GgufValueType::kString: value.strings.reserve(count); break;
    case GgufValueType::kArray: value.arrays.reserve(count); break;
    default: value.ints.reserve(count); break;
  }
  for (size_t item_idx = 0; item_idx < count; ++item_idx) {
    read_item(cursor, value.element_type, value, what, path, depth);
  }
  return value;
}

// ---- dequantisation (gguf-py quants.py: BF16, Q4_0, Q4_1, Q8_0 dequantize_blocks) ----------------
// Exactness: d is an f16 (11 significant bits) times an integer of at most 8 bits, so every
// product is exact in float32 and the result does not depend on FMA contraction.

float load_f16(const uint8_t* bytes) {
  f16_t half;
  std::memcpy(&half.bits, bytes, 2);
  return f16_to_float(half);
}

void dequantize_q8_0(const uint8_t* src, int64_t num_blocks, float* out) {
  for (int64_t block_idx = 0; block_idx < num_blocks; ++block_idx) {
    const uint8_t* block = src + block_idx * 34;
    const float scale = load_f16(block);
    const int8_t* quants = reinterpret_cast<const int8_t*>(block + 2);
    for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(quants[i]) * scale;
    out += 32;
  }
}

void dequantize_q4_0(const uint8_t* src, int64_t num_blocks, float* out) {
  for (int64_t block_idx = 0; block_idx < num_blocks; ++block_idx) {
    const uint8_t* block = src + block_idx * 18;
    const float scale = load_f16(block);
    const uint8_t* nibbles = block + 2;
    for (int i = 0; i < 16; ++i) {  // low nibbles are items 0..15, high nibbles items 16..31
      out[i] = scale * static_cast<float>(static_cast<int>(nibbles[i] & 0x0f) - 8);
      out[i + 16] = scale * static_cast<float>(static_cast<int>(nibbles[i] >> 4) - 8);
    }
    out += 32;
  }
}

void dequantize_q4_1(const uint8_t* src, int64_t num_blocks, float* out) {
  for (int64_t block_idx = 0; block_idx < num_blocks; ++block_idx) {
    const uint8_t* block = src + block_idx * 20;
    const float scale = load_f16(block);
    const float minimum = load_f16(block + 2);
    const uint8_t* nibbles = block + 4;
    for (int i = 0; i < 16; ++i) {
      out[i] = scale * static_cast<float>(nibbles[i] & 0x0f) + minimum;
      out[i + 16] = scale * static_cast<float>(nibbles[i] >> 4) + minimum;
    }
    out += 32;
  }
}

int to_int(int64_t value, const std::string& key) {
  LSERVE_CHECK(value >= std::numeric_limits<int>::min() && value <= std::numeric_limits<int>::max(), "GGUF key '",
               key, "' = ", value, " does not fit a 32-bit int");
  return static_cast<int>(value);
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream stream;
  stream << "(";
  for (size_t dim = 0; dim < shape.size(); ++dim) stream << (dim ? ", " : "") << shape[dim];
  stream << (shape.size() == 1 ? ",)" : ")");
  return stream.str();
}

// "a, b, c" of at most `limit` names, then "... and N more".
std::string name_list(const std::vector<std::string>& names, size_t limit = 8) {
  std::ostringstream stream;
  for (size_t idx = 0; idx < names.size() && idx < limit; ++idx) stream << (idx ? ", " : "") << names[idx];
  if (names.size() > limit) stream << " ... and " << names.size() - limit << " more";
  return stream.str();
}

}  // namespace

// ---- value helpers ------------------------------------------------------------------------------

const char* gguf_value_type_name(GgufValueType type) {
  switch (type) {
    case GgufValueType::kU8: return "uint8";
    case GgufValueType::kI8: return "int8";
    case GgufValueType::kU16: return "uint16";
    case GgufValueType::kI16: return "int16";
    case GgufValueType::kU32: return "uint32";
    case GgufValueType::kI32: return "int32";
    case GgufValueType::kF32: return "float32";
    case GgufValueType::kBool: return "bool";
    case GgufValueType::kString: return "string";
    case GgufValueType::kArray: return "array";
    case GgufValueType::kU64: return "uint64";
    case GgufValueType::kI64: return "int64";
    case GgufValueType::kF64: return "float64";
  }
  return "unknown";
}

size_t GgufValue::num_items() const {
  return ints.size() + floats.size() + strings.size() + arrays.size();
}

std::string ggml_type_name(uint32_t type) {
  const GgmlTypeTraits* traits = find_ggml_type(type);
  return traits ? std::string(traits->name) : "type" + std::to_string(type);
}

int64_t GgufTensorInfo::numel() const {
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  return count;
}

// ---- GgufFile -----------------------------------------------------------------------------------

GgufFile::GgufFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) LSERVE_THROW(path, ": cannot open: ", std::strerror(errno));
  struct stat status;
  if (::fstat(fd, &status) != 0) {
    const int saved = errno;
    ::close(fd);
    LSERVE_THROW(path, ": cannot stat: ", std::strerror(saved));
  }
  if (!S_ISREG(status.st_mode)) {
    ::close(fd);
    LSERVE_THROW(path, ": not a regular file");
  }
  size_ = static_cast<size_t>(status.st_size);
  if (size_ == 0) {
    ::close(fd);
    LSERVE_THROW(path, ": empty file (expected a GGUF header)");
  }
  void* mapping = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int saved = errno;
  ::close(fd);
  if (mapping == MAP_FAILED) LSERVE_THROW(path, ": mmap failed: ", std::strerror(saved));
  data_ = static_cast<const uint8_t*>(mapping);
  try {
    parse();
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(data_), size_);
    data_ = nullptr;
    throw;
  }
}

GgufFile::~GgufFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

void GgufFile::parse() {
  Cursor cursor(data_, size_, path_);
  cursor.need(4, "the magic");
  if (std::memcmp(data_, "GGUF", 4) != 0) {
    char shown[5] = {0, 0, 0, 0, 0};
    for (int i = 0; i < 4; ++i) shown[i] = std::isprint(data_[i]) ? static_cast<char>(data_[i]) : '?';
    LSERVE_THROW(path_, ": not a GGUF file: bad magic '", shown, "' (expected 'GGUF')");
  }
  cursor.read<uint32_t>("the magic");
  version_ = cursor.read<uint32_t>("the version");
  if (version_ != 2 && version_ != 3) {
    const uint32_t swapped = ((version_ & 0xffu) << 24) | ((version_ & 0xff00u) << 8) | ((version_ >> 8) & 0xff00u) |
                             (version_ >> 24);
    if (swapped == 2 || swapped == 3) LSERVE_THROW(path_, ": big-endian GGUF files are not supported");
    LSERVE_THROW(path_, ": unsupported GGUF version ", version_, " (supported: 2, 3)");
  }
  const uint64_t num_tensors = cursor.read<uint64_t>("the tensor count");
  const uint64_t num_kv = cursor.read<uint64_t>("the metadata count");
  // Each key-value pair takes at least 13 bytes (key length, type, one byte of value); each tensor
  // info at least 24 (name length, n_dims, type, offset).
  if (num_kv > cursor.remaining() / 13) {
    LSERVE_THROW(path_, ": absurd metadata count ", num_kv, " for a file of ", size_, " bytes");
  }
  if (num_tensors > cursor.remaining() / 24) {
    LSERVE_THROW(path_, ": absurd tensor count ", num_tensors, " for a file of ", size_, " bytes");
  }

  keys_.reserve(static_cast<size_t>(num_kv));
  for (uint64_t kv_idx = 0; kv_idx < num_kv; ++kv_idx) {
    const std::string where = "metadata entry " + std::to_string(kv_idx);
    std::string key = cursor.read_string(where + " key");
    if (!is_valid_utf8(key)) LSERVE_THROW(path_, ": ", where, " has a key that is not valid UTF-8");
    const std::string what = "metadata '" + key + "'";
    if (values_.count(key) != 0) LSERVE_THROW(path_, ": duplicate metadata key '", key, "'");
    const uint32_t raw_type = cursor.read<uint32_t>(what + " type");
    if (!is_known_value_type(raw_type)) {
      LSERVE_THROW(path_, ": ", what, " has unknown value type ", raw_type, " at offset ", cursor.offset() - 4);
    }
    values_.emplace(key, read_value(cursor, static_cast<GgufValueType>(raw_type), what, path_, 0));
    keys_.push_back(std::move(key));
  }

  if (has_key("general.alignment")) {
    const GgufValue& value = get("general.alignment");
    if (value.is_array() || !is_integer_type(value.type)) {
      LSERVE_THROW(path_, ": general.alignment has type ", gguf_value_type_name(value.type), " (expected uint32)");
    }
    const uint64_t alignment = static_cast<uint64_t>(value.ints[0]);
    if (alignment == 0 || alignment > kMaxAlignment || (alignment & (alignment - 1)) != 0) {
      LSERVE_THROW(path_, ": general.alignment = ", value.ints[0], " is not a power of two in [1, ", kMaxAlignment, "]");
    }
    alignment_ = alignment;
  }

  tensors_.reserve(static_cast<size_t>(num_tensors));
  for (uint64_t tensor_idx = 0; tensor_idx < num_tensors; ++tensor_idx) {
    GgufTensorInfo info;
    info.name = cursor.read_string("tensor info " + std::to_string(tensor_idx) + " name");
    if (!is_valid_utf8(info.name)) {
      LSERVE_THROW(path_, ": tensor info ", tensor_idx, " has a name that is not valid UTF-8");
    }
    const std::string what = "tensor '" + info.name + "'";
    if (tensor_index_.count(info.name) != 0) LSERVE_THROW(path_, ": duplicate tensor name '", info.name, "'");
    const uint32_t num_dims = cursor.read<uint32_t>(what + " n_dims");
    if (num_dims > kMaxTensorDims) {
      LSERVE_THROW(path_, ": ", what, " has ", num_dims, " dimensions (at most ", kMaxTensorDims, ")");
    }
    std::vector<int64_t> ne(num_dims);
    int64_t numel = 1;
    for (uint32_t dim = 0; dim < num_dims; ++dim) {
      const uint64_t extent = cursor.read<uint64_t>(what + " dimension");
      if (extent > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (extent != 0 && numel > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(extent))) {
        LSERVE_THROW(path_, ": ", what, " has an absurd dimension ", extent);
      }
      ne[dim] = static_cast<int64_t>(extent);
      numel *= ne[dim];
    }
    info.shape.assign(ne.rbegin(), ne.rend());
    info.ggml_type = cursor.read<uint32_t>(what + " type");
    const GgmlTypeTraits* traits = find_ggml_type(info.ggml_type);
    if (traits == nullptr) LSERVE_THROW(path_, ": ", what, " has unknown ggml type ", info.ggml_type);
    if (num_dims > 0 && ne[0] % static_cast<int64_t>(traits->block_size) != 0) {
      LSERVE_THROW(path_, ": ", what, " of type ", traits->name, " has a row of ", ne[0],
                   " items, not a multiple of its block size ", traits->block_size);
    }
    const uint64_t num_blocks = static_cast<uint64_t>(numel) / traits->block_size;
    if (num_blocks > size_ / traits->type_size) {
      LSERVE_THROW(path_, ": ", what, " of shape ", shape_string(info.shape), " and type ", traits->name,
                   " needs more bytes than the whole file (", size_, ")");
    }
    info.nbytes = num_blocks * traits->type_size;
    const uint64_t relative_offset = cursor.read<uint64_t>(what + " offset");
    if (relative_offset % alignment_ != 0) {
      LSERVE_THROW(path_, ": ", what, " data offset ", relative_offset, " is not a multiple of the alignment ",
                   alignment_);
    }
    info.offset = relative_offset;  // made absolute below, once the data section is known
    tensor_index_.emplace(info.name, tensors_.size());
    tensors_.push_back(std::move(info));
  }

  const uint64_t end_of_infos = cursor.offset();
  data_offset_ = (end_of_infos + alignment_ - 1) / alignment_ * alignment_;
  for (GgufTensorInfo& info : tensors_) {
    if (data_offset_ > size_ || info.offset > size_ - data_offset_ || info.nbytes > size_ - data_offset_ - info.offset) {
      LSERVE_THROW(path_, ": tensor '", info.name, "' data [", data_offset_ + info.offset, ", ",
                   data_offset_ + info.offset + info.nbytes, ") lies beyond the end of the file (", size_,
                   " bytes): truncated file?");
    }
    info.offset += data_offset_;
  }
}

const GgufValue& GgufFile::get(const std::string& key) const {
  auto found = values_.find(key);
  if (found == values_.end()) LSERVE_THROW(path_, ": missing metadata key '", key, "'");
  return found->second;
}

namespace {

[[noreturn]] void wrong_type(const std::string& path, const std::string& key, const GgufValue& value,
                             const char* expected) {
  std::string actual = gguf_value_type_name(value.type);
  if (value.is_array()) actual += std::string(" of ") + gguf_value_type_name(value.element_type);
  LSERVE_THROW(path, ": metadata '", key, "' has type ", actual, ", expected ", expected);
}

}  // namespace

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& value = get(key);
  if (value.type != GgufValueType::kString) wrong_type(path_, key, value, "string");
  return value.strings[0];
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& value = get(key);
  if (!is_integer_type(value.type)) wrong_type(path_, key, value, "an integer");
  if (value.type == GgufValueType::kU64 && value.ints[0] < 0) {
    LSERVE_THROW(path_, ": metadata '", key, "' = ", static_cast<uint64_t>(value.ints[0]), " does not fit int64");
  }
  return value.ints[0];
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& value = get(key);
  if (!is_float_type(value.type)) wrong_type(path_, key, value, "float32 or float64");
  return value.floats[0];
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& value = get(key);
  if (value.type != GgufValueType::kBool) wrong_type(path_, key, value, "bool");
  return value.ints[0] != 0;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufValue& value = get(key);
  if (!value.is_array() || value.element_type != GgufValueType::kString) wrong_type(path_, key, value, "array of string");
  return value.strings;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufValue& value = get(key);
  if (!value.is_array() || !is_integer_type(value.element_type)) wrong_type(path_, key, value, "array of integers");
  if (value.element_type == GgufValueType::kU64) {
    for (int64_t item : value.ints) {
      if (item < 0) {
        LSERVE_THROW(path_, ": metadata '", key, "' holds ", static_cast<uint64_t>(item), ", which does not fit int64");
      }
    }
  }
  return value.ints;
}

std::vector<double> GgufFile::get_float_array(const std::string& key) const {
  const GgufValue& value = get(key);
  if (!value.is_array() || !is_float_type(value.element_type)) wrong_type(path_, key, value, "array of floats");
  return value.floats;
}

const GgufTensorInfo& GgufFile::tensor(const std::string& name) const {
  auto found = tensor_index_.find(name);
  if (found == tensor_index_.end()) LSERVE_THROW(path_, ": no tensor named '", name, "'");
  return tensors_[found->second];
}

const uint8_t* GgufFile::tensor_data(const GgufTensorInfo& info) const { return data_ + info.offset; }

std::vector<float> GgufFile::read_f32(const std::string& name) const {
  const GgufTensorInfo& info = tensor(name);
  std::vector<float> out(static_cast<size_t>(info.numel()));
  read_f32(info, out.data());
  return out;
}

void GgufFile::read_f32(const GgufTensorInfo& info, float* out) const {
  const uint8_t* src = tensor_data(info);
  const int64_t numel = info.numel();
  switch (static_cast<GgmlType>(info.ggml_type)) {
    case GgmlType::kF32:
      std::memcpy(out, src, static_cast<size_t>(numel) * sizeof(float));
      return;
    case GgmlType::kF16:
      for (int64_t idx = 0; idx < numel; ++idx) out[idx] = load_f16(src + 2 * idx);
      return;
    case GgmlType::kBF16:
      for (int64_t idx = 0; idx < numel; ++idx) {
        bf16_t value;
        std::memcpy(&value.bits, src + 2 * idx, 2);
        out[idx] = bf16_to_float(value);
      }
      return;
    case GgmlType::kQ8_0: dequantize_q8_0(src, numel / 32, out); return;
    case GgmlType::kQ4_0: dequantize_q4_0(src, numel / 32, out); return;
    case GgmlType::kQ4_1: dequantize_q4_1(src, numel / 32, out); return;
  }
  LSERVE_THROW(path_, ": tensor '", info.name, "' has type ", ggml_type_name(info.ggml_type),
               ", which read_f32 cannot dequantise (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
}

// ---- llama: ModelConfig -------------------------------------------------------------------------

namespace {

// Llama 3.x files carry rope_freqs.weight, the per-frequency divisors of Meta's llama3 rope rule,
// instead of scaling metadata (llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
// Recover the rule: factor = the largest divisor, low/high frequency factors 1 and 4 and the
// original context 8192 (the converter's defaults), then check every value against it.
void infer_llama3_rope(const GgufFile& file, ModelConfig& config, const std::string& arch) {
  const GgufTensorInfo& info = file.tensor("rope_freqs.weight");
  const std::vector<float> divisors = file.read_f32(info.name);
  const int rotary_dim = config.rotary_dim();
  LSERVE_CHECK(static_cast<int>(divisors.size()) * 2 == rotary_dim, file.path(), ": rope_freqs.weight has ",
               divisors.size(), " values, expected rotary_dim / 2 = ", rotary_dim / 2);
  RopeScaling scaling;
  scaling.rope_type = "llama3";
  scaling.factor = *std::max_element(divisors.begin(), divisors.end());
  scaling.low_freq_factor = 1.0;
  scaling.high_freq_factor = 4.0;
  const std::string original_key = arch + ".rope.scaling.original_context_length";
  scaling.original_max_position_embeddings =
      file.has_key(original_key) ? to_int(file.get_int(original_key), original_key) : 8192;
  const double original = scaling.original_max_position_embeddings;
  const double low_freq_wavelen = original / scaling.low_freq_factor;
  const double high_freq_wavelen = original / scaling.high_freq_factor;
  for (size_t idx = 0; idx < divisors.size(); ++idx) {
    const float inv_freq = static_cast<float>(
        1.0 / std::pow(config.rope_theta, static_cast<double>(2 * idx) / static_cast<double>(rotary_dim)));
    const double wavelen = 2.0 * kPi / static_cast<double>(inv_freq);
    double expected;
    if (wavelen < high_freq_wavelen) {
      expected = 1.0;
    } else if (wavelen > low_freq_wavelen) {
      expected = scaling.factor;
    } else {
      const double smooth = (original / wavelen - scaling.low_freq_factor) /
                            (scaling.high_freq_factor - scaling.low_freq_factor);
      expected = 1.0 / ((1.0 - smooth) / scaling.factor + smooth);
    }
    if (std::fabs(divisors[idx] - expected) > 1e-4 * std::fabs(expected)) {
      LSERVE_THROW(file.path(), ": rope_freqs.weight[", idx, "] = ", divisors[idx],
                   " does not follow llama3 rope scaling (factor ", scaling.factor,
                   ", low_freq_factor 1, high_freq_factor 4, original context ", original, "), which gives ", expected);
    }
  }
  if (scaling.factor != 1.0) config.rope_scaling = scaling;
}

}  // namespace

ModelConfig gguf_model_config(const GgufFile& file) {
  const std::string arch = file.get_string("general.architecture");
  if (arch != "llama") {
    LSERVE_THROW(file.path(), ": GGUF architecture '", arch, "' is not supported (supported: llama)");
  }
  auto int_key = [&](const std::string& suffix) {
    const std::string key = arch + "." + suffix;
    return to_int(file.get_int(key), key);
  };
  auto positive = [&](int value, const std::string& what) {
    LSERVE_CHECK(value > 0, file.path(), ": ", what, " = ", value, " must be positive");
    return value;
  };

  ModelConfig config;
  config.architecture = "LlamaForCausalLM";
  if (file.has_key("tokenizer.ggml.tokens")) {
    const GgufValue& tokens = file.get("tokenizer.ggml.tokens");
    LSERVE_CHECK(tokens.is_array() && tokens.element_type == GgufValueType::kString, file.path(),
                 ": metadata 'tokenizer.ggml.tokens' must be an array of string");
    config.vocab_size = static_cast<int>(tokens.strings.size());
  } else {
    config.vocab_size = int_key("vocab_size");
  }
  positive(config.vocab_size, "vocab size");
  config.hidden_size = positive(int_key("embedding_length"), arch + ".embedding_length");
  config.intermediate_size = positive(int_key("feed_forward_length"), arch + ".feed_forward_length");
  config.num_layers = positive(int_key("block_count"), arch + ".block_count");
  config.num_qo_heads = positive(int_key("attention.head_count"), arch + ".attention.head_count");
  config.num_kv_heads = file.has_key(arch + ".attention.head_count_kv")
                            ? positive(int_key("attention.head_count_kv"), arch + ".attention.head_count_kv")
                            : config.num_qo_heads;
  LSERVE_CHECK(config.num_qo_heads % config.num_kv_heads == 0, file.path(), ": head_count ", config.num_qo_heads,
               " is not a multiple of head_count_kv ", config.num_kv_heads);

  const std::string key_length = arch + ".attention.key_length";
  const std::string rope_dims = arch + ".rope.dimension_count";
  if (file.has_key(key_length)) {
    config.head_dim = positive(int_key("attention.key_length"), key_length);
  } else if (file.has_key(rope_dims)) {
    config.head_dim = positive(int_key("rope.dimension_count"), rope_dims);
  } else {
    LSERVE_CHECK(config.hidden_size % config.num_qo_heads == 0, file.path(), ": embedding_length ",
                 config.hidden_size, " is not a multiple of head_count ", config.num_qo_heads,
                 " and the file states no head size");
    config.head_dim = config.hidden_size / config.num_qo_heads;
  }
  if (file.has_key(rope_dims)) {
    const int rotary_dim = positive(int_key("rope.dimension_count"), rope_dims);
    LSERVE_CHECK(rotary_dim <= config.head_dim && rotary_dim % 2 == 0, file.path(), ": ", rope_dims, " = ",
                 rotary_dim, " must be even and at most the head size ", config.head_dim);
    config.partial_rotary_factor = static_cast<double>(rotary_dim) / config.head_dim;
  }

  config.rms_norm_eps = file.get_float(arch + ".attention.layer_norm_rms_epsilon");
  LSERVE_CHECK(config.rms_norm_eps > 0, file.path(), ": layer_norm_rms_epsilon must be positive");
  if (file.has_key(arch + ".rope.freq_base")) config.rope_theta = file.get_float(arch + ".rope.freq_base");
  LSERVE_CHECK(config.rope_theta > 0, file.path(), ": rope.freq_base must be positive");
  config.max_position_embeddings = positive(int_key("context_length"), arch + ".context_length");

  const std::string scaling_type_key = arch + ".rope.scaling.type";
  const std::string scaling_type = file.has_key(scaling_type_key) ? file.get_string(scaling_type_key) : "none";
  auto scaling_float = [&](const std::string& suffix, double fallback) {
    const std::string key = arch + ".rope.scaling." + suffix;
    return file.has_key(key) ? file.get_float(key) : fallback;
  };
  const std::string original_key = arch + ".rope.scaling.original_context_length";
  if (scaling_type == "linear" || scaling_type == "yarn") {
    config.rope_scaling.rope_type = scaling_type;
    config.rope_scaling.factor = file.get_float(arch + ".rope.scaling.factor");
    LSERVE_CHECK(config.rope_scaling.factor > 0, file.path(), ": rope.scaling.factor must be positive");
    if (file.has_key(original_key)) {
      config.rope_scaling.original_max_position_embeddings = to_int(file.get_int(original_key), original_key);
    }
    if (scaling_type == "yarn") {
      config.rope_scaling.attention_factor = scaling_float("attn_factor", 0.0);
      config.rope_scaling.beta_fast = scaling_float("yarn_beta_fast", config.rope_scaling.beta_fast);
      config.rope_scaling.beta_slow = scaling_float("yarn_beta_slow", config.rope_scaling.beta_slow);
    }
  } else if (scaling_type != "none") {
    LSERVE_THROW(file.path(), ": ", scaling_type_key, " = '", scaling_type,
                 "' is not supported (supported: none, linear, yarn)");
  }
  if (file.has_tensor("rope_freqs.weight")) {
    LSERVE_CHECK(scaling_type == "none", file.path(), ": rope_freqs.weight together with ", scaling_type_key, " = '",
                 scaling_type, "' is not supported");
    infer_llama3_rope(file, config, arch);
  }

  config.tie_word_embeddings = !file.has_tensor("output.weight");
  config.attention_bias = file.has_tensor("blk.0.attn_q.bias");
  if (file.has_key("tokenizer.ggml.bos_token_id")) {
    config.bos_token_id = to_int(file.get_int("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id");
  }
  if (file.has_key("tokenizer.ggml.eos_token_id")) {
    config.eos_token_id = to_int(file.get_int("tokenizer.ggml.eos_token_id"), "tokenizer.ggml.eos_token_id");
  }
  return config;
}

// ---- llama: Hugging Face weights ----------------------------------------------------------------

std::string gguf_to_hf_name(const std::string& gguf_name) {
  if (gguf_name == "token_embd.weight") return "model.embed_tokens.weight";
  if (gguf_name == "output_norm.weight") return "model.norm.weight";
  if (gguf_name == "output.weight") return "lm_head.weight";
  static const std::map<std::string, std::string> kBlockParts = {
      {"attn_q", "self_attn.q_proj"},   {"attn_k", "self_attn.k_proj"},  {"attn_v", "self_attn.v_proj"},
      {"attn_output", "self_attn.o_proj"}, {"ffn_gate", "mlp.gate_proj"}, {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"},    {"attn_norm", "input_layernorm"}, {"ffn_norm", "post_attention_layernorm"},
  };
  const std::string prefix = "blk.";
  if (gguf_name.compare(0, prefix.size(), prefix) == 0) {
    size_t pos = prefix.size();
    const size_t digits_begin = pos;
    while (pos < gguf_name.size() && std::isdigit(static_cast<unsigned char>(gguf_name[pos]))) ++pos;
    const size_t num_digits = pos - digits_begin;
    const bool canonical = num_digits > 0 && num_digits <= 6 && (num_digits == 1 || gguf_name[digits_begin] != '0');
    if (canonical && pos < gguf_name.size() && gguf_name[pos] == '.') {
      const std::string layer = gguf_name.substr(digits_begin, num_digits);
      const std::string rest = gguf_name.substr(pos + 1);
      const size_t dot = rest.rfind('.');
      if (dot != std::string::npos) {
        const std::string part = rest.substr(0, dot);
        const std::string suffix = rest.substr(dot + 1);
        auto found = kBlockParts.find(part);
        const bool is_norm = part == "attn_norm" || part == "ffn_norm";
        if (found != kBlockParts.end() && (suffix == "weight" || (suffix == "bias" && !is_norm))) {
          return "model.layers." + layer + "." + found->second + "." + suffix;
        }
      }
    }
  }
  LSERVE_THROW("GGUF tensor '", gguf_name, "' has no Hugging Face llama counterpart");
}

namespace {

// Undo llama.cpp's rotary permutation of attn_q / attn_k rows (convert_hf_to_gguf.py permute):
// within each head the file holds rows (dim, 2) interleaved; Hugging Face holds them as (2, dim).
// out[h, i, j, :] = in[h, j, i, :] for i in {0, 1}, j in [0, dim); transformers'
// LlamaTensorProcessor._reverse_permute_weights is the reference.
void unpermute_rows(const float* in, float* out, int64_t num_rows, int64_t row_size, int num_heads) {
  const int64_t dim = num_rows / num_heads / 2;
  for (int head_idx = 0; head_idx < num_heads; ++head_idx) {
    const int64_t head_base = static_cast<int64_t>(head_idx) * 2 * dim;
    for (int64_t half = 0; half < 2; ++half) {
      for (int64_t j = 0; j < dim; ++j) {
        const float* src = in + (head_base + j * 2 + half) * row_size;
        float* dst = out + (head_base + half * dim + j) * row_size;
        std::memcpy(dst, src, static_cast<size_t>(row_size) * sizeof(float));
      }
    }
  }
}

}  // namespace

void gguf_for_each_weight(const GgufFile& file, const ModelConfig& config,
                          const std::function<void(const std::string& hf_name, const TensorView& f32_tensor)>& fn) {
  const int head_dim = config.head_dim > 0 ? config.head_dim : config.hidden_size / std::max(config.num_qo_heads, 1);
  const int64_t hidden = config.hidden_size;
  const int64_t q_rows = static_cast<int64_t>(config.num_qo_heads) * head_dim;
  const int64_t kv_rows = static_cast<int64_t>(config.num_kv_heads) * head_dim;
  const int64_t inter = config.intermediate_size;

  // Names first: a tensor with no Hugging Face counterpart is reported as such.
  std::vector<std::string> unmapped;
  for (const GgufTensorInfo& info : file.tensors()) {
    if (info.name == "rope_freqs.weight" && config.rope_scaling.rope_type == "llama3") continue;  // in the config
    try {
      gguf_to_hf_name(info.name);
    } catch (const Error&) {
      unmapped.push_back(info.name);
    }
  }
  if (!unmapped.empty()) {
    LSERVE_THROW(file.path(), ": cannot map GGUF tensors to Hugging Face llama names: ", name_list(unmapped));
  }
  // Each layer needs at least nine tensors, so more layers than tensors is a corrupt count; checked
  // before the expected set below is built from it.
  LSERVE_CHECK(config.num_layers >= 0 && static_cast<size_t>(config.num_layers) <= file.tensors().size(),
               file.path(), ": the model config has ", config.num_layers, " layers but the file holds only ",
               file.tensors().size(), " tensors");

  // Every tensor the model needs, with its Hugging Face shape.
  std::map<std::string, std::vector<int64_t>> expected;
  expected["model.embed_tokens.weight"] = {config.vocab_size, hidden};
  expected["model.norm.weight"] = {hidden};
  if (!config.tie_word_embeddings) expected["lm_head.weight"] = {config.vocab_size, hidden};
  for (int layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string layer = "model.layers." + std::to_string(layer_idx) + ".";
    expected[layer + "self_attn.q_proj.weight"] = {q_rows, hidden};
    expected[layer + "self_attn.k_proj.weight"] = {kv_rows, hidden};
    expected[layer + "self_attn.v_proj.weight"] = {kv_rows, hidden};
    expected[layer + "self_attn.o_proj.weight"] = {hidden, q_rows};
    expected[layer + "mlp.gate_proj.weight"] = {inter, hidden};
    expected[layer + "mlp.up_proj.weight"] = {inter, hidden};
    expected[layer + "mlp.down_proj.weight"] = {hidden, inter};
    expected[layer + "input_layernorm.weight"] = {hidden};
    expected[layer + "post_attention_layernorm.weight"] = {hidden};
    if (config.attention_bias) {
      expected[layer + "self_attn.q_proj.bias"] = {q_rows};
      expected[layer + "self_attn.k_proj.bias"] = {kv_rows};
      expected[layer + "self_attn.v_proj.bias"] = {kv_rows};
    }
  }

  // Check names and shapes of the whole file before reading any data.
  struct Plan {
    const GgufTensorInfo* info;
    std::string hf_name;
    int permute_heads;  // 0: copy as is
  };
  std::vector<Plan> plans;
  std::vector<std::string> unexpected, bad_shapes;
  std::set<std::string> seen;
  for (const GgufTensorInfo& info : file.tensors()) {
    if (info.name == "rope_freqs.weight" && config.rope_scaling.rope_type == "llama3") continue;
    std::string hf_name = gguf_to_hf_name(info.name);
    auto found = expected.find(hf_name);
    if (found == expected.end()) {
      unexpected.push_back(info.name + " (" + hf_name + ")");
      continue;
    }
    if (info.shape != found->second) {
      bad_shapes.push_back(info.name + " " + shape_string(info.shape) + " vs " + shape_string(found->second));
      continue;
    }
    seen.insert(hf_name);
    int permute_heads = 0;
    if (info.name.find(".attn_q.") != std::string::npos) permute_heads = config.num_qo_heads;
    if (info.name.find(".attn_k.") != std::string::npos) permute_heads = config.num_kv_heads;
    plans.push_back(Plan{&info, std::move(hf_name), permute_heads});
  }
  std::vector<std::string> missing;
  for (const auto& entry : expected) {
    if (seen.count(entry.first) == 0) missing.push_back(entry.first);
  }
  if (!unexpected.empty()) {
    LSERVE_THROW(file.path(), ": tensors the model config does not use: ", name_list(unexpected));
  }
  if (!bad_shapes.empty()) {
    LSERVE_THROW(file.path(), ": tensor shapes disagree with the model config: ", name_list(bad_shapes));
  }
  if (!missing.empty()) LSERVE_THROW(file.path(), ": tensors missing from the file: ", name_list(missing));
  LSERVE_CHECK(head_dim % 2 == 0, file.path(), ": head_dim ", head_dim, " must be even to undo the rotary permutation");

  std::vector<float> buffer, permuted;
  for (const Plan& plan : plans) {
    const GgufTensorInfo& info = *plan.info;
    buffer.resize(static_cast<size_t>(info.numel()));
    file.read_f32(info, buffer.data());
    float* data = buffer.data();
    if (plan.permute_heads > 0) {
      const int64_t num_rows = info.shape[0];
      const int64_t row_size = info.numel() / std::max<int64_t>(num_rows, 1);
      permuted.resize(buffer.size());
      unpermute_rows(buffer.data(), permuted.data(), num_rows, row_size, plan.permute_heads);
      data = permuted.data();
    }
    const TensorView view = TensorView::contiguous(data, DType::kF32, info.shape.data(),
                                                   static_cast<int>(info.shape.size()));
    fn(plan.hf_name, view);
  }
}

}  // namespace lserve
