// attention on CUDA: picks the kernel for a batch. Today every batch runs the reference kernel
// (attention_reference.cu); the CuTe prefill and split-KV decode kernels (cuda/attention/) take
// over here by dispatch, keeping the reference for the shapes they do not cover.
#include "cuda_backend.h"

namespace lserve {

void cuda_attention(CudaBackend& backend, const AttentionArgs& args) { cuda_attention_reference(backend, args); }

}  // namespace lserve
