// TensorView helpers and half-precision scalar conversions.
#include "lserve/tensor.h"

#include <cmath>
#include <string>

namespace lserve {

DType dtype_from_string(const std::string& name) {
  if (name == "float32" || name == "fp32" || name == "f32" || name == "float") return DType::kF32;
  if (name == "float16" || name == "fp16" || name == "f16" || name == "half") return DType::kF16;
  if (name == "bfloat16" || name == "bf16") return DType::kBF16;
  if (name == "int32") return DType::kI32;
  if (name == "int64") return DType::kI64;
  if (name == "q8_0") return DType::kQ8_0;
  if (name == "q4_0") return DType::kQ4_0;
  if (name == "q4_1") return DType::kQ4_1;
  LSERVE_THROW("unknown dtype '", name, "' (expected float32, float16, bfloat16, q8_0, q4_0 or q4_1)");
}

float f16_to_float(f16_t value) {
  const uint32_t sign = (value.bits & 0x8000u) << 16;
  uint32_t exponent = (value.bits >> 10) & 0x1fu;
  uint32_t mantissa = value.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      mantissa &= 0x3ffu;
      bits = sign | (exponent << 23) | (mantissa << 13);
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

f16_t float_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs_bits >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs_bits < 0x38800000u) {  // f16 subnormal or zero: units of 2^-24, round half to even
    float magnitude;
    std::memcpy(&magnitude, &abs_bits, 4);
    const uint32_t units = static_cast<uint32_t>(std::nearbyint(magnitude * 16777216.0f));
    return f16_t{static_cast<uint16_t>(sign | units)};
  }
  uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return f16_t{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

std::string Device::str() const {
  if (type == DeviceType::kCPU) return "cpu";
  return "cuda:" + std::to_string(index);
}

TensorView::TensorView(void* data_in, DType dtype_in, std::initializer_list<int64_t> shape_in,
                       Device device_in)
    : data(data_in), dtype(dtype_in), device(device_in) {
  LSERVE_CHECK(shape_in.size() >= 1 && shape_in.size() <= kMaxDims, "tensor rank ", shape_in.size(),
               " not in [1, ", kMaxDims, "]");
  ndim = static_cast<int>(shape_in.size());
  int dim = 0;
  for (int64_t extent : shape_in) shape[dim++] = extent;
  int64_t stride_acc = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    strides[d] = stride_acc;
    stride_acc *= shape[d];
  }
}

TensorView TensorView::contiguous(void* data_in, DType dtype_in, const int64_t* shape_in, int ndim_in,
                                  Device device_in) {
  LSERVE_CHECK(ndim_in >= 1 && ndim_in <= kMaxDims, "tensor rank ", ndim_in, " not in [1, ", kMaxDims, "]");
  TensorView view;
  view.data = data_in;
  view.dtype = dtype_in;
  view.device = device_in;
  view.ndim = ndim_in;
  int64_t stride_acc = 1;
  for (int d = ndim_in - 1; d >= 0; --d) {
    view.shape[d] = shape_in[d];
    view.strides[d] = stride_acc;
    stride_acc *= shape_in[d];
  }
  return view;
}

int64_t TensorView::size(int dim) const {
  if (dim < 0) dim += ndim;
  LSERVE_CHECK(dim >= 0 && dim < ndim, "dimension ", dim, " out of range for a rank-", ndim, " tensor");
  return shape[dim];
}

int64_t TensorView::stride(int dim) const {
  if (dim < 0) dim += ndim;
  LSERVE_CHECK(dim >= 0 && dim < ndim, "dimension ", dim, " out of range for a rank-", ndim, " tensor");
  return strides[dim];
}

int64_t TensorView::numel() const {
  if (ndim == 0) return 0;
  int64_t count = 1;
  for (int d = 0; d < ndim; ++d) count *= shape[d];
  return count;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // no elements, any strides (numpy exports 0 for empty arrays)
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

bool TensorView::rows_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 1; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::string out = "(";  // no ostream: see check.h on foreign global locales
  for (int d = 0; d < ndim; ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
  return out + ")";
}

TensorView TensorView::slice(int dim, int64_t start, int64_t stop) const {
  if (dim < 0) dim += ndim;
  LSERVE_CHECK(dim >= 0 && dim < ndim, "slice dimension ", dim, " out of range");
  LSERVE_CHECK(0 <= start && start <= stop && stop <= shape[dim], "slice [", start, ", ", stop,
               ") out of range for extent ", shape[dim]);
  TensorView out = *this;
  out.shape[dim] = stop - start;
  const int64_t offset_items = start * strides[dim];
  LSERVE_CHECK(offset_items % dtype_block_size(dtype) == 0, "slice start ", start, " of dimension ", dim,
               " falls inside a ", dtype_block_size(dtype), "-item block of a ", dtype_name(dtype), " tensor");
  out.data = static_cast<char*>(data) + dtype_nbytes(dtype, offset_items);
  return out;
}

TensorView TensorView::reshape(std::initializer_list<int64_t> new_shape) const {
  LSERVE_CHECK(is_contiguous(), "reshape needs a contiguous tensor, got shape ", shape_str());
  TensorView out(data, dtype, new_shape, device);
  LSERVE_CHECK(out.numel() == numel(), "cannot reshape ", shape_str(), " into ", out.shape_str());
  return out;
}

}  // namespace lserve
