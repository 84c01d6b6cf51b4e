// prefill_sm90 kernels for bf16.
#include "../prefill_sm90.cuh"

namespace lserve::cuda {
template cudaError_t prefill_sm90_run<cute::bfloat16_t>(const AttentionParams&, cudaStream_t);
}  // namespace lserve::cuda
