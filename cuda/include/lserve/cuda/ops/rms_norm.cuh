// rms_norm with the fused residual add: x = input (+ residual, written back to residual);
// output = weight * (x / sqrt(mean(x^2) + eps)), float32 arithmetic, rounded once to Out.
// One block per token: pass 1 adds, stores the residual and sums squares; pass 2 normalises.
// output may alias input (each element is read and written by the same thread).
// Reference: cpp/src/cpu/rms_norm.cpp (cpu::rms_norm).
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct RmsNormParams {
  const void* input;   // (num_tokens, hidden_size), row stride input_stride
  float* residual;     // optional (num_tokens, hidden_size), row stride residual_stride; null: none
  const void* weight;  // (hidden_size,)
  void* output;        // (num_tokens, hidden_size), row stride output_stride
  int64_t num_tokens = 0;
  int64_t hidden_size = 0;
  int64_t input_stride = 0;
  int64_t residual_stride = 0;
  int64_t output_stride = 0;
  float eps = 1e-6f;
};

template <typename In, typename W, typename Out>
__global__ void rms_norm_kernel(RmsNormParams params) {
  __shared__ float scratch[32];
  const int64_t token = blockIdx.x, hidden = params.hidden_size;
  const In* in = static_cast<const In*>(params.input) + token * params.input_stride;
  float* residual = params.residual ? params.residual + token * params.residual_stride : nullptr;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float x = to_float(in[i]);
    if (residual) {
      x = residual[i] + x;
      residual[i] = x;
    }
    sum_sq += x * x;
  }
  sum_sq = block_sum(sum_sq, scratch);
  const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(hidden) + params.eps);
  const W* weight = static_cast<const W*>(params.weight);
  Out* out = static_cast<Out*>(params.output) + token * params.output_stride;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float x = residual ? residual[i] : to_float(in[i]);
    out[i] = from_float<Out>(to_float(weight[i]) * (x * inv_rms));
  }
}

template <typename In, typename W, typename Out>
cudaError_t launch_rms_norm(const RmsNormParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return cudaSuccess;
  const int threads = params.hidden_size >= 2048 ? 512 : 256;
  rms_norm_kernel<In, W, Out><<<static_cast<unsigned>(params.num_tokens), threads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
