// prefill_sm80 kernels for bf16.
#include "../prefill_sm80.cuh"

namespace lserve::cuda {
template cudaError_t prefill_sm80_run<cute::bfloat16_t>(const AttentionParams&, cudaStream_t);
}  // namespace lserve::cuda
