// The reference paged attention on CUDA: AttentionArgs -> AttentionReferenceParams, dispatch on the
// KV cache dtype and head_dim (channels per lane: 2, 4 or 8, so head_dim <= 64, 128 or 256).
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/attention/reference.cuh"

namespace lserve {

void cuda_attention_reference(CudaBackend& backend, const AttentionArgs& args) {
  const int64_t head_dim = args.query.size(2);
  LSERVE_CHECK(head_dim <= kMaxAttentionHeadDim, "attention on CUDA supports head_dim <= ", kMaxAttentionHeadDim,
               ", got ", head_dim);  // CudaBackend::supports_impl refuses it first
  cuda::AttentionReferenceParams params;
  params.query = args.query.data;
  params.k_cache = args.k_cache.data;
  params.v_cache = args.v_cache.data;
  params.qo_indptr = args.qo_indptr.data_ptr<int32_t>();
  if (args.has_ring()) {
    params.stream_ring = args.stream_ring.data_ptr<int32_t>();
  } else {
    params.kv_page_indptr = args.kv_page_indptr.data_ptr<int32_t>();
    params.kv_page_indices = args.kv_page_indices.data_ptr<int32_t>();
  }
  if (args.has_window()) {
    params.window_sink = args.window_sink.data_ptr<int32_t>();
    params.window_local = args.window_local.data_ptr<int32_t>();
  }
  if (args.has_selection()) {
    params.selection = args.selection.data_ptr<int32_t>();
    params.selection_count = args.selection_count.data_ptr<int32_t>();
    params.selection_capacity = args.selection.size(2);
    if (args.select_slot.defined()) {
      params.select_slot = args.select_slot.data_ptr<int32_t>();
      params.select_base = args.select_base.data_ptr<int32_t>();
    }
  }
  params.kv_lens = args.kv_lens.data_ptr<int32_t>();
  params.output = args.output.data;
  params.query_type = elem_type(args.query.dtype);
  params.output_type = elem_type(args.output.dtype);
  params.num_tokens = args.query.size(0);
  params.num_seqs = args.qo_indptr.size(0) - 1;
  params.num_qo_heads = args.query.size(1);
  params.num_kv_heads = args.k_cache.size(2);
  params.head_dim = head_dim;
  params.page_size = args.k_cache.size(1);
  params.q_stride_token = args.query.stride(0);
  params.q_stride_head = args.query.stride(1);
  params.o_stride_token = args.output.stride(0);
  params.o_stride_head = args.output.stride(1);
  params.sm_scale = args.sm_scale;
  if (params.num_seqs <= 0 || params.num_tokens == 0) return;
  auto launch = [&](auto kv_tag) {
    using KV = decltype(kv_tag);
    cudaError_t status;
    if (head_dim <= 64) {
      status = cuda::launch_attention_reference<KV, 2>(params, backend.stream());
    } else if (head_dim <= 128) {
      status = cuda::launch_attention_reference<KV, 4>(params, backend.stream());
    } else {
      status = cuda::launch_attention_reference<KV, 8>(params, backend.stream());
    }
    LSERVE_CUDA_CHECK(status);
  };
  if (args.k_cache.dtype == DType::kF32) {
    launch(float{});
  } else {
    LSERVE_CHECK(args.k_cache.dtype == DType::kBF16, "attention on CUDA: unsupported KV cache dtype ",
                 dtype_name(args.k_cache.dtype));
    launch(__nv_bfloat16{});
  }
}

}  // namespace lserve
