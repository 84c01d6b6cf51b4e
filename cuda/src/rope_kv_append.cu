// rope_kv_append on CUDA: RopeKvAppendArgs -> RopeKvAppendParams, dispatch on the activation and
// KV cache dtypes.
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/rope_kv_append.cuh"

namespace lserve {

void cuda_rope_kv_append(CudaBackend& backend, const RopeKvAppendArgs& args) {
  cuda::RopeKvAppendParams params;
  params.query = args.query.data;
  params.key = args.key.data;
  params.value = args.value.data;
  params.positions = args.positions.data_ptr<int32_t>();
  params.cos_sin = args.cos_sin_cache.data_ptr<float>();
  params.k_cache = args.k_cache.data;
  params.v_cache = args.v_cache.data;
  params.slot_mapping = args.slot_mapping.data_ptr<int64_t>();
  if (args.mirror_slot_mapping.defined()) params.mirror_slot_mapping = args.mirror_slot_mapping.data_ptr<int64_t>();
  params.num_tokens = args.query.size(0);
  params.num_qo_heads = args.query.size(1);
  params.num_kv_heads = args.key.size(1);
  params.head_dim = args.query.size(2);
  params.rotary_dim = args.cos_sin_cache.size(1);
  params.max_positions = args.cos_sin_cache.size(0);
  params.num_slots = args.k_cache.size(0) * args.k_cache.size(1);
  params.q_stride_token = args.query.stride(0);
  params.q_stride_head = args.query.stride(1);
  params.k_stride_token = args.key.stride(0);
  params.k_stride_head = args.key.stride(1);
  params.v_stride_token = args.value.stride(0);
  params.v_stride_head = args.value.stride(1);
  dispatch_float(args.query.dtype, "rope_kv_append", [&](auto act_tag) {
    dispatch_float(args.k_cache.dtype, "rope_kv_append", [&](auto cache_tag) {
      LSERVE_CUDA_CHECK((cuda::launch_rope_kv_append<decltype(act_tag), decltype(cache_tag)>(
          params, backend.stream())));
    });
  });
}

}  // namespace lserve
