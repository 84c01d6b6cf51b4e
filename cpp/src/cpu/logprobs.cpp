// CPU logprobs (ops/logprobs.h): the reference of the CUDA kernel. One row at a time: the maximum,
// the float64 sum of exp(x - max), then the num_top best tokens kept in a small sorted buffer (one
// pass, O(vocab_size) while most tokens lose to the current num_top-th).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_backend.h"

namespace lserve::cpu {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// "a ranks before b": larger logit first, lower id on ties, NaN after every number.
struct RanksBefore {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    const float x = logits[a], y = logits[b];
    if (std::isnan(x) || std::isnan(y)) return std::isnan(x) == std::isnan(y) ? a < b : !std::isnan(x);
    return x > y || (x == y && a < b);
  }
};

void logprobs_row(const LogprobsArgs& args, int64_t row) {
  const int64_t vocab_size = args.logits.size(1), num_top = args.num_top();
  const int64_t logits_row = args.row_indices.data_ptr<int32_t>()[row];
  const float* logits = args.logits.data_ptr<float>() + logits_row * args.logits.stride(0);  // (vocab_size,)
  float max_logit = -std::numeric_limits<float>::infinity();
  bool has_nan = false;
  for (int64_t i = 0; i < vocab_size; ++i) {
    has_nan |= std::isnan(logits[i]);
    max_logit = logits[i] > max_logit ? logits[i] : max_logit;
  }
  double sum_exp = 0.0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    sum_exp += logits[i] == max_logit ? 1.0 : static_cast<double>(std::exp(logits[i] - max_logit));
  }
  const double log_sum_exp = std::log(sum_exp);
  auto log_softmax = [&](int64_t token_id) -> float {
    if (has_nan) return kNaN;
    const float x = logits[token_id];
    if (x == max_logit) return static_cast<float>(-log_sum_exp);
    return static_cast<float>(static_cast<double>(x) - max_logit - log_sum_exp);
  };

  const int32_t token_id = args.token_ids.data_ptr<int32_t>()[row];
  args.logprobs.data_ptr<float>()[row] = token_id >= 0 && token_id < vocab_size ? log_softmax(token_id) : kNaN;

  if (num_top == 0) return;
  const RanksBefore ranks_before{logits};
  const size_t capacity = static_cast<size_t>(std::min(num_top, vocab_size));
  std::vector<int32_t> best;
  best.reserve(capacity + 1);
  for (int32_t i = 0; i < static_cast<int32_t>(vocab_size); ++i) {
    if (best.size() == capacity && !ranks_before(i, best.back())) continue;
    best.insert(std::upper_bound(best.begin(), best.end(), i, ranks_before), i);
    if (best.size() > capacity) best.pop_back();
  }
  int32_t* top_ids = args.top_token_ids.data_ptr<int32_t>() + row * num_top;  // (num_top,)
  float* top_values = args.top_logprobs.data_ptr<float>() + row * num_top;     // (num_top,)
  for (int64_t j = 0; j < num_top; ++j) {
    // A vocabulary smaller than num_top leaves the tail empty: id -1, logprob -inf.
    const bool present = j < static_cast<int64_t>(best.size());
    top_ids[j] = present ? best[j] : -1;
    top_values[j] = present ? log_softmax(best[j]) : -std::numeric_limits<float>::infinity();
  }
}

}  // namespace

void logprobs(const CpuContext& context, const LogprobsArgs& args) {
  const int64_t num_rows = args.row_indices.size(0);
  context.pool->parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) logprobs_row(args, row);
  });
}

}  // namespace lserve::cpu
