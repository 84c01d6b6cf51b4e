// GEMM helpers beside cuBLASLt (cuda/src/gemm.cu): a tiled SIMT fallback for shapes cuBLASLt has no
// algorithm for, and the epilogue that adds a float32 bias to a float32 product and rounds once.
// Both compute output = input @ weight^T, the nn.Linear convention. Reference: cpp/src/cpu/gemm.cpp.
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct GemmFallbackParams {
  const void* input;   // (num_tokens, in_features), row stride input_stride
  const void* weight;  // (out_features, in_features), contiguous
  void* output;        // (num_tokens, out_features), row stride output_stride
  int64_t num_tokens = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t input_stride = 0;
  int64_t output_stride = 0;
};

// 16x16 output tile per 256-thread block, 16-wide K slabs through shared memory (the +1 column
// keeps the transposed reads off one bank). float32 accumulation.
constexpr int kGemmFallbackTile = 16;

template <typename In, typename W, typename Out>
__global__ void gemm_fallback_kernel(GemmFallbackParams params) {
  constexpr int kTile = kGemmFallbackTile;
  __shared__ float tile_in[kTile][kTile + 1];  // (token, k)
  __shared__ float tile_w[kTile][kTile + 1];   // (out feature, k)
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t m = int64_t(blockIdx.y) * kTile + ty, n = int64_t(blockIdx.x) * kTile + tx;
  const In* input = static_cast<const In*>(params.input);
  const W* weight = static_cast<const W*>(params.weight);
  float sum = 0.0f;
  for (int64_t k0 = 0; k0 < params.in_features; k0 += kTile) {
    const int64_t in_row = int64_t(blockIdx.y) * kTile + ty, w_row = int64_t(blockIdx.x) * kTile + ty;
    const int64_t k = k0 + tx;
    tile_in[ty][tx] = in_row < params.num_tokens && k < params.in_features
                          ? to_float(input[in_row * params.input_stride + k]) : 0.0f;
    tile_w[ty][tx] = w_row < params.out_features && k < params.in_features
                         ? to_float(weight[w_row * params.in_features + k]) : 0.0f;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk) sum += tile_in[ty][kk] * tile_w[tx][kk];
    __syncthreads();
  }
  if (m < params.num_tokens && n < params.out_features) {
    static_cast<Out*>(params.output)[m * params.output_stride + n] = from_float<Out>(sum);
  }
}

template <typename In, typename W, typename Out>
cudaError_t launch_gemm_fallback(const GemmFallbackParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0 || params.out_features == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(params.out_features, kGemmFallbackTile)),
                  static_cast<unsigned>(ceil_div(params.num_tokens, kGemmFallbackTile)));
  if (grid.y > 65535) return cudaErrorInvalidValue;
  gemm_fallback_kernel<In, W, Out><<<grid, kGemmFallbackTile * kGemmFallbackTile, 0, stream>>>(params);
  return cudaGetLastError();
}

struct BiasEpilogueParams {
  const float* product;  // (num_tokens, out_features), contiguous
  const float* bias;     // optional (out_features,); null: none
  void* output;          // (num_tokens, out_features), row stride output_stride
  int64_t num_tokens = 0;
  int64_t out_features = 0;
  int64_t output_stride = 0;
};

template <typename Out>
__global__ void bias_epilogue_kernel(BiasEpilogueParams params) {
  const int64_t count = params.num_tokens * params.out_features;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / params.out_features, n = i % params.out_features;
    const float value = params.product[i] + (params.bias ? params.bias[n] : 0.0f);
    static_cast<Out*>(params.output)[m * params.output_stride + n] = from_float<Out>(value);
  }
}

template <typename Out>
cudaError_t launch_bias_epilogue(const BiasEpilogueParams& params, cudaStream_t stream) {
  const int64_t count = params.num_tokens * params.out_features;
  if (count == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(count, 256) < 65536 ? ceil_div(count, 256) : 65536;
  bias_epilogue_kernel<Out><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
