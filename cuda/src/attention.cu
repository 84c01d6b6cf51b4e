// attention on CUDA: picks the kernel for a batch. bfloat16/float16 queries over a cache of the same
// dtype, head_dim 64 or 128, dense heads, with the host's length hints: the tensor-core kernels of
// cuda/attention/ (decode: split-KV + combine when every chunk's q_len x GQA group fits one 16-row
// tile, i.e. decode steps; otherwise the prefill kernel, TMA + wgmma on sm_90). float32, other head
// sizes and calls without hints run the reference kernel; so does a selection store in a prefill call.
#include "attention_kernels.h"
#include "cuda_backend.h"
#include "cuda_check.h"

namespace lserve {

namespace {

bool tensor_core_path(const AttentionArgs& args) {
  const DType dtype = args.query.dtype;
  if (dtype != DType::kBF16 && dtype != DType::kF16) return false;
  if (args.output.dtype != dtype || args.k_cache.dtype != dtype || args.v_cache.dtype != dtype) return false;
  const int64_t head_dim = args.query.size(2);
  if (head_dim != 64 && head_dim != 128) return false;
  if (args.max_q_len <= 0 || args.max_kv_len <= 0) return false;
  return args.query.stride(2) == 1 && args.output.stride(2) == 1 && args.k_cache.is_contiguous() &&
         args.v_cache.is_contiguous();
}

}  // namespace

void cuda_attention(CudaBackend& backend, const AttentionArgs& args) {
  // The tensor-core kernels read the sparse policy through KvBlockSparsity: windows and stream rings in
  // prefill and decode, the selection store at decode. A selection store in a prefill-shaped call
  // (TODO(#17)) runs on the reference kernel.
  const int group = static_cast<int>(args.query.size(1) / args.k_cache.size(2));
  const bool decode_shape = args.max_q_len > 0 && args.max_q_len * group <= cuda::decode_max_group_rows();
  if ((args.has_selection() && !decode_shape) || !tensor_core_path(args)) {
    cuda_attention_reference(backend, args);
    return;
  }
  cuda::AttentionParams p;
  p.dtype = args.query.dtype == DType::kBF16 ? cuda::AttnDType::kBF16 : cuda::AttnDType::kF16;
  p.head_dim = static_cast<int32_t>(args.query.size(2));
  p.num_qo_heads = static_cast<int32_t>(args.query.size(1));
  p.num_kv_heads = static_cast<int32_t>(args.k_cache.size(2));
  p.page_size = static_cast<int32_t>(args.k_cache.size(1));
  p.num_pages = static_cast<int32_t>(args.k_cache.size(0));
  p.num_seqs = static_cast<int32_t>(args.qo_indptr.size(0) - 1);
  p.num_tokens = static_cast<int32_t>(args.query.size(0));
  p.max_q_len = args.max_q_len;
  p.max_kv_len = args.max_kv_len;
  if (p.num_seqs <= 0 || p.num_tokens == 0) return;
  p.q = args.query.data;
  p.q_stride_token = args.query.stride(0);
  p.q_stride_head = args.query.stride(1);
  p.o = args.output.data;
  p.o_stride_token = args.output.stride(0);
  p.o_stride_head = args.output.stride(1);
  p.k_cache = args.k_cache.data;
  p.v_cache = args.v_cache.data;
  p.kv_stride_page = args.k_cache.stride(0);
  p.kv_stride_token = args.k_cache.stride(1);
  p.kv_stride_head = args.k_cache.stride(2);
  p.qo_indptr = args.qo_indptr.data_ptr<int32_t>();
  if (!args.has_ring()) {
    p.kv_page_indptr = args.kv_page_indptr.data_ptr<int32_t>();
    p.kv_page_indices = args.kv_page_indices.data_ptr<int32_t>();
  }
  p.kv_lens = args.kv_lens.data_ptr<int32_t>();
  p.sm_scale = args.sm_scale;
  cuda::KvBlockSparsity& sp = p.sparsity;
  if (args.has_ring()) sp.stream_ring = args.stream_ring.data_ptr<int32_t>();
  if (args.has_window()) {
    sp.window_sink = args.window_sink.data_ptr<int32_t>();
    sp.window_local = args.window_local.data_ptr<int32_t>();
  }
  if (args.has_selection()) {
    sp.selection = args.selection.data_ptr<int32_t>();
    sp.selection_count = args.selection_count.data_ptr<int32_t>();
    sp.num_slots = static_cast<int32_t>(args.selection.size(0));
    sp.capacity = static_cast<int32_t>(args.selection.size(2));
    if (args.select_slot.defined()) {
      sp.select_slot = args.select_slot.data_ptr<int32_t>();
      sp.select_base = args.select_base.data_ptr<int32_t>();
    }
  }

  if (decode_shape) {
    const int num_splits = cuda::decode_num_splits(p, backend.num_sms());
    const size_t bytes = cuda::decode_workspace_bytes(p, num_splits);
    Tensor scratch;
    void* workspace = backend.workspace(CudaBackend::Workspace::kDecodeAttention, bytes, &scratch);
    LSERVE_CUDA_CHECK(cuda::attention_decode(p, num_splits, workspace, bytes, backend.stream()));
  } else {
    LSERVE_CUDA_CHECK(cuda::attention_prefill(p, backend.stream()));
  }
}

}  // namespace lserve
