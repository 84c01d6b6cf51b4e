// gather_rows: output[i, :] = Out(input[indices[i], :]). One block per output row. Indices are
// validated by the engine; one outside [0, num_rows) gives a NaN row (the CPU reference raises).
// Reference: cpp/src/cpu (cpu_gather_rows).
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct GatherRowsParams {
  const void* input;       // (num_rows, width), row stride input_stride
  const int32_t* indices;  // (num_out,)
  void* output;            // (num_out, width), row stride output_stride
  int64_t num_rows = 0;
  int64_t num_out = 0;
  int64_t width = 0;
  int64_t input_stride = 0;
  int64_t output_stride = 0;
};

template <typename In, typename Out>
__global__ void gather_rows_kernel(GatherRowsParams params) {
  const int64_t row = blockIdx.x;
  const int32_t index = params.indices[row];
  const bool valid = index >= 0 && index < params.num_rows;
  const In* in = static_cast<const In*>(params.input) + (valid ? index : 0) * params.input_stride;
  Out* out = static_cast<Out*>(params.output) + row * params.output_stride;
  for (int64_t i = threadIdx.x; i < params.width; i += blockDim.x) {
    out[i] = from_float<Out>(valid ? to_float(in[i]) : __int_as_float(0x7fc00000));
  }
}

template <typename In, typename Out>
cudaError_t launch_gather_rows(const GatherRowsParams& params, cudaStream_t stream) {
  if (params.num_out == 0) return cudaSuccess;
  gather_rows_kernel<In, Out><<<static_cast<unsigned>(params.num_out), 256, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
