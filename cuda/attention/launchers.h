// Per-dtype entry points of the kernel families, defined in prefill_sm80.cuh, prefill_sm90.cuh and
// decode.cuh and instantiated one dtype per file in instantiations/ (compile time, parallel builds).
#pragma once

#include "attention_kernels.h"

namespace lserve::cuda {

template <class Element>
cudaError_t prefill_sm80_run(const AttentionParams& p, cudaStream_t stream);
template <class Element>
cudaError_t prefill_sm90_run(const AttentionParams& p, cudaStream_t stream);
template <class Element>
cudaError_t decode_run(const AttentionParams& p, int num_splits, float* partial_o, float* partial_lse,
                       cudaStream_t stream);

}  // namespace lserve::cuda
