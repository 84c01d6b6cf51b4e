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

enum class DType : uint8_t { kF32, kF16, kBF16, kI32, kI64, kU8 };

inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 4;
    case DType::kF16: return 2;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    case DType::kI32: return "int32";
    case DType::kI64: return "int64";
    case DType::kU8: return "uint8";
  }
  return "unknown";
}

// Parses "float32"/"fp32"/"f32", "float16"/"fp16"/"half", "bfloat16"/"bf16".
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
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
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
