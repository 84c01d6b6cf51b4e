// rms_norm (fused residual add) on CUDA: RmsNormArgs -> RmsNormParams, dispatch on the input,
// weight and output dtypes.
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/rms_norm.cuh"

namespace lserve {

void cuda_rms_norm(CudaBackend& backend, const RmsNormArgs& args) {
  cuda::RmsNormParams params;
  params.input = args.input.data;
  params.residual = args.residual.defined() ? args.residual.data_ptr<float>() : nullptr;
  params.weight = args.weight.data;
  params.output = args.output.data;
  params.num_tokens = args.input.size(0);
  params.hidden_size = args.input.size(1);
  params.input_stride = args.input.stride(0);
  params.residual_stride = args.residual.defined() ? args.residual.stride(0) : 0;
  params.output_stride = args.output.stride(0);
  params.eps = args.eps;
  dispatch_float(args.input.dtype, "rms_norm", [&](auto in_tag) {
    dispatch_float(args.weight.dtype, "rms_norm", [&](auto weight_tag) {
      dispatch_float(args.output.dtype, "rms_norm", [&](auto out_tag) {
        LSERVE_CUDA_CHECK((cuda::launch_rms_norm<decltype(in_tag), decltype(weight_tag), decltype(out_tag)>(
            params, backend.stream())));
      });
    });
  });
}

}  // namespace lserve
