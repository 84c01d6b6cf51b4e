// sample on CUDA: SampleArgs -> SampleParams, one launch on the backend's stream (no allocation, no
// sync: graph-capturable). Rows the CPU reference would reject get token -1 (see ops/sample.h).
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/sample.cuh"

namespace lserve {

void cuda_sample(CudaBackend& backend, const SampleArgs& args) {
  cuda::SampleParams params;
  params.logits = args.logits.data_ptr<float>();
  params.logits_stride = args.logits.stride(0);
  params.temperature = args.temperature.data_ptr<float>();
  params.top_k = args.top_k.data_ptr<int32_t>();
  params.top_p = args.top_p.data_ptr<float>();
  params.min_p = args.min_p.data_ptr<float>();
  params.seed = args.seed.data_ptr<int64_t>();
  params.offset = args.offset.data_ptr<int64_t>();
  params.output = args.output.data_ptr<int32_t>();
  if (args.has_penalties()) {
    params.history_indptr = args.history_indptr.data_ptr<int32_t>();
    params.history_token_ids = args.history_token_ids.data_ptr<int32_t>();
    params.num_history = args.history_token_ids.size(0);
    params.num_prompt_tokens = args.num_prompt_tokens.data_ptr<int32_t>();
    params.repetition_penalty = args.repetition_penalty.data_ptr<float>();
    params.presence_penalty = args.presence_penalty.data_ptr<float>();
    params.frequency_penalty = args.frequency_penalty.data_ptr<float>();
    params.workspace = reinterpret_cast<uint32_t*>(args.workspace.data_ptr<uint8_t>());
  }
  if (args.has_banned()) {
    params.banned_indptr = args.banned_indptr.data_ptr<int32_t>();
    params.banned_token_ids = args.banned_token_ids.data_ptr<int32_t>();
    params.num_banned = args.banned_token_ids.size(0);
  }
  LSERVE_CHECK(args.logits.size(0) <= INT32_MAX, "sample: ", args.logits.size(0), " rows exceed the CUDA grid");
  params.num_rows = static_cast<int>(args.logits.size(0));
  params.vocab_size = static_cast<int>(args.logits.size(1));  // <= kSampleMaxVocabSize (validate)
  LSERVE_CUDA_CHECK(cuda::launch_sample(params, backend.stream()));
}

}  // namespace lserve
