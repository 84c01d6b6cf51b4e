// embed on CUDA: EmbedArgs -> EmbedParams, dispatch on the weight dtype.
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/embed.cuh"

namespace lserve {

void cuda_embed(CudaBackend& backend, const EmbedArgs& args) {
  cuda::EmbedParams params;
  params.token_ids = args.token_ids.data_ptr<int32_t>();
  params.weight = args.weight.data;
  params.output = args.output.data_ptr<float>();
  params.num_tokens = args.token_ids.size(0);
  params.vocab_size = args.weight.size(0);
  params.hidden_size = args.weight.size(1);
  params.output_stride = args.output.stride(0);
  dispatch_float(args.weight.dtype, "embed", [&](auto weight_tag) {
    LSERVE_CUDA_CHECK(cuda::launch_embed<decltype(weight_tag)>(params, backend.stream()));
  });
}

}  // namespace lserve
