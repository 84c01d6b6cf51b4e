// decode kernels for bf16.
#include "../decode.cuh"

namespace lserve::cuda {
template cudaError_t decode_run<cute::bfloat16_t>(const AttentionParams&, int, float*, float*, cudaStream_t);
}  // namespace lserve::cuda
