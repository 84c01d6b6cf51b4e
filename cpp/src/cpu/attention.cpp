// CPU reference of paged causal GQA attention: for each (sequence, query row, query head) a
// softmax over the keys at positions <= the row's position, fp32 throughout.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_backend.h"

namespace lserve {

void cpu_attention(const AttentionArgs& args) {
  const int64_t num_qo_heads = args.query.size(1), head_dim = args.query.size(2);
  const int64_t num_pages_total = args.k_cache.size(0), page_size = args.k_cache.size(1);
  const int64_t num_kv_heads = args.k_cache.size(2), group = num_qo_heads / num_kv_heads;
  const int64_t num_seqs = args.qo_indptr.size(0) - 1;
  const int32_t* qo_indptr = args.qo_indptr.data_ptr<int32_t>();
  const int32_t* page_indptr = args.kv_page_indptr.data_ptr<int32_t>();
  const int32_t* page_indices = args.kv_page_indices.data_ptr<int32_t>();
  const int32_t* kv_lens = args.kv_lens.data_ptr<int32_t>();
  const int64_t num_indices = args.kv_page_indices.size(0);
  LSERVE_CHECK(qo_indptr[0] == 0 && qo_indptr[num_seqs] == args.query.size(0), "attention: qo_indptr must run from 0 to ",
               args.query.size(0));
  LSERVE_CHECK(page_indptr[0] == 0 && page_indptr[num_seqs] <= num_indices, "attention: kv_page_indptr must run from 0 "
               "to at most ", num_indices);

  std::vector<float> keys, values, scores;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qo_indptr[s + 1] - qo_indptr[s], kv_len = kv_lens[s];
    const int64_t num_pages = page_indptr[s + 1] - page_indptr[s];
    LSERVE_CHECK(q_len >= 0 && num_pages >= 0, "attention: indptr arrays must not decrease (sequence ", s, ")");
    LSERVE_CHECK(q_len <= kv_len && kv_len <= num_pages * page_size, "attention: sequence ", s, " has ", q_len,
                 " queries, kv_len ", kv_len, " and ", num_pages, " pages of ", page_size,
                 " (need q_len <= kv_len <= pages * page_size)");
    // Gather this sequence's keys and values into float32 (num_kv_heads, kv_len, head_dim).
    keys.assign(static_cast<size_t>(num_kv_heads * kv_len * head_dim), 0.0f);
    values.assign(keys.size(), 0.0f);
    for (int64_t position = 0; position < kv_len; ++position) {
      const int64_t page = page_indices[page_indptr[s] + position / page_size];
      LSERVE_CHECK(page >= 0 && page < num_pages_total, "attention: page index ", page, " of sequence ", s,
                   " outside [0, ", num_pages_total, ")");
      const int64_t slot = page * page_size + position % page_size;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t src = (slot * num_kv_heads + h) * head_dim;
        float* key_dst = &keys[static_cast<size_t>((h * kv_len + position) * head_dim)];
        float* value_dst = &values[static_cast<size_t>((h * kv_len + position) * head_dim)];
        if (args.k_cache.dtype == DType::kF32) {
          std::copy_n(args.k_cache.data_ptr<float>() + src, head_dim, key_dst);
          std::copy_n(args.v_cache.data_ptr<float>() + src, head_dim, value_dst);
        } else {
          cpu_to_float(args.k_cache.data_ptr<bf16_t>() + src, DType::kBF16, key_dst, head_dim);
          cpu_to_float(args.v_cache.data_ptr<bf16_t>() + src, DType::kBF16, value_dst, head_dim);
        }
      }
    }
    scores.resize(static_cast<size_t>(kv_len));
    for (int64_t i = 0; i < q_len; ++i) {
      const int64_t row = qo_indptr[s] + i, position = kv_len - q_len + i;
      for (int64_t qh = 0; qh < num_qo_heads; ++qh) {
        const int64_t kh = qh / group;
        const float* q = args.query.data_ptr<float>() + row * args.query.stride(0) + qh * args.query.stride(1);
        float max_score = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= position; ++j) {
          const float* k = &keys[static_cast<size_t>((kh * kv_len + j) * head_dim)];
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * k[d];
          scores[j] = dot * args.sm_scale;
          max_score = std::max(max_score, scores[j]);
        }
        float denom = 0.0f;
        for (int64_t j = 0; j <= position; ++j) {
          scores[j] = std::exp(scores[j] - max_score);
          denom += scores[j];
        }
        float* out = args.output.data_ptr<float>() + row * args.output.stride(0) + qh * args.output.stride(1);
        std::fill_n(out, head_dim, 0.0f);
        for (int64_t j = 0; j <= position; ++j) {
          const float weight = scores[j] / denom;
          const float* v = &values[static_cast<size_t>((kh * kv_len + j) * head_dim)];
          for (int64_t d = 0; d < head_dim; ++d) out[d] += weight * v[d];
        }
      }
    }
  }
}

}  // namespace lserve
