// CPU reference of rope_kv_append: NeoX-style rotation of q and k in place over the first
// rotary_dim channels, then K/V written to the paged cache at slot_mapping.
#include <cstring>

#include "cpu/cpu_backend.h"

namespace lserve {

namespace {

void rotate(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

void store(const float* src, const TensorView& cache, int64_t offset, int64_t count) {
  if (cache.dtype == DType::kF32) {
    std::memcpy(cache.data_ptr<float>() + offset, src, static_cast<size_t>(count) * 4);
  } else {
    bf16_t* out = cache.data_ptr<bf16_t>() + offset;
    for (int64_t i = 0; i < count; ++i) out[i] = float_to_bf16(src[i]);
  }
}

}  // namespace

void cpu_rope_kv_append(const RopeKvAppendArgs& args) {
  const int64_t num_tokens = args.query.size(0), num_qo_heads = args.query.size(1), head_dim = args.query.size(2);
  const int64_t num_kv_heads = args.key.size(1);
  const int64_t max_positions = args.cos_sin_cache.size(0), rotary_dim = args.cos_sin_cache.size(1);
  const int64_t half = rotary_dim / 2;
  const int64_t num_slots = args.k_cache.size(0) * args.k_cache.size(1);
  const int64_t slot_width = num_kv_heads * head_dim;
  const int32_t* positions = args.positions.data_ptr<int32_t>();
  const int64_t* slots = args.slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    LSERVE_CHECK(positions[t] >= 0 && positions[t] < max_positions, "rope_kv_append: position ", positions[t],
                 " at token ", t, " outside the rotary table [0, ", max_positions, ")");
    LSERVE_CHECK(slots[t] < num_slots, "rope_kv_append: slot ", slots[t], " at token ", t, " beyond the cache's ",
                 num_slots, " slots");
    const float* cos = args.cos_sin_cache.data_ptr<float>() + positions[t] * rotary_dim;
    const float* sin = cos + half;
    float* q = args.query.data_ptr<float>() + t * args.query.stride(0);
    for (int64_t h = 0; h < num_qo_heads; ++h) rotate(q + h * args.query.stride(1), cos, sin, half);
    float* k = args.key.data_ptr<float>() + t * args.key.stride(0);
    for (int64_t h = 0; h < num_kv_heads; ++h) rotate(k + h * args.key.stride(1), cos, sin, half);
    if (slots[t] < 0) continue;
    const float* v = args.value.data_ptr<float>() + t * args.value.stride(0);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      store(k + h * args.key.stride(1), args.k_cache, slots[t] * slot_width + h * head_dim, head_dim);
      store(v + h * args.value.stride(1), args.v_cache, slots[t] * slot_width + h * head_dim, head_dim);
    }
  }
}

}  // namespace lserve
