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
#include <new>
#include <set>

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

// Strings built by appending, not ostringstream: see the locale note in lserve/check.h.
std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t dim = 0; dim < shape.size(); ++dim) out += (dim ? ", " : "") + std::to_string(shape[dim]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

// "a, b, c" of at most `limit` names, then "... and N more".
std::string name_list(const std::vector<std::string>& names, size_t limit = 8) {
  std::string out;
  for (size_t idx = 0; idx < names.size() && idx < limit; ++idx) out += (idx ? ", " : "") + names[idx];
  if (names.size() > limit) out += " ... and " + std::to_string(names.size() - limit) + " more";
  return out;
}

// A string from the file, fit to quote in an error message: at most 64 bytes, with bytes outside
// printable ASCII written as \xNN (a message must stay valid UTF-8 to reach Python).
std::string quoted(const std::string& text) {
  constexpr size_t kMaxShown = 64;
  static const char kHex[] = "0123456789abcdef";
  std::string out = "'";
  for (size_t idx = 0; idx < text.size() && idx < kMaxShown; ++idx) {
    const auto byte = static_cast<unsigned char>(text[idx]);
    if (byte >= 0x20 && byte < 0x7f && byte != '\\') {
      out += static_cast<char>(byte);
    } else {
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xf];
    }
  }
  if (text.size() > kMaxShown) out += "...";
  return out + "'";
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
  const size_t mapped_size = size_;
  mapping_ = std::shared_ptr<const void>(mapping, [mapped_size](const void* address) {
    ::munmap(const_cast<void*>(address), mapped_size);
  });
  try {
    parse();
  } catch (const std::bad_alloc&) {
    // Every count is bounded by the file size, but metadata takes more memory than file bytes
    // (an empty inner array: 12 bytes in the file, a GgufValue in memory).
    mapping_.reset();
    data_ = nullptr;
    LSERVE_THROW(path, ": the metadata of this ", size_, "-byte file does not fit in memory");
  } catch (...) {
    mapping_.reset();
    data_ = nullptr;
    throw;
  }
}

