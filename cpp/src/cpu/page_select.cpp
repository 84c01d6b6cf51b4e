// CPU reference of page_select and page_stats_append (ops/page_select.h): plain loops, fp32.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "lserve/ops/page_select.h"

namespace lserve {

void cpu_page_stats_append(const PageStatsAppendArgs& args) {
  const int64_t num_tokens = args.key.size(0), num_kv_heads = args.key.size(1), head_dim = args.key.size(2);
  const int64_t num_pages = args.kmax.size(0), logical_per_page = args.kmax.size(1);
  const int64_t logical_page_size = args.physical_page_size / logical_per_page;
  const float* key = args.key.data_ptr<float>();
  const int64_t* slots = args.slot_mapping.data_ptr<int64_t>();
  float* kmax = args.kmax.data_ptr<float>();
  float* kmin = args.kmin.data_ptr<float>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const int64_t page = slot / args.physical_page_size, offset = slot % args.physical_page_size;
    LSERVE_CHECK(page < num_pages, "page_stats_append: slot ", slot, " is beyond the ", num_pages, " pages");
    const int64_t logical = offset / logical_page_size;
    const bool reset = offset % logical_page_size == 0;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const float* k = key + t * args.key.stride(0) + h * head_dim;
      const int64_t base = ((page * logical_per_page + logical) * num_kv_heads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        kmax[base + d] = reset ? k[d] : std::max(kmax[base + d], k[d]);
        kmin[base + d] = reset ? k[d] : std::min(kmin[base + d], k[d]);
      }
    }
  }
}

