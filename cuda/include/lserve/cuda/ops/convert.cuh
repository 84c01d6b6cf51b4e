// convert: dst[r, c] = Dst(float(src[r, c])) over a (num_rows, num_cols) matrix whose rows may be
// strided; copies between dtypes and row layouts (host<->device copies stage through it). One
// thread per element, grid-stride. Reference: Backend::copy (cpp/src/cpu/cpu_backend.cpp).
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct ConvertParams {
  const void* src;     // (num_rows, num_cols), row stride src_stride elements
  void* dst;           // (num_rows, num_cols), row stride dst_stride elements
  int64_t num_rows = 0;
  int64_t num_cols = 0;
  int64_t src_stride = 0;
  int64_t dst_stride = 0;
};

template <typename Src, typename Dst>
__global__ void convert_kernel(ConvertParams params) {
  const int64_t count = params.num_rows * params.num_cols;
  const Src* src = static_cast<const Src*>(params.src);
  Dst* dst = static_cast<Dst*>(params.dst);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / params.num_cols, col = i % params.num_cols;
    dst[row * params.dst_stride + col] = from_float<Dst>(to_float(src[row * params.src_stride + col]));
  }
}

template <typename Src, typename Dst>
cudaError_t launch_convert(const ConvertParams& params, cudaStream_t stream) {
  const int64_t count = params.num_rows * params.num_cols;
  if (count == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div(count, kThreads) < 65536 ? ceil_div(count, kThreads) : 65536;
  convert_kernel<Src, Dst><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
