// Glue between the CUDA runtime and engine types (cuda/src only): LSERVE_CUDA_CHECK turns a
// cudaError_t into lserve::Error with file:line; dispatch_float maps a DType to its device element
// type (float, __nv_bfloat16, __half) as a lambda argument, FA3 static_switch style.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lserve/check.h"
#include "lserve/cuda/common/math.cuh"
#include "lserve/tensor.h"

#define LSERVE_CUDA_CHECK(expr)                                                                        \
  do {                                                                                                 \
    const cudaError_t lserve_cuda_error_ = (expr);                                                     \
    if (lserve_cuda_error_ != cudaSuccess) {                                                           \
      LSERVE_THROW("CUDA error ", cudaGetErrorName(lserve_cuda_error_), " (",                           \
                   cudaGetErrorString(lserve_cuda_error_), ") from ", #expr);                          \
    }                                                                                                  \
  } while (0)

namespace lserve {

// Calls fn(T{}) with T the element type of a float dtype.
template <typename Fn>
void dispatch_float(DType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case DType::kF32: fn(float{}); return;
    case DType::kBF16: fn(__nv_bfloat16{}); return;
    case DType::kF16: fn(__half{}); return;
    default: LSERVE_THROW(what, ": unsupported dtype ", dtype_name(dtype), " on CUDA");
  }
}

inline lserve::cuda::ElemType elem_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return lserve::cuda::ElemType::kF32;
    case DType::kBF16: return lserve::cuda::ElemType::kBF16;
    case DType::kF16: return lserve::cuda::ElemType::kF16;
    default: LSERVE_THROW("unsupported dtype ", dtype_name(dtype), " on CUDA");
  }
}

}  // namespace lserve
