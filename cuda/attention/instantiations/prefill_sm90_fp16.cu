// prefill_sm90 kernels for fp16.
#include "../prefill_sm90.cuh"

namespace lserve::cuda {
template cudaError_t prefill_sm90_run<cute::half_t>(const AttentionParams&, cudaStream_t);
}  // namespace lserve::cuda
