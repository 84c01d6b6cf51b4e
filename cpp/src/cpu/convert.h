// Row conversions between the storage dtypes (float32, bfloat16, float16) and float32, shared by
// the CPU ops. Plain loops; LSERVE_CPU_INLINE lets an AVX2-targeted caller inline and vectorise
// them (GCC and Clang inline a generic function into a caller whose target is a superset).
#pragma once

#include <cstdint>
#include <cstring>

#include "lserve/tensor.h"

#define LSERVE_CPU_INLINE inline __attribute__((always_inline))

namespace lserve::cpu {

LSERVE_CPU_INLINE float to_float(float value) { return value; }
LSERVE_CPU_INLINE float to_float(bf16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value.bits) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
LSERVE_CPU_INLINE float to_float(f16_t value) { return f16_to_float(value); }

template <typename T> LSERVE_CPU_INLINE T from_float(float value);
template <> LSERVE_CPU_INLINE float from_float<float>(float value) { return value; }
template <> LSERVE_CPU_INLINE bf16_t from_float<bf16_t>(float value) { return float_to_bf16(value); }
template <> LSERVE_CPU_INLINE f16_t from_float<f16_t>(float value) { return float_to_f16(value); }

// dst[i] = float(src[i]) for i < count.
template <typename T>
LSERVE_CPU_INLINE void load_row(const T* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = to_float(src[i]);
}

// dst[i] = T(src[i]) (round to nearest even) for i < count.
template <typename T>
LSERVE_CPU_INLINE void store_row(const float* src, T* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = from_float<T>(src[i]);
}

// Calls fn(T*) with the typed pointer of a float32 / bfloat16 / float16 view.
template <typename Fn>
decltype(auto) dispatch_float(DType dtype, void* data, Fn&& fn) {
  switch (dtype) {
    case DType::kF32: return fn(static_cast<float*>(data));
    case DType::kBF16: return fn(static_cast<bf16_t*>(data));
    case DType::kF16: return fn(static_cast<f16_t*>(data));
    default: LSERVE_THROW("expected a float32, bfloat16 or float16 tensor, got ", dtype_name(dtype));
  }
}

// Element pointer of row `row` of a 2-D-or-more view whose rows may be strided.
template <typename T>
LSERVE_CPU_INLINE T* row_ptr(const TensorView& view, int64_t row) {
  return static_cast<T*>(view.data) + row * view.strides[0];
}

}  // namespace lserve::cpu
