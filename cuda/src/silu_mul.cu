// silu_mul on CUDA: SiluMulArgs -> SiluMulParams, dispatch on the input and output dtypes.
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/silu_mul.cuh"

namespace lserve {

void cuda_silu_mul(CudaBackend& backend, const SiluMulArgs& args) {
  cuda::SiluMulParams params;
  params.input = args.input.data;
  params.output = args.output.data;
  params.num_tokens = args.input.size(0);
  params.width = args.output.size(1);
  params.input_stride = args.input.stride(0);
  params.output_stride = args.output.stride(0);
  dispatch_float(args.input.dtype, "silu_mul", [&](auto in_tag) {
    dispatch_float(args.output.dtype, "silu_mul", [&](auto out_tag) {
      LSERVE_CUDA_CHECK((cuda::launch_silu_mul<decltype(in_tag), decltype(out_tag)>(params, backend.stream())));
    });
  });
}

}  // namespace lserve
