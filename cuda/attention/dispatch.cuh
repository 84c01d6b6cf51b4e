// Runtime -> compile-time dispatch for the attention launchers: lambda-taking switches over dtype,
// head_dim and flags (the FA3 static_switch idea as functions). The lambda receives a tag value.
#pragma once

#include <type_traits>

#include <cute/numeric/integral_constant.hpp>
#include <cutlass/numeric_types.h>

#include "attention_kernels.h"

namespace lserve::cuda {

template <class F>
cudaError_t dispatch_dtype(AttnDType dtype, F&& f) {
  switch (dtype) {
    case AttnDType::kBF16: return f(cute::bfloat16_t{});
    case AttnDType::kF16: return f(cute::half_t{});
  }
  return cudaErrorInvalidValue;
}

template <class F>
cudaError_t dispatch_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(cute::Int<64>{});
    case 128: return f(cute::Int<128>{});
  }
  return cudaErrorInvalidValue;
}

template <class F>
cudaError_t dispatch_bool(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace lserve::cuda
