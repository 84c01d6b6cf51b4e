// silu_mul: output[t, i] = silu(input[t, i]) * input[t, width + i], silu(g) = g / (1 + exp(-g)),
// float32 arithmetic, rounded once to Out. One block per token, threads stride over the width.
// Reference: cpp/src/cpu (cpu_silu_mul).
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct SiluMulParams {
  const void* input;  // (num_tokens, 2 * width), row stride input_stride
  void* output;       // (num_tokens, width), row stride output_stride
  int64_t num_tokens = 0;
  int64_t width = 0;
  int64_t input_stride = 0;
  int64_t output_stride = 0;
};

template <typename In, typename Out>
__global__ void silu_mul_kernel(SiluMulParams params) {
  const int64_t token = blockIdx.x;
  const In* gate = static_cast<const In*>(params.input) + token * params.input_stride;
  const In* up = gate + params.width;
  Out* out = static_cast<Out*>(params.output) + token * params.output_stride;
  for (int64_t i = threadIdx.x; i < params.width; i += blockDim.x) {
    const float g = to_float(gate[i]);
    out[i] = from_float<Out>(g / (1.0f + expf(-g)) * to_float(up[i]));
  }
}

template <typename In, typename Out>
cudaError_t launch_silu_mul(const SiluMulParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return cudaSuccess;
  silu_mul_kernel<In, Out><<<static_cast<unsigned>(params.num_tokens), 256, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
