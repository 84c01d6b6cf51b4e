// logprobs on CUDA: LogprobsArgs -> LogprobsParams, one launch on the backend's stream (no allocation,
// no sync: graph-capturable). Contract: cpp/include/lserve/ops/logprobs.h.
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/logprobs.cuh"

namespace lserve {

void cuda_logprobs(CudaBackend& backend, const LogprobsArgs& args) {
  cuda::LogprobsParams params;
  params.logits = args.logits.data_ptr<float>();
  params.logits_stride = args.logits.stride(0);
  params.row_indices = args.row_indices.data_ptr<int32_t>();
  params.token_ids = args.token_ids.data_ptr<int32_t>();
  params.logprobs = args.logprobs.data_ptr<float>();
  params.top_token_ids = args.top_token_ids.data_ptr<int32_t>();
  params.top_logprobs = args.top_logprobs.data_ptr<float>();
  LSERVE_CHECK(args.row_indices.size(0) <= INT32_MAX, "logprobs: ", args.row_indices.size(0),
               " rows exceed the CUDA grid");
  params.num_rows = static_cast<int>(args.row_indices.size(0));
  params.num_logits_rows = args.logits.size(0);
  params.vocab_size = static_cast<int>(args.logits.size(1));  // < 2^31 (validate)
  params.num_top = static_cast<int>(args.num_top());          // <= kMaxLogprobs (validate)
  LSERVE_CUDA_CHECK(cuda::launch_logprobs(params, backend.stream()));
}

}  // namespace lserve
