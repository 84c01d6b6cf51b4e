// rope_kv_append: rotate query and key in place (NeoX "rotate_half" over the first rotary_dim
// channels, cos/sin read from the model's table, so every RoPE scaling is the table's business),
// then store key and value at slot_mapping[t] of the paged caches (slot < 0 or beyond the cache:
// skipped), and once more at mirror_slot_mapping[t] when given. The rotation is float32; the cache
// gets the float32 rotated key rounded to Cache.
// One block per token: threads walk (head, channel pair) for q and k, then (head, channel) for the
// unrotated key channels and the value. Reference: cpp/src/cpu/rope_kv_append.cpp.
#pragma once

#include "lserve/cuda/common/math.cuh"

namespace lserve::cuda {

struct RopeKvAppendParams {
  void* query;                // (num_tokens, num_qo_heads, head_dim), strides (q_stride_token, q_stride_head, 1)
  void* key;                  // (num_tokens, num_kv_heads, head_dim), strides (k_stride_token, k_stride_head, 1)
  const void* value;          // (num_tokens, num_kv_heads, head_dim), strides (v_stride_token, v_stride_head, 1)
  const int32_t* positions;   // (num_tokens,)
  const float* cos_sin;       // (max_positions, rotary_dim): [cos(rotary_dim / 2) | sin(rotary_dim / 2)]
  void* k_cache;              // (num_slots, num_kv_heads, head_dim) = (num_pages * page_size, ...)
  void* v_cache;              // (num_slots, num_kv_heads, head_dim)
  const int64_t* slot_mapping;  // (num_tokens,)
  const int64_t* mirror_slot_mapping = nullptr;  // (num_tokens,) or null: a second slot per token
  int64_t num_tokens = 0;
  int64_t num_qo_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t rotary_dim = 0;
  int64_t max_positions = 0;
  int64_t num_slots = 0;
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_token = 0, v_stride_head = 0;
};

template <typename T, typename Cache>
__global__ void rope_kv_append_kernel(RopeKvAppendParams params) {
  const int64_t token = blockIdx.x, half = params.rotary_dim / 2, head_dim = params.head_dim;
  const int32_t position = params.positions[token];
  const bool valid_position = position >= 0 && position < params.max_positions;
  const float* cos = params.cos_sin + (valid_position ? position : 0) * params.rotary_dim;
  const float* sin = cos + half;
  const float nan = __int_as_float(0x7fc00000);
  const int64_t slot = params.slot_mapping[token];
  const bool store = slot >= 0 && slot < params.num_slots;
  const int64_t slot_offset = slot * params.num_kv_heads * head_dim;
  const int64_t mirror = params.mirror_slot_mapping != nullptr ? params.mirror_slot_mapping[token] : -1;
  const bool store_mirror = mirror >= 0 && mirror < params.num_slots;
  const int64_t mirror_offset = mirror * params.num_kv_heads * head_dim;

  T* query = static_cast<T*>(params.query) + token * params.q_stride_token;
  for (int64_t idx = threadIdx.x; idx < params.num_qo_heads * half; idx += blockDim.x) {
    const int64_t head = idx / half, i = idx % half;
    T* q = query + head * params.q_stride_head;
    const float c = valid_position ? cos[i] : nan, s = valid_position ? sin[i] : nan;
    const float a = to_float(q[i]), b = to_float(q[i + half]);
    q[i] = from_float<T>(a * c - b * s);
    q[i + half] = from_float<T>(b * c + a * s);
  }
  T* key = static_cast<T*>(params.key) + token * params.k_stride_token;
  Cache* k_cache = static_cast<Cache*>(params.k_cache) + slot_offset;
  Cache* k_mirror = static_cast<Cache*>(params.k_cache) + mirror_offset;
  for (int64_t idx = threadIdx.x; idx < params.num_kv_heads * half; idx += blockDim.x) {
    const int64_t head = idx / half, i = idx % half;
    T* k = key + head * params.k_stride_head;
    const float c = valid_position ? cos[i] : nan, s = valid_position ? sin[i] : nan;
    const float a = to_float(k[i]), b = to_float(k[i + half]);
    const float rotated_a = a * c - b * s, rotated_b = b * c + a * s;
    k[i] = from_float<T>(rotated_a);
    k[i + half] = from_float<T>(rotated_b);
    if (store) {
      k_cache[head * head_dim + i] = from_float<Cache>(rotated_a);
      k_cache[head * head_dim + i + half] = from_float<Cache>(rotated_b);
    }
    if (store_mirror) {
      k_mirror[head * head_dim + i] = from_float<Cache>(rotated_a);
      k_mirror[head * head_dim + i + half] = from_float<Cache>(rotated_b);
    }
  }
  if (!store && !store_mirror) return;
  const T* value = static_cast<const T*>(params.value) + token * params.v_stride_token;
  Cache* v_cache = static_cast<Cache*>(params.v_cache) + slot_offset;
  Cache* v_mirror = static_cast<Cache*>(params.v_cache) + mirror_offset;
  for (int64_t idx = threadIdx.x; idx < params.num_kv_heads * head_dim; idx += blockDim.x) {
    const int64_t head = idx / head_dim, d = idx % head_dim;
    const Cache v_value = from_float<Cache>(to_float(value[head * params.v_stride_head + d]));
    if (store) v_cache[idx] = v_value;
    if (store_mirror) v_mirror[idx] = v_value;
    if (d < params.rotary_dim) continue;  // the rotated channels were stored above
    const Cache k_value = from_float<Cache>(to_float(key[head * params.k_stride_head + d]));
    if (store) k_cache[idx] = k_value;
    if (store_mirror) k_mirror[idx] = k_value;
  }
}

template <typename T, typename Cache>
cudaError_t launch_rope_kv_append(const RopeKvAppendParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0) return cudaSuccess;
  rope_kv_append_kernel<T, Cache><<<static_cast<unsigned>(params.num_tokens), 128, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace lserve::cuda
