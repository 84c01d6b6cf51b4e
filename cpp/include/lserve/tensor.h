// TensorView (non-owning: pointer, dtype, device, shape, strides in elements), DType, Device,
// and Tensor (an owning buffer allocated by a Backend). Ops take TensorViews; DLPack converts
// numpy arrays and torch tensors into TensorViews at the Python boundary (cpp/bindings/dlpack.h).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>

#include "lserve/check.h"

namespace lserve {

// kQ8_0, kQ4_0, kQ4_1 are ggml's block formats, kept as stored for CPU weights: blocks of 32
// items along the last dimension, each a float16 scale d (and, Q4_1, a float16 minimum m) then the
// items: Q8_0 = {d, int8 q[32]} (34 bytes), value d*q; Q4_0 = {d, uint8 nibbles[16]} (18 bytes),
// value d*(q-8); Q4_1 = {d, m, uint8 nibbles[16]} (20 bytes), value d*q+m; item i < 16 is the low
// nibble of byte i, item 16+i its high nibble (ggml ggml-common.h; gguf-py quants.py).
// Shapes and strides count items, so a (rows, cols) block tensor has cols / 32 blocks per row.
enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kI64, kU8, kQ8_0, kQ4_0, kQ4_1 };

inline bool dtype_is_block(DType dtype) {
  return dtype == DType::kQ8_0 || dtype == DType::kQ4_0 || dtype == DType::kQ4_1;
}
// Items per block: 32 for the block formats, 1 otherwise.
inline int64_t dtype_block_size(DType dtype) { return dtype_is_block(dtype) ? 32 : 1; }
// Bytes of one block (of one item for the plain dtypes).
inline size_t dtype_block_bytes(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
    case DType::kQ8_0: return 34;
    case DType::kQ4_0: return 18;
    case DType::kQ4_1: return 20;
  }
  return 0;
}
// Bytes of one item; block formats have no whole size per item and answer 0 (use dtype_nbytes).
inline size_t dtype_size(DType dtype) { return dtype_is_block(dtype) ? 0 : dtype_block_bytes(dtype); }
// Bytes of num_items items (a whole number of blocks for the block formats).
inline size_t dtype_nbytes(DType dtype, int64_t num_items) {
  return static_cast<size_t>(num_items / dtype_block_size(dtype)) * dtype_block_bytes(dtype);
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    case DType::kI32: return "int32";
    case DType::kI64: return "int64";
    case DType::kU8: return "uint8";
    case DType::kQ8_0: return "q8_0";
    case DType::kQ4_0: return "q4_0";
    case DType::kQ4_1: return "q4_1";
  }
  return "unknown";
}

// Parses "float32"/"fp32"/"f32", "float16"/"fp16"/"half", "bfloat16"/"bf16", "q8_0", "q4_0", "q4_1".
DType dtype_from_string(const std::string& name);

// C++ mirror of each dtype, for typed access (TensorView::data_ptr<T>() checks it at run time).
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
template <typename T> struct DTypeOf;
template <> struct DTypeOf<float> { static constexpr DType value = DType::kF32; };
template <> struct DTypeOf<f16_t> { static constexpr DType value = DType::kF16; };
template <> struct DTypeOf<bf16_t> { static constexpr DType value = DType::kBF16; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::kI32; };
template <> struct DTypeOf<int64_t> { static constexpr DType value = DType::kI64; };
template <> struct DTypeOf<uint8_t> { static constexpr DType value = DType::kU8; };

// Scalar conversions (round-to-nearest-even for float -> bf16/f16).
inline float bf16_to_float(bf16_t value) {
  uint32_t bits = static_cast<uint32_t>(value.bits) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
inline bf16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((bits >> 16) | 0x40)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(bits >> 16)};
}
float f16_to_float(f16_t value);
f16_t float_to_f16(float value);

enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  bool operator==(const Device& other) const { return type == other.type && index == other.index; }
  bool operator!=(const Device& other) const { return !(*this == other); }
  std::string str() const;
};

constexpr int kMaxDims = 6;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device{};
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in elements

  TensorView() = default;
  // Contiguous view of `data` with the given shape.
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = {});
  static TensorView contiguous(void* data, DType dtype, const int64_t* shape, int ndim, Device device = {});

  // A default-constructed view (ndim == 0) means "absent" for optional op arguments.
  bool defined() const { return ndim > 0; }
  int64_t size(int dim) const;
  int64_t stride(int dim) const;
  int64_t numel() const;
  size_t nbytes() const { return dtype_nbytes(dtype, numel()); }
  bool is_contiguous() const;
  // True when every dimension but the first is contiguous (rows may be strided).
  bool rows_contiguous() const;
  std::string shape_str() const;

  template <typename T>
  T* data_ptr() const {
    LSERVE_CHECK(DTypeOf<T>::value == dtype, "tensor has dtype ", dtype_name(dtype), ", expected ",
                 dtype_name(DTypeOf<T>::value));
    return static_cast<T*>(data);
  }

  // Views (no copy).
  TensorView slice(int dim, int64_t start, int64_t stop) const;  // [start, stop) along dim
  TensorView reshape(std::initializer_list<int64_t> new_shape) const;  // contiguous only
  TensorView select_row(int64_t row) const { return slice(0, row, row + 1); }
};

// Owning buffer; memory comes from `allocate` and goes back through `release`.
class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<void> storage, TensorView view) : storage_(std::move(storage)), view_(view) {}
  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  bool defined() const { return storage_ != nullptr; }
  void* data() const { return view_.data; }
  template <typename T>
  T* data_ptr() const { return view_.data_ptr<T>(); }
  int64_t size(int dim) const { return view_.size(dim); }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return view_.nbytes(); }

 private:
  std::shared_ptr<void> storage_;
  TensorView view_;
};

}  // namespace lserve