GgufFile::~GgufFile() = default;  // mapping_ unmaps once no weight view holds it

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
      // Printed without overflow: offset and nbytes are each at most 2^64 - 1.
      LSERVE_THROW(path_, ": tensor '", info.name, "' data at offset ", info.offset, " (", info.nbytes,
                   " bytes) after the data section start ", data_offset_, " lies beyond the end of the file (",
                   size_, " bytes): truncated file?");
    }
    info.offset += data_offset_;
  }
  // Two tensors sharing bytes would load as each other's data: refuse any overlap. Sorted by start,
  // each tensor must end before the next begins (empty tensors overlap nothing).
  std::vector<const GgufTensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const GgufTensorInfo& info : tensors_) {
    if (info.nbytes > 0) by_offset.push_back(&info);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const GgufTensorInfo* a, const GgufTensorInfo* b) {
    return a->offset != b->offset ? a->offset < b->offset : a->nbytes < b->nbytes;
  });
  for (size_t idx = 1; idx < by_offset.size(); ++idx) {
    const GgufTensorInfo& before = *by_offset[idx - 1];
    const GgufTensorInfo& after = *by_offset[idx];
    if (after.offset < before.offset + before.nbytes) {
      LSERVE_THROW(path_, ": tensor '", after.name, "' data [", after.offset, ", ", after.offset + after.nbytes,
                   ") overlaps tensor '", before.name, "' data [", before.offset, ", ", before.offset + before.nbytes,
                   ")");
    }
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

// Sanity bounds of llama metadata, beyond what the tensors pin down. A file outside them is
// corrupt, not an unusual model, and would load into garbage or an allocation failure.
// Context length: 16 is below any released model's (GPT-2: 1024; lserve's own tiny test models use
// 64); 2^30 is 100x Llama 4 Scout's 10M and keeps max_model_len + page_size and prompt + output
// counts inside the engine's int32 arithmetic.
constexpr int64_t kMinContextLength = 16;
constexpr int64_t kMaxContextLength = int64_t{1} << 30;

// The integer value of `key`, which must lie in [min_value, max_value]; errors name file, key, value.
int64_t int_in_range(const GgufFile& file, const std::string& key, int64_t min_value, int64_t max_value,
                     const char* why = nullptr) {
  const int64_t value = file.get_int(key);
  if (value < min_value || value > max_value) {
    LSERVE_THROW(file.path(), ": metadata '", key, "' = ", value, " is outside [", min_value, ", ", max_value, "]",
                 why ? ": " : "", why ? why : "");
  }
  return value;
}

// A positive count that must fit the int fields of ModelConfig.
int positive_int(const GgufFile& file, const std::string& key) {
  return static_cast<int>(int_in_range(file, key, 1, std::numeric_limits<int>::max()));
}

// The float value of `key`: finite and in (min_exclusive, max_exclusive).
double finite_float(const GgufFile& file, const std::string& key, double min_exclusive, double max_exclusive) {
  const double value = file.get_float(key);
  if (!std::isfinite(value) || value <= min_exclusive || value >= max_exclusive) {
    LSERVE_THROW(file.path(), ": metadata '", key, "' = ", value, " must be finite and in (", min_exclusive, ", ",
                 max_exclusive, ")");
  }
  return value;
}

// Llama 3.x files carry rope_freqs.weight, the per-frequency divisors of Meta's llama3 rope rule,
// instead of scaling metadata (llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
// Recover the rule: factor = the largest divisor, low/high frequency factors 1 and 4 and the
// original context 8192 (the converter's defaults), then check every value against it.
void infer_llama3_rope(const GgufFile& file, ModelConfig& config, const std::string& arch) {
  const GgufTensorInfo& info = file.tensor("rope_freqs.weight");
  const int rotary_dim = config.rotary_dim();
  LSERVE_CHECK(info.numel() * 2 == rotary_dim, file.path(), ": rope_freqs.weight has shape ", shape_string(info.shape),
               ", expected (rotary_dim / 2,) = (", rotary_dim / 2, ",)");
  const std::vector<float> divisors = file.read_f32(info.name);
  for (size_t idx = 0; idx < divisors.size(); ++idx) {
    LSERVE_CHECK(std::isfinite(divisors[idx]) && divisors[idx] > 0.0f, file.path(), ": rope_freqs.weight[", idx,
                 "] = ", divisors[idx], " must be finite and positive");
  }
  RopeScaling scaling;
  scaling.rope_type = "llama3";
  scaling.factor = *std::max_element(divisors.begin(), divisors.end());
  scaling.low_freq_factor = 1.0;
  scaling.high_freq_factor = 4.0;
  const std::string original_key = arch + ".rope.scaling.original_context_length";
  scaling.original_max_position_embeddings =
      file.has_key(original_key)
          ? static_cast<int>(int_in_range(file, original_key, kMinContextLength, kMaxContextLength))
          : 8192;
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

void check_weights(const GgufFile& file, const ModelConfig& config);

}  // namespace

ModelConfig gguf_model_config(const GgufFile& file) {
  const std::string arch = file.get_string("general.architecture");
  if (arch != "llama") {
    LSERVE_THROW(file.path(), ": GGUF architecture ", quoted(arch), " is not supported (supported: llama)");
  }
  auto key_of = [&](const std::string& suffix) { return arch + "." + suffix; };

  ModelConfig config;
  config.architecture = "LlamaForCausalLM";
  if (file.has_key("tokenizer.ggml.tokens")) {
    const GgufValue& tokens = file.get("tokenizer.ggml.tokens");
    LSERVE_CHECK(tokens.is_array() && tokens.element_type == GgufValueType::kString, file.path(),
                 ": metadata 'tokenizer.ggml.tokens' must be an array of string");
    LSERVE_CHECK(!tokens.strings.empty() && tokens.strings.size() <= static_cast<size_t>(std::numeric_limits<int>::max()),
                 file.path(), ": metadata 'tokenizer.ggml.tokens' holds ", tokens.strings.size(),
                 " tokens (expected 1 to 2^31 - 1)");
    config.vocab_size = static_cast<int>(tokens.strings.size());
  } else {
    config.vocab_size = positive_int(file, key_of("vocab_size"));
  }
  config.hidden_size = positive_int(file, key_of("embedding_length"));
  config.intermediate_size = positive_int(file, key_of("feed_forward_length"));
  config.num_layers = positive_int(file, key_of("block_count"));
  config.num_qo_heads = positive_int(file, key_of("attention.head_count"));
  const std::string kv_heads_key = key_of("attention.head_count_kv");
  config.num_kv_heads = file.has_key(kv_heads_key) ? positive_int(file, kv_heads_key) : config.num_qo_heads;
  LSERVE_CHECK(config.num_qo_heads % config.num_kv_heads == 0, file.path(), ": metadata '", key_of("attention.head_count"),
               "' = ", config.num_qo_heads, " is not a multiple of '", kv_heads_key, "' = ", config.num_kv_heads);

  const std::string key_length = key_of("attention.key_length");
  const std::string rope_dims = key_of("rope.dimension_count");
  if (file.has_key(key_length)) {
    config.head_dim = positive_int(file, key_length);
  } else if (file.has_key(rope_dims)) {
    config.head_dim = positive_int(file, rope_dims);
  } else {
    LSERVE_CHECK(config.hidden_size % config.num_qo_heads == 0, file.path(), ": metadata '", key_of("embedding_length"),
                 "' = ", config.hidden_size, " is not a multiple of '", key_of("attention.head_count"), "' = ",
                 config.num_qo_heads, " and the file states no head size");
    config.head_dim = config.hidden_size / config.num_qo_heads;
  }
  if (config.head_dim % 2 != 0) {
    const std::string source = file.has_key(key_length)  ? "metadata '" + key_length + "'"
                               : file.has_key(rope_dims) ? "metadata '" + rope_dims + "'"
                                                         : "embedding_length / head_count";
    LSERVE_THROW(file.path(), ": the head size ", config.head_dim, " (", source, ") must be even");
  }
  if (file.has_key(rope_dims)) {
    const int rotary_dim = positive_int(file, rope_dims);
    LSERVE_CHECK(rotary_dim <= config.head_dim && rotary_dim % 2 == 0, file.path(), ": metadata '", rope_dims, "' = ",
                 rotary_dim, " must be even and at most the head size ", config.head_dim);
    config.partial_rotary_factor = static_cast<double>(rotary_dim) / config.head_dim;
  }

  // Finite and positive, else every activation is NaN or zero; an epsilon of 1 or more would
  // swamp the mean square of the activations it normalises.
  config.rms_norm_eps = finite_float(file, key_of("attention.layer_norm_rms_epsilon"), 0.0, 1.0);
  // A base <= 1 makes the rotary frequencies constant or growing: no model uses one.
  const std::string freq_base = key_of("rope.freq_base");
  if (file.has_key(freq_base)) config.rope_theta = finite_float(file, freq_base, 1.0, HUGE_VAL);
  config.max_position_embeddings = static_cast<int>(
      int_in_range(file, key_of("context_length"), kMinContextLength, kMaxContextLength,
                   "not a plausible context length"));

  const std::string scaling_type_key = key_of("rope.scaling.type");
  const std::string scaling_type = file.has_key(scaling_type_key) ? file.get_string(scaling_type_key) : "none";
  auto scaling_float = [&](const std::string& suffix, double fallback) {
    const std::string key = key_of("rope.scaling." + suffix);
    return file.has_key(key) ? finite_float(file, key, -HUGE_VAL, HUGE_VAL) : fallback;
  };
  const std::string original_key = key_of("rope.scaling.original_context_length");
  if (scaling_type == "linear" || scaling_type == "yarn") {
    config.rope_scaling.rope_type = scaling_type;
    config.rope_scaling.factor = finite_float(file, key_of("rope.scaling.factor"), 0.0, HUGE_VAL);
    if (file.has_key(original_key)) {
      config.rope_scaling.original_max_position_embeddings =
          static_cast<int>(int_in_range(file, original_key, kMinContextLength, kMaxContextLength));
    }
    if (scaling_type == "yarn") {
      config.rope_scaling.attention_factor = scaling_float("attn_factor", 0.0);
      config.rope_scaling.beta_fast = scaling_float("yarn_beta_fast", config.rope_scaling.beta_fast);
      config.rope_scaling.beta_slow = scaling_float("yarn_beta_slow", config.rope_scaling.beta_slow);
      LSERVE_CHECK(config.rope_scaling.attention_factor >= 0.0, file.path(), ": metadata '",
                   key_of("rope.scaling.attn_factor"), "' = ", config.rope_scaling.attention_factor,
                   " must be >= 0");
    }
  } else if (scaling_type != "none") {
    LSERVE_THROW(file.path(), ": metadata '", scaling_type_key, "' = ", quoted(scaling_type),
                 " is not supported (supported: none, linear, yarn)");
  }
  if (file.has_tensor("rope_freqs.weight")) {
    LSERVE_CHECK(scaling_type == "none", file.path(), ": rope_freqs.weight together with ", scaling_type_key, " = ",
                 quoted(scaling_type), " is not supported");
    infer_llama3_rope(file, config, arch);
  }

  config.tie_word_embeddings = !file.has_tensor("output.weight");
  config.attention_bias = file.has_tensor("blk.0.attn_q.bias");
  // Special tokens must be in the vocabulary: an EOS id past it never ends a sequence.
  auto token_id = [&](const std::string& key, int& out) {
    if (file.has_key(key)) out = static_cast<int>(int_in_range(file, key, 0, config.vocab_size - 1, "not a token id"));
  };
  token_id("tokenizer.ggml.bos_token_id", config.bos_token_id);
  token_id("tokenizer.ggml.eos_token_id", config.eos_token_id);
  try {
    config.validate();
  } catch (const Error& error) {
    LSERVE_THROW(file.path(), ": ", error.what());
  }
  // Every size the engine allocates from (layers, dimensions, vocabulary) must agree with the
  // tensors the file holds, which are bounded by the file itself: checked here, before any caller
  // allocates a model from this config.
  check_weights(file, config);
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
// Rows move whole, so this serves any dtype: row_bytes is one row's size in bytes.
void unpermute_rows(const uint8_t* in, uint8_t* out, int64_t num_rows, int64_t row_bytes, int num_heads) {
  const int64_t dim = num_rows / num_heads / 2;
  for (int head_idx = 0; head_idx < num_heads; ++head_idx) {
    const int64_t head_base = static_cast<int64_t>(head_idx) * 2 * dim;
    for (int64_t half = 0; half < 2; ++half) {
      for (int64_t j = 0; j < dim; ++j) {
        const uint8_t* src = in + (head_base + j * 2 + half) * row_bytes;
        uint8_t* dst = out + (head_base + half * dim + j) * row_bytes;
        std::memcpy(dst, src, static_cast<size_t>(row_bytes));
      }
    }
  }
}

// The lserve dtype of a ggml type that weights keep as stored.
DType stored_dtype(const GgufFile& file, const GgufTensorInfo& info) {
  switch (static_cast<GgmlType>(info.ggml_type)) {
    case GgmlType::kF32: return DType::kF32;
    case GgmlType::kF16: return DType::kF16;
    case GgmlType::kBF16: return DType::kBF16;
    case GgmlType::kQ8_0: return DType::kQ8_0;
    case GgmlType::kQ4_0: return DType::kQ4_0;
    case GgmlType::kQ4_1: return DType::kQ4_1;
  }
  LSERVE_THROW(file.path(), ": tensor '", info.name, "' has type ", ggml_type_name(info.ggml_type),
               ", which lserve cannot keep as stored");
}

// The layer index of a mapped "blk.N.*" tensor name; -1 for the other tensors.
int64_t block_index(const std::string& gguf_name) {
  if (gguf_name.compare(0, 4, "blk.") != 0) return -1;
  int64_t index = 0;
  for (size_t pos = 4; pos < gguf_name.size() && std::isdigit(static_cast<unsigned char>(gguf_name[pos])); ++pos) {
    index = index * 10 + (gguf_name[pos] - '0');  // at most 6 digits: gguf_to_hf_name accepted the name
  }
  return index;
}

// The dimensions of the llama weights, each with the metadata that sets it, so that a disagreement
// shared by every tensor names the key rather than the tensors.
enum WeightDimIdx : int { kVocabDim, kHiddenDim, kInterDim, kQRowsDim, kKvRowsDim, kNumWeightDims };

struct WeightDim {
  const char* what;    // "hidden size"
  std::string source;  // "metadata 'llama.embedding_length' = 32"
  int64_t value;
};

std::vector<WeightDim> weight_dims(const GgufFile& file, const ModelConfig& config) {
  auto stated = [](const std::string& key, int64_t value) {
    return "metadata '" + key + "' = " + std::to_string(value);
  };
  const std::string vocab = file.has_key("tokenizer.ggml.tokens")
                                ? "metadata 'tokenizer.ggml.tokens' (" + std::to_string(config.vocab_size) + " tokens)"
                                : stated("llama.vocab_size", config.vocab_size);
  std::string head_size;
  if (file.has_key("llama.attention.key_length")) {
    head_size = stated("llama.attention.key_length", config.head_dim);
  } else if (file.has_key("llama.rope.dimension_count")) {
    head_size = stated("llama.rope.dimension_count", config.head_dim);
  } else {
    head_size = "head size " + std::to_string(config.head_dim) + " (embedding_length / head_count)";
  }
  const std::string kv_heads_key =
      file.has_key("llama.attention.head_count_kv") ? "llama.attention.head_count_kv" : "llama.attention.head_count";
  std::vector<WeightDim> dims(kNumWeightDims);
  dims[kVocabDim] = {"vocabulary size", vocab, config.vocab_size};
  dims[kHiddenDim] = {"hidden size", stated("llama.embedding_length", config.hidden_size), config.hidden_size};
  dims[kInterDim] = {"feed-forward size", stated("llama.feed_forward_length", config.intermediate_size),
                     config.intermediate_size};
  dims[kQRowsDim] = {"query rows (heads x head size)",
                     stated("llama.attention.head_count", config.num_qo_heads) + " times " + head_size,
                     static_cast<int64_t>(config.num_qo_heads) * config.head_dim};
  dims[kKvRowsDim] = {"key/value rows (KV heads x head size)",
                      stated(kv_heads_key, config.num_kv_heads) + " times " + head_size,
                      static_cast<int64_t>(config.num_kv_heads) * config.head_dim};
  return dims;
}

// What the model needs of one tensor.
enum class Permute { kNone, kQueryHeads, kKvHeads };

struct ExpectedTensor {
  std::string hf_name;
  std::vector<int> dims;  // WeightDimIdx per axis, row-major (torch) order
  Permute permute;        // rotary rows to un-permute
};

struct LayerPart {
  const char* gguf_suffix;
  const char* hf_suffix;
  std::vector<int> dims;
  Permute permute;
};

const std::vector<LayerPart>& layer_parts(bool attention_bias) {
  static const std::vector<LayerPart> kWeights = {
      {"attn_norm.weight", "input_layernorm.weight", {kHiddenDim}, Permute::kNone},
      {"attn_q.weight", "self_attn.q_proj.weight", {kQRowsDim, kHiddenDim}, Permute::kQueryHeads},
      {"attn_k.weight", "self_attn.k_proj.weight", {kKvRowsDim, kHiddenDim}, Permute::kKvHeads},
      {"attn_v.weight", "self_attn.v_proj.weight", {kKvRowsDim, kHiddenDim}, Permute::kNone},
      {"attn_output.weight", "self_attn.o_proj.weight", {kHiddenDim, kQRowsDim}, Permute::kNone},
      {"ffn_norm.weight", "post_attention_layernorm.weight", {kHiddenDim}, Permute::kNone},
      {"ffn_gate.weight", "mlp.gate_proj.weight", {kInterDim, kHiddenDim}, Permute::kNone},
      {"ffn_up.weight", "mlp.up_proj.weight", {kInterDim, kHiddenDim}, Permute::kNone},
      {"ffn_down.weight", "mlp.down_proj.weight", {kHiddenDim, kInterDim}, Permute::kNone},
  };
  static const std::vector<LayerPart> kWithBias = [] {
    std::vector<LayerPart> parts = kWeights;
    parts.push_back({"attn_q.bias", "self_attn.q_proj.bias", {kQRowsDim}, Permute::kQueryHeads});
    parts.push_back({"attn_k.bias", "self_attn.k_proj.bias", {kKvRowsDim}, Permute::kKvHeads});
    parts.push_back({"attn_v.bias", "self_attn.v_proj.bias", {kKvRowsDim}, Permute::kNone});
    return parts;
  }();
  return attention_bias ? kWithBias : kWeights;
}

bool read_f32_supports(uint32_t ggml_type) {
  switch (static_cast<GgmlType>(ggml_type)) {
    case GgmlType::kF32: case GgmlType::kF16: case GgmlType::kBF16:
    case GgmlType::kQ8_0: case GgmlType::kQ4_0: case GgmlType::kQ4_1:
      return true;
  }
  return false;
}

struct WeightPlan {
  const GgufTensorInfo* info;
  std::string hf_name;
  int permute_heads;  // 0: copy as is
};

// The layer count against the blk.N tensors: when the file holds whole layers 0..K-1 and the
// metadata says another count, the count is what is wrong, and the error says so.
void check_layer_count(const GgufFile& file, const ModelConfig& config) {
  std::set<int64_t> layers;
  for (const GgufTensorInfo& info : file.tensors()) {
    const int64_t layer_idx = block_index(info.name);
    if (layer_idx >= 0) layers.insert(layer_idx);
  }
  const std::string key = "metadata 'llama.block_count' = " + std::to_string(config.num_layers);
  const bool contiguous = layers.empty() || *layers.rbegin() + 1 == static_cast<int64_t>(layers.size());
  const int64_t num_file_layers = static_cast<int64_t>(layers.size());
  if (contiguous && num_file_layers != config.num_layers) {
    if (num_file_layers == 0) LSERVE_THROW(file.path(), ": ", key, ", but the file holds no layer tensors (blk.*)");
    std::vector<std::string> names;
    if (config.num_layers > num_file_layers) {
      const std::string layer = std::to_string(num_file_layers);
      for (const LayerPart& part : layer_parts(config.attention_bias)) {
        names.push_back("blk." + layer + "." + part.gguf_suffix + " (model.layers." + layer + "." + part.hf_suffix + ")");
      }
      LSERVE_THROW(file.path(), ": ", key, ", but the file holds tensors for layers 0 to ", num_file_layers - 1,
                   " only; missing from the file: ", name_list(names, 3));
    }
    for (const GgufTensorInfo& info : file.tensors()) {
      if (block_index(info.name) >= config.num_layers) names.push_back(info.name);
    }
    LSERVE_THROW(file.path(), ": ", key, ", but the file holds tensors for layers 0 to ", num_file_layers - 1,
                 "; tensors the model config does not use: ", name_list(names, 3));
  }
  // Each layer needs nine tensors: more layers than tensors is a corrupt count, refused before the
  // expected set is built from it.
  LSERVE_CHECK(static_cast<size_t>(config.num_layers) <= file.tensors().size(), file.path(), ": ", key,
               ", but the file holds only ", file.tensors().size(), " tensors (each layer needs 9)");
}

// Checks every tensor against `config` without reading data, and returns what to read: names map
// to Hugging Face names, shapes agree with the config's dimensions, every tensor the model needs is
// present and of a type read_f32 reads. Errors name the file and the culprit: the metadata key when
// every tensor disagrees with it, else the tensors.
std::vector<WeightPlan> plan_weights(const GgufFile& file, const ModelConfig& config) {
  const bool llama3_rope = config.rope_scaling.rope_type == "llama3";
  // Names first: a tensor with no Hugging Face counterpart is reported as such.
  std::vector<std::string> unmapped;
  for (const GgufTensorInfo& info : file.tensors()) {
    if (info.name == "rope_freqs.weight" && llama3_rope) continue;  // in the config
    try {
      gguf_to_hf_name(info.name);
    } catch (const Error&) {
      unmapped.push_back(info.name);
    }
  }
  if (!unmapped.empty()) {
    LSERVE_THROW(file.path(), ": cannot map GGUF tensors to Hugging Face llama names: ", name_list(unmapped));
  }
  check_layer_count(file, config);

  // Every tensor the model needs, by GGUF name.
  std::map<std::string, ExpectedTensor> expected;
  expected["token_embd.weight"] = {"model.embed_tokens.weight", {kVocabDim, kHiddenDim}, Permute::kNone};
  expected["output_norm.weight"] = {"model.norm.weight", {kHiddenDim}, Permute::kNone};
  if (!config.tie_word_embeddings) expected["output.weight"] = {"lm_head.weight", {kVocabDim, kHiddenDim}, Permute::kNone};
  for (int layer_idx = 0; layer_idx < config.num_layers; ++layer_idx) {
    const std::string layer = std::to_string(layer_idx);
    for (const LayerPart& part : layer_parts(config.attention_bias)) {
      expected["blk." + layer + "." + part.gguf_suffix] = {"model.layers." + layer + "." + part.hf_suffix, part.dims,
                                                          part.permute};
    }
  }

  // One pass over the file: names, ranks, per-dimension agreement, types.
  const std::vector<WeightDim> dims = weight_dims(file, config);
  auto expected_shape = [&](const ExpectedTensor& tensor) {
    std::vector<int64_t> shape;
    for (int dim_idx : tensor.dims) shape.push_back(dims[dim_idx].value);
    return shape;
  };
  std::vector<int64_t> num_agreeing(kNumWeightDims, 0);
  std::vector<std::vector<const GgufTensorInfo*>> disagreeing(kNumWeightDims);
  std::vector<std::set<int64_t>> disagreeing_values(kNumWeightDims);
  std::vector<WeightPlan> plans;
  std::vector<std::string> unexpected, bad_ranks, unsupported;
  std::set<std::string> seen;
  for (const GgufTensorInfo& info : file.tensors()) {
    if (info.name == "rope_freqs.weight" && llama3_rope) continue;
    auto found = expected.find(info.name);
    if (found == expected.end()) {
      unexpected.push_back(info.name + " (" + gguf_to_hf_name(info.name) + ")");
      continue;
    }
    const ExpectedTensor& want = found->second;
    seen.insert(info.name);
    if (info.shape.size() != want.dims.size()) {
      bad_ranks.push_back(info.name + " " + shape_string(info.shape) + " vs " + shape_string(expected_shape(want)));
      continue;
    }
    bool agrees = true;
    for (size_t axis = 0; axis < want.dims.size(); ++axis) {
      const int dim_idx = want.dims[axis];
      if (info.shape[axis] == dims[dim_idx].value) {
        ++num_agreeing[dim_idx];
      } else {
        if (disagreeing[dim_idx].empty() || disagreeing[dim_idx].back() != &info) disagreeing[dim_idx].push_back(&info);
        disagreeing_values[dim_idx].insert(info.shape[axis]);
        agrees = false;
      }
    }
    if (!read_f32_supports(info.ggml_type)) unsupported.push_back(info.name + " (" + ggml_type_name(info.ggml_type) + ")");
    if (!agrees) continue;
    int permute_heads = 0;
    if (want.permute == Permute::kQueryHeads) permute_heads = config.num_qo_heads;
    if (want.permute == Permute::kKvHeads) permute_heads = config.num_kv_heads;
    plans.push_back(WeightPlan{&info, want.hf_name, permute_heads});
  }
  if (!unexpected.empty()) {
    LSERVE_THROW(file.path(), ": tensors the model config does not use: ", name_list(unexpected));
  }

  std::vector<std::string> shape_errors;
  for (int dim_idx = 0; dim_idx < kNumWeightDims; ++dim_idx) {
    if (disagreeing[dim_idx].empty()) continue;
    const WeightDim& dim = dims[dim_idx];
    std::vector<std::string> tensors;
    for (const GgufTensorInfo* info : disagreeing[dim_idx]) tensors.push_back(info->name + " " + shape_string(info->shape));
    std::string values;
    for (int64_t value : disagreeing_values[dim_idx]) values += (values.empty() ? "" : " or ") + std::to_string(value);
    const std::string stated = "the " + std::string(dim.what) + " is " + std::to_string(dim.value) + " (" + dim.source + ")";
    if (num_agreeing[dim_idx] == 0) {  // no tensor has the config's value: the metadata is wrong
      shape_errors.push_back(stated + ", but every tensor with that dimension has " + values + ": " +
                             name_list(tensors, 4));
    } else {  // the tensors that differ from the rest are wrong
      shape_errors.push_back(stated + " and " + std::to_string(num_agreeing[dim_idx]) + " tensor axes agree, but " +
                             name_list(tensors, 4) + (tensors.size() == 1 ? " has " : " have ") + values);
    }
  }
  for (const std::string& bad_rank : bad_ranks) shape_errors.push_back(bad_rank);
  if (!shape_errors.empty()) {
    std::string message;
    for (const std::string& error : shape_errors) message += (message.empty() ? "" : "; ") + error;
    LSERVE_THROW(file.path(), ": tensor shapes disagree with the model config: ", message);
  }
  std::vector<std::string> missing;
  for (const auto& entry : expected) {
    if (seen.count(entry.first) == 0) missing.push_back(entry.first + " (" + entry.second.hf_name + ")");
  }
  if (!missing.empty()) LSERVE_THROW(file.path(), ": tensors missing from the file: ", name_list(missing));
  if (!unsupported.empty()) {
    LSERVE_THROW(file.path(), ": tensors of types lserve cannot read: ", name_list(unsupported),
                 " (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
  }
  return plans;
}

void check_weights(const GgufFile& file, const ModelConfig& config) { plan_weights(file, config); }

}  // namespace

void gguf_for_each_weight(const GgufFile& file, const ModelConfig& config,
                          const std::function<void(const std::string& hf_name, const TensorView& f32_tensor)>& fn) {
  const std::vector<WeightPlan> plans = plan_weights(file, config);
  std::vector<float> buffer, permuted;
  for (const WeightPlan& plan : plans) {
    const GgufTensorInfo& info = *plan.info;
    buffer.resize(static_cast<size_t>(info.numel()));
    file.read_f32(info, buffer.data());
    float* data = buffer.data();
    if (plan.permute_heads > 0) {
      const int64_t num_rows = info.shape[0];
      const int64_t row_size = info.numel() / std::max<int64_t>(num_rows, 1);
      permuted.resize(buffer.size());
      unpermute_rows(reinterpret_cast<const uint8_t*>(buffer.data()), reinterpret_cast<uint8_t*>(permuted.data()),
                     num_rows, row_size * static_cast<int64_t>(sizeof(float)), plan.permute_heads);
      data = permuted.data();
    }
    const TensorView view = TensorView::contiguous(data, DType::kF32, info.shape.data(),
                                                   static_cast<int>(info.shape.size()));
    fn(plan.hf_name, view);
  }
}

void gguf_for_each_stored_weight(
    const GgufFile& file, const ModelConfig& config,
    const std::function<bool(const std::string& hf_name, const TensorView& tensor,
                             const std::shared_ptr<const void>& mapping)>& fn) {
  const std::shared_ptr<const void> none;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const std::vector<WeightPlan> plans = plan_weights(file, config);
  std::vector<float> buffer;
  std::vector<uint8_t> permuted;
  for (const WeightPlan& plan : plans) {
    const GgufTensorInfo& info = *plan.info;
    if (info.shape.size() != 2) {  // norms and biases: float32, as gguf_for_each_weight gives them
      buffer.resize(static_cast<size_t>(info.numel()));
      file.read_f32(info, buffer.data());
      if (plan.permute_heads > 0) {  // a q/k bias: one item per row
        std::vector<float> rows(buffer.size());
        unpermute_rows(reinterpret_cast<const uint8_t*>(buffer.data()), reinterpret_cast<uint8_t*>(rows.data()),
                       info.shape[0], static_cast<int64_t>(sizeof(float)), plan.permute_heads);
        buffer.swap(rows);
      }
      fn(plan.hf_name, TensorView::contiguous(buffer.data(), DType::kF32, info.shape.data(),
                                              static_cast<int>(info.shape.size())), none);
      continue;
    }
    const DType dtype = stored_dtype(file, info);
    const uint8_t* data = file.tensor_data(info);
    if (plan.permute_heads > 0) {
      permuted.resize(static_cast<size_t>(info.nbytes));
      const int64_t num_rows = info.shape[0];
      unpermute_rows(data, permuted.data(), num_rows, static_cast<int64_t>(info.nbytes) / std::max<int64_t>(num_rows, 1),
                     plan.permute_heads);
      data = permuted.data();
    }
    fn(plan.hf_name, TensorView::contiguous(const_cast<uint8_t*>(data), dtype, info.shape.data(), 2),
       plan.permute_heads > 0 ? none : file.mapping());
    // Copied, packed or kept: drop the whole pages fn read from the resident set (the mapping is read-only
    // and never written, so a kept view's later reads refault them from the file).
    const uintptr_t begin = reinterpret_cast<uintptr_t>(file.tensor_data(info));
    const uintptr_t first = (begin + page - 1) / page * page, last = (begin + info.nbytes) / page * page;
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  }
}

}  // namespace lserve
