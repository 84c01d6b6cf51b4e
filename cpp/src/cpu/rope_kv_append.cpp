// CPU rope_kv_append: rotate query and key in place over the first rotary_dim channels (the
// NeoX / Hugging Face rotate_half layout: out = x * cos + rotate_half(x) * sin), then store key
// and value at slot_mapping[t] in the paged cache (slot < 0: rotate, but store nothing).
// Positions and slots are checked on the host before anything is written.
// Reference: transformers' apply_rotary_pos_emb.
#include <algorithm>
#include <type_traits>

#include "convert.h"
#include "cpu_backend.h"

namespace lserve::cpu {

namespace {

// x[:half], x[half:2*half] <- x1 * cos - x2 * sin, x2 * cos + x1 * sin.
inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

}  // namespace

void rope_kv_append(const CpuContext& context, const RopeKvAppendArgs& args) {
  const char* op = "rope_kv_append";
  const int64_t num_tokens = args.query.size(0), num_qo_heads = args.query.size(1), head_dim = args.query.size(2);
  const int64_t num_kv_heads = args.key.size(1);
  const int64_t max_positions = args.cos_sin_cache.size(0), rotary_dim = args.cos_sin_cache.size(1);
  const int64_t num_slots = args.k_cache.size(0) * args.k_cache.size(1);
  const int32_t* positions = args.positions.data_ptr<int32_t>();     // (num_tokens,)
  const int64_t* slot_mapping = args.slot_mapping.data_ptr<int64_t>();  // (num_tokens,)
  const int64_t* mirror = args.mirror_slot_mapping.defined() ? args.mirror_slot_mapping.data_ptr<int64_t>() : nullptr;
  for (int64_t t = 0; t < num_tokens; ++t) {
    LSERVE_CHECK(mirror == nullptr || mirror[t] < num_slots, op, ": mirror_slot_mapping[", t, "] = ", mirror[t],
                 " is beyond the cache's ", num_slots, " slots (num_pages * page_size)");
    LSERVE_CHECK(positions[t] >= 0 && positions[t] < max_positions, op, ": positions[", t, "] = ", positions[t],
                 " is out of range [0, ", max_positions, ") of cos_sin_cache");
    LSERVE_CHECK(slot_mapping[t] < num_slots, op, ": slot_mapping[", t, "] = ", slot_mapping[t],
                 " is beyond the cache's ", num_slots, " slots (num_pages * page_size)");
  }
  const float* cos_sin_cache = args.cos_sin_cache.data_ptr<float>();  // (max_positions, rotary_dim)
  const int64_t half = rotary_dim / 2;
  const int64_t slot_stride = num_kv_heads * head_dim;  // elements per cache slot
  const int64_t grain = std::max<int64_t>(1, 4096 / ((num_qo_heads + 2 * num_kv_heads) * head_dim));

  dispatch_float(args.k_cache.dtype, args.k_cache.data, [&](auto* k_cache) {  // (num_slots, num_kv_heads, head_dim)
    using CacheT = std::remove_pointer_t<decltype(k_cache)>;
    CacheT* v_cache = static_cast<CacheT*>(args.v_cache.data);
    context.pool->parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end, int) {
      for (int64_t t = begin; t < end; ++t) {
        const float* cos = cos_sin_cache + positions[t] * rotary_dim;  // (half,)
        const float* sin = cos + half;                                // (half,)
        float* query = row_ptr<float>(args.query, t);                 // (num_qo_heads, head_dim)
        float* key = row_ptr<float>(args.key, t);                     // (num_kv_heads, head_dim)
        const float* value = row_ptr<const float>(args.value, t);     // (num_kv_heads, head_dim)
        for (int64_t h = 0; h < num_qo_heads; ++h) rotate(query + h * head_dim, cos, sin, half);
        for (int64_t h = 0; h < num_kv_heads; ++h) rotate(key + h * head_dim, cos, sin, half);
        for (const int64_t slot : {slot_mapping[t], mirror != nullptr ? mirror[t] : int64_t{-1}}) {
          if (slot < 0) continue;
          store_row(key, k_cache + slot * slot_stride, slot_stride);
          store_row(value, v_cache + slot * slot_stride, slot_stride);
        }
      }
    });
  });
}

}  // namespace lserve::cpu
