// embed: output[t, :] = float(weight[token_ids[t], :]). One block per token, threads stride over
// the hidden size. Ids are validated by the engine; an id outside the vocabulary gives a NaN row
// (the CPU reference raises). Reference: cpp/src/cpu (cpu_embed).
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct EmbedParams {
  const int32_t* token_ids;  // (num_tokens,)
  const void* weight;        // (vocab_size, hidden_size)
  float* output;             // (num_tokens, hidden_size), row stride output_stride
  int64_t num_tokens = 0;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t output_stride = 0;
};

template <typename W>
__global__ void embed_kernel(EmbedParams params) {
  const int64_t token = blockIdx.x;
  const int32_t id = params.token_ids[token];
  float* out = params.output + token * params.output_stride;
  const bool valid = id >= 0 && id < params.vocab_size;
  const W* row = static_cast<const W*>(params.weight) + (valid ? id : 0) * params.hidden_size;
  for (int64_t i = threadIdx.x; i < params.hidden_size; i += blockDim.x) {
    out[i] = valid ? to_float(row[i]) : __int_as_float(0x7fc00000);
  }
}

template <typename W>
cudaError_t launch_embed(const EmbedParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return cudaSuccess;
  embed_kernel<W><<<static_cast<unsigned>(params.num_tokens), 256, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
