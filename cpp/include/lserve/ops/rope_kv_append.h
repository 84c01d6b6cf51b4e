// rope_kv_append: rotate query and key in place with rotary embeddings (NeoX / Hugging Face
// "rotate_half" layout over the first rotary_dim channels), then write key and value into the
// paged KV cache at slot_mapping[t] = page_idx * page_size + offset (a slot < 0 skips the token).
// The cos/sin table comes from lserve::rope_cos_sin_cache (cpp/include/lserve/model/rope.h),
// which applies the scaling (default, linear, llama3, yarn) of the model config. The rotation is
// computed in float32; bfloat16/float16 query and key are rounded once when stored, and the
// cache receives the float32 rotated key rounded to the cache's dtype. An optional second slot
// mapping stores each token once more (a streaming head's decode ring filled while the sequence
// prefills through its larger prefill ring); the two mappings must not share a slot.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct RopeKvAppendArgs {
  TensorView query;          // (num_tokens, num_qo_heads, head_dim) f32 | bf16 | f16, in place
  TensorView key;            // (num_tokens, num_kv_heads, head_dim) query's dtype, updated in place
  TensorView value;          // (num_tokens, num_kv_heads, head_dim) query's dtype
  TensorView positions;      // (num_tokens,) int32, each in [0, max_positions)
  TensorView cos_sin_cache;  // (max_positions, rotary_dim) float32: [cos(rotary_dim/2) | sin(rotary_dim/2)]
  TensorView k_cache;        // (num_pages, page_size, num_kv_heads, head_dim) float32 | bfloat16
  TensorView v_cache;        // (num_pages, page_size, num_kv_heads, head_dim), k_cache's dtype
  TensorView slot_mapping;   // (num_tokens,) int64
  TensorView mirror_slot_mapping;  // optional (num_tokens,) int64: a second slot per token (< 0 skips)

  void validate(const Device& device) const {
    const char* op = "rope_kv_append";
    TensorCheck(query, op, "query").ndim(3).float_dtype().device(device).rows_contiguous();
    const int64_t num_tokens = query.size(0), head_dim = query.size(2);
    TensorCheck(key, op, "key").ndim(3).dtype(query.dtype).device(device).rows_contiguous()
        .size(0, num_tokens).size(2, head_dim);
    const int64_t num_kv_heads = key.size(1);
    LSERVE_CHECK(query.size(1) % num_kv_heads == 0, op, ": num_qo_heads ", query.size(1),
                 " is not a multiple of num_kv_heads ", num_kv_heads);
    TensorCheck(value, op, "value").ndim(3).dtype(query.dtype).device(device).rows_contiguous()
        .size(0, num_tokens).size(1, num_kv_heads).size(2, head_dim);
    TensorCheck(positions, op, "positions").ndim(1).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_tokens);
    TensorCheck(cos_sin_cache, op, "cos_sin_cache").ndim(2).dtype(DType::kF32).device(device).contiguous();
    const int64_t rotary_dim = cos_sin_cache.size(1);
    LSERVE_CHECK(rotary_dim % 2 == 0 && rotary_dim <= head_dim && rotary_dim > 0, op, ": rotary_dim ",
                 rotary_dim, " must be even and in (0, head_dim=", head_dim, "]");
    TensorCheck(k_cache, op, "k_cache").ndim(4).dtype_in({DType::kF32, DType::kBF16}).device(device)
        .contiguous().size(2, num_kv_heads).size(3, head_dim);
    TensorCheck(v_cache, op, "v_cache").ndim(4).dtype(k_cache.dtype).device(device).contiguous()
        .size(0, k_cache.size(0)).size(1, k_cache.size(1)).size(2, num_kv_heads).size(3, head_dim);
    TensorCheck(slot_mapping, op, "slot_mapping").ndim(1).dtype(DType::kI64).device(device).contiguous()
        .size(0, num_tokens);
    if (mirror_slot_mapping.defined()) {
      TensorCheck(mirror_slot_mapping, op, "mirror_slot_mapping").ndim(1).dtype(DType::kI64).device(device)
          .contiguous().size(0, num_tokens);
    }
  }
};

}  // namespace lserve
