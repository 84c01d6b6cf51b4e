// CPU reference of paged causal GQA attention with the block-iterator policy of
// lserve/ops/attention.h: for each (sequence, KV head) the pages to visit (all, the Lambda
// window, or a listed subset), then an online softmax over the visible keys, fp32 throughout.
// Pages outside the policy are never read.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_backend.h"

namespace lserve {

namespace {

inline void load_row(const TensorView& cache, int64_t offset, int64_t count, float* dst) {
  if (cache.dtype == DType::kF32) {
    std::copy_n(cache.data_ptr<float>() + offset, count, dst);
  } else {
    cpu_to_float(cache.data_ptr<bf16_t>() + offset, DType::kBF16, dst, count);
  }
}

}  // namespace

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
  const int64_t max_listed = args.has_head_pages() ? args.head_page_positions.size(2) : 0;

  std::vector<int32_t> visit;
  std::vector<float> key(static_cast<size_t>(head_dim)), acc(static_cast<size_t>(head_dim));
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qo_indptr[s + 1] - qo_indptr[s], kv_len = kv_lens[s];
    const int64_t num_pages = page_indptr[s + 1] - page_indptr[s];
    LSERVE_CHECK(q_len >= 0 && num_pages >= 0, "attention: indptr arrays must not decrease (sequence ", s, ")");
    LSERVE_CHECK(q_len <= kv_len && kv_len <= num_pages * page_size, "attention: sequence ", s, " has ", q_len,
                 " queries, kv_len ", kv_len, " and ", num_pages, " pages of ", page_size,
                 " (need q_len <= kv_len <= pages * page_size)");
    const int64_t sink = args.has_window() ? args.window_sink.data_ptr<int32_t>()[s] : 0;
    const int64_t local = args.has_window() ? args.window_local.data_ptr<int32_t>()[s] : 0;
    for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
      // The pages this (sequence, KV head) may read.
      visit.clear();
      const int64_t listed = args.has_head_pages() ? args.head_num_pages.data_ptr<int32_t>()[s * num_kv_heads + kh] : -1;
      if (listed >= 0) {
        LSERVE_CHECK(listed <= max_listed, "attention: head_num_pages[", s, ", ", kh, "] = ", listed,
                     " exceeds head_page_positions' ", max_listed, " entries");
        const int32_t* positions = args.head_page_positions.data_ptr<int32_t>() + (s * num_kv_heads + kh) * max_listed;
        for (int64_t k = 0; k < listed; ++k) {
          LSERVE_CHECK(positions[k] >= 0 && positions[k] < num_pages && (k == 0 || positions[k] > positions[k - 1]),
                       "attention: head_page_positions of sequence ", s, " head ", kh,
                       " must ascend within [0, ", num_pages, ")");
          visit.push_back(positions[k]);
        }
      } else {
        for (int64_t p = 0; p * page_size < kv_len; ++p) visit.push_back(static_cast<int32_t>(p));
      }
      for (int64_t i = 0; i < q_len; ++i) {
        const int64_t row = qo_indptr[s] + i, position = kv_len - q_len + i;
        for (int64_t qh = kh * group; qh < (kh + 1) * group; ++qh) {
          const float* q = args.query.data_ptr<float>() + row * args.query.stride(0) + qh * args.query.stride(1);
          float running_max = -std::numeric_limits<float>::infinity(), denom = 0.0f;
          std::fill(acc.begin(), acc.end(), 0.0f);
          for (int32_t page_pos : visit) {
            const int64_t first = page_pos * page_size, last = std::min(first + page_size, position + 1);  // [first, last)
            if (first >= last) continue;                                    // causal: the page is in the future
            if (local > 0 && first >= sink && last - 1 <= position - local) continue;  // outside the Lambda
            const int64_t page = page_indices[page_indptr[s] + page_pos];
            LSERVE_CHECK(page >= 0 && page < num_pages_total, "attention: page index ", page, " of sequence ", s,
                         " outside [0, ", num_pages_total, ")");
            for (int64_t j = first; j < last; ++j) {
              if (local > 0 && j >= sink && j <= position - local) continue;
              const int64_t offset = ((page * page_size + j - first) * num_kv_heads + kh) * head_dim;
              load_row(args.k_cache, offset, head_dim, key.data());
              float dot = 0.0f;
              for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * key[d];
              const float score = dot * args.sm_scale;
              if (score > running_max) {
                const float rescale = std::exp(running_max - score);
                denom *= rescale;
                for (int64_t d = 0; d < head_dim; ++d) acc[d] *= rescale;
                running_max = score;
              }
              const float weight = std::exp(score - running_max);
              denom += weight;
              load_row(args.v_cache, offset, head_dim, key.data());
              for (int64_t d = 0; d < head_dim; ++d) acc[d] += weight * key[d];
            }
          }
          float* out = args.output.data_ptr<float>() + row * args.output.stride(0) + qh * args.output.stride(1);
          const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) out[d] = acc[d] * inv;
        }
      }
    }
  }
}

}  // namespace lserve
