// CpuBackend memory (64-byte aligned host buffers), copies with float conversions, factory.
#include "cpu/cpu_backend.h"

#include <cstdlib>
#include <cstring>

namespace lserve {

void cpu_to_float(const void* src, DType dtype, float* dst, int64_t count) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
      return;
    case DType::kBF16: {
      const uint16_t* bits = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) {
        const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
        std::memcpy(&dst[i], &word, 4);
      }
      return;
    }
    case DType::kF16: {
      const f16_t* values = static_cast<const f16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = f16_to_float(values[i]);
      return;
    }
    default:
      LSERVE_THROW("cannot convert ", dtype_name(dtype), " to float32");
  }
}

bool CpuBackend::supports(OpKind op, DType weight_dtype, DType kv_cache_dtype) const {
  const bool weights_ok = weight_dtype == DType::kF32 || weight_dtype == DType::kBF16 || weight_dtype == DType::kF16;
  const bool kv_ok = kv_cache_dtype == DType::kF32 || kv_cache_dtype == DType::kBF16;
  return weights_ok && kv_ok;
}

std::shared_ptr<void> CpuBackend::allocate_bytes(size_t num_bytes) {
  const size_t rounded = (num_bytes + 63) / 64 * 64;
  void* data = std::aligned_alloc(64, rounded);
  LSERVE_CHECK(data != nullptr, "out of host memory allocating ", num_bytes, " bytes");
  return std::shared_ptr<void>(data, [](void* pointer) { std::free(pointer); });
}

void CpuBackend::copy_impl(const TensorView& dst, const TensorView& src) {
  LSERVE_CHECK(dst.device.type == DeviceType::kCPU && src.device.type == DeviceType::kCPU,
               "the CPU backend copies host memory only");
  const int64_t count = src.numel();
  if (dst.dtype == src.dtype) {
    std::memcpy(dst.data, src.data, src.nbytes());
    return;
  }
  if (dst.dtype == DType::kF32) {
    cpu_to_float(src.data, src.dtype, static_cast<float*>(dst.data), count);
    return;
  }
  std::vector<float> staging;
  const float* values = static_cast<const float*>(src.data);
  if (src.dtype != DType::kF32) {
    staging.resize(static_cast<size_t>(count));
    cpu_to_float(src.data, src.dtype, staging.data(), count);
    values = staging.data();
  }
  if (dst.dtype == DType::kBF16) {
    bf16_t* out = static_cast<bf16_t*>(dst.data);
    for (int64_t i = 0; i < count; ++i) out[i] = float_to_bf16(values[i]);
  } else {
    f16_t* out = static_cast<f16_t*>(dst.data);
    for (int64_t i = 0; i < count; ++i) out[i] = float_to_f16(values[i]);
  }
}

void CpuBackend::fill_zero_impl(const TensorView& dst) { std::memset(dst.data, 0, dst.nbytes()); }

std::unique_ptr<Backend> make_cpu_backend(int num_threads) { return std::make_unique<CpuBackend>(num_threads); }

}  // namespace lserve
