// gather_rows on CUDA: GatherRowsArgs -> GatherRowsParams, dispatch on the input and output dtypes.
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/gather_rows.cuh"

namespace lserve {

void cuda_gather_rows(CudaBackend& backend, const GatherRowsArgs& args) {
  cuda::GatherRowsParams params;
  params.input = args.input.data;
  params.indices = args.indices.data_ptr<int32_t>();
  params.output = args.output.data;
  params.num_rows = args.input.size(0);
  params.num_out = args.indices.size(0);
  params.width = args.input.size(1);
  params.input_stride = args.input.stride(0);
  params.output_stride = args.output.stride(0);
  dispatch_float(args.input.dtype, "gather_rows", [&](auto in_tag) {
    dispatch_float(args.output.dtype, "gather_rows", [&](auto out_tag) {
      LSERVE_CUDA_CHECK((cuda::launch_gather_rows<decltype(in_tag), decltype(out_tag)>(params, backend.stream())));
    });
  });
}

}  // namespace lserve