void cpu_page_select(const PageSelectArgs& args) {
  const int64_t num_seqs = args.kv_page_indptr.size(0) - 1;
  const int64_t num_qo_heads = args.query.size(1), head_dim = args.query.size(2);
  const int64_t num_slots = args.selected.size(0);
  const int64_t num_pages_total = args.kmax.size(0), logical_per_page = args.kmax.size(1);
  const int64_t num_kv_heads = args.kmax.size(2), group = num_qo_heads / num_kv_heads;
  const int64_t logical_page_size = args.physical_page_size / logical_per_page;
  const int64_t width = args.selected.size(2);  // the store's row length
  const int64_t min_select = args.keep_last_pages + (args.keep_first_page ? 1 : 0);
  const int32_t* head_num_select = args.head_num_select.defined() ? args.head_num_select.data_ptr<int32_t>() : nullptr;
  for (int64_t kv_head = 0; head_num_select != nullptr && kv_head < num_kv_heads; ++kv_head) {
    LSERVE_CHECK(head_num_select[kv_head] >= min_select && head_num_select[kv_head] <= width, "page_select: KV head ",
                 kv_head, " selects ", head_num_select[kv_head], " pages, outside [", min_select, ", ", width,
                 "] (the forced pages, the store's width)");
  }
  const int32_t* indptr = args.kv_page_indptr.data_ptr<int32_t>();
  const int32_t* indices = args.kv_page_indices.data_ptr<int32_t>();
  const int32_t* kv_lens = args.kv_lens.data_ptr<int32_t>();
  const float* kmax = args.kmax.data_ptr<float>();
  const float* kmin = args.kmin.data_ptr<float>();
  int32_t* selected = args.selected.data_ptr<int32_t>();
  int32_t* num_selected = args.num_selected.data_ptr<int32_t>();
  const int32_t* qo_indptr = args.qo_indptr.defined() ? args.qo_indptr.data_ptr<int32_t>() : nullptr;
  const int32_t* modes = args.select_mode.defined() ? args.select_mode.data_ptr<int32_t>() : nullptr;
  const int32_t* slots = args.select_slot.defined() ? args.select_slot.data_ptr<int32_t>() : nullptr;

  for (int64_t s = 0; s < num_seqs; ++s) {
    if (modes != nullptr && modes[s] != kSelectFresh) continue;  // dense or reused: the store stays
    const int64_t slot = slots != nullptr ? slots[s] : s;
    LSERVE_CHECK(slot >= 0 && slot < num_slots, "page_select: sequence ", s, " writes slot ", slot, ", outside [0, ",
                 num_slots, ")");
    const int64_t row = qo_indptr != nullptr ? static_cast<int64_t>(qo_indptr[s + 1]) - 1 : s;
    LSERVE_CHECK(row >= 0 && row < args.query.size(0) && (qo_indptr == nullptr || qo_indptr[s + 1] > qo_indptr[s]),
                 "page_select: sequence ", s, " has no query row");
    const int64_t num_pages = indptr[s + 1] - indptr[s];
    LSERVE_CHECK(num_pages >= 0 && kv_lens[s] >= 1 && kv_lens[s] <= num_pages * args.physical_page_size &&
                     kv_lens[s] > (num_pages - 1) * args.physical_page_size,
                 "page_select: sequence ", s, " holds ", kv_lens[s], " tokens in ", num_pages, " pages of ",
                 args.physical_page_size);
    for (int64_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
      int32_t* out = selected + (slot * num_kv_heads + kv_head) * width;
      const int64_t num_select = head_num_select != nullptr ? head_num_select[kv_head] : width;
      if (num_pages <= num_select) {
        std::iota(out, out + num_pages, 0);
        num_selected[slot * num_kv_heads + kv_head] = static_cast<int32_t>(num_pages);
        continue;
      }
      // kSum: one score per page, the max over its logical pages of the group's summed score.
      // kMax / kMass: per query head g, head_scores[g * num_pages + position] = max over logical pages.
      const bool per_head = args.group_score != GroupScore::kSum;
      const float neg_inf = -std::numeric_limits<float>::infinity();
      std::vector<float> page_scores(static_cast<size_t>(num_pages), neg_inf);
      std::vector<float> head_scores(per_head ? static_cast<size_t>(group * num_pages) : 0, neg_inf);
      for (int64_t position = 0; position < num_pages; ++position) {
        const int64_t page = indices[indptr[s] + position];
        LSERVE_CHECK(page >= 0 && page < num_pages_total, "page_select: page index ", page, " out of range");
        const int64_t tokens_in_page = std::min<int64_t>(args.physical_page_size,
                                                         kv_lens[s] - position * args.physical_page_size);
        const int64_t num_logical = (tokens_in_page + logical_page_size - 1) / logical_page_size;
        for (int64_t logical = 0; logical < num_logical; ++logical) {
          const int64_t base = ((page * logical_per_page + logical) * num_kv_heads + kv_head) * head_dim;
          float score = 0.0f;
          for (int64_t g = 0; g < group; ++g) {
            const float* q = args.query.data_ptr<float>() + row * args.query.stride(0) +
                             (kv_head * group + g) * head_dim;
            float head_score = 0.0f;
            float& sum = per_head ? head_score : score;  // kSum: one running sum over g then d
            if (args.score == PageScore::kCenter) {
              for (int64_t d = 0; d < head_dim; ++d) sum += q[d] * (0.5f * (kmax[base + d] + kmin[base + d]));
            } else if (args.score == PageScore::kBlend) {
              for (int64_t d = 0; d < head_dim; ++d) {
                const float centre = q[d] * (0.5f * (kmax[base + d] + kmin[base + d]));
                const float spread = std::fabs(q[d]) * (0.5f * (kmax[base + d] - kmin[base + d]));
                sum += centre + args.spread * spread;
              }
            } else {
              for (int64_t d = 0; d < head_dim; ++d) {
                sum += std::max(q[d] * kmax[base + d], q[d] * kmin[base + d]);
              }
            }
            if (per_head) {
              float& best = head_scores[static_cast<size_t>(g * num_pages + position)];
              best = std::max(best, head_score);
            }
          }
          if (!per_head) page_scores[position] = std::max(page_scores[position], score);
        }
      }
      if (args.group_score == GroupScore::kMax) {
        for (int64_t g = 0; g < group; ++g) {
          for (int64_t position = 0; position < num_pages; ++position) {
            page_scores[position] = std::max(page_scores[position], head_scores[g * num_pages + position]);
          }
        }
      } else if (args.group_score == GroupScore::kMass) {
        // Per head: p = exp(scale * (score - max)) / sum over pages; pages sum p over heads in order.
        const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
        std::fill(page_scores.begin(), page_scores.end(), 0.0f);
        for (int64_t g = 0; g < group; ++g) {
          float* scores = head_scores.data() + g * num_pages;
          float top = neg_inf;
          for (int64_t position = 0; position < num_pages; ++position) top = std::max(top, scores[position]);
          if (!std::isfinite(top)) continue;  // no finite score: this head has no say
          float total = 0.0f;
          for (int64_t position = 0; position < num_pages; ++position) {
            scores[position] = std::exp((scores[position] - top) * scale);
            total += scores[position];
          }
          for (int64_t position = 0; position < num_pages; ++position) page_scores[position] += scores[position] / total;
        }
      }
      // Forced pages first, then the best of the rest; ties keep the earlier page.
      std::vector<int32_t> order(static_cast<size_t>(num_pages));
      std::iota(order.begin(), order.end(), 0);
      const int64_t first_recent = num_pages - args.keep_last_pages;  // the newest keep_last_pages pages
      auto forced = [&](int32_t p) { return p >= first_recent || (args.keep_first_page && p == 0); };
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        if (forced(a) != forced(b)) return forced(a);
        return page_scores[a] > page_scores[b];
      });
      std::sort(order.begin(), order.begin() + num_select);
      std::copy(order.begin(), order.begin() + num_select, out);
      num_selected[slot * num_kv_heads + kv_head] = static_cast<int32_t>(num_select);
    }
  }
}

}  // namespace lserve
