// SamplingParams::validate and sample_token: logprobs from the raw logits, then min_tokens masking,
// repetition/presence/frequency penalties, temperature (0: argmax), top-k, top-p, min-p, and one
// draw from the request's generator in descending-probability order (reproducible given the seed).
#include "lserve/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <unordered_map>

#include "lserve/check.h"

namespace lserve {

void SamplingParams::validate() const {
  LSERVE_CHECK(temperature >= 0.0f && std::isfinite(temperature), "temperature must be >= 0, got ", temperature);
  LSERVE_CHECK(top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1], got ", top_p);
  LSERVE_CHECK(top_k == 0 || top_k == -1 || top_k >= 1, "top_k must be 0 or -1 (disabled) or >= 1, got ", top_k);
  LSERVE_CHECK(min_p >= 0.0f && min_p <= 1.0f, "min_p must be in [0, 1], got ", min_p);
  LSERVE_CHECK(repetition_penalty > 0.0f && std::isfinite(repetition_penalty),
               "repetition_penalty must be > 0, got ", repetition_penalty);
  LSERVE_CHECK(presence_penalty >= -2.0f && presence_penalty <= 2.0f, "presence_penalty must be in [-2, 2], got ",
               presence_penalty);
  LSERVE_CHECK(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f,
               "frequency_penalty must be in [-2, 2], got ", frequency_penalty);
  LSERVE_CHECK(max_tokens >= 1, "max_tokens must be >= 1, got ", max_tokens);
  LSERVE_CHECK(min_tokens >= 0 && min_tokens <= max_tokens, "min_tokens must be in [0, max_tokens=", max_tokens,
               "], got ", min_tokens);
  LSERVE_CHECK(logprobs >= -1 && logprobs <= 20, "logprobs must be -1 (none) or in [0, 20], got ", logprobs);
  for (int32_t id : stop_token_ids) LSERVE_CHECK(id >= 0, "stop_token_ids must be >= 0, got ", id);
}

namespace {

// log_softmax of the raw logits: the sampled token's logprob and the top-k, best first.
void fill_logprobs(const float* logits, int vocab_size, int top, SampledToken& out, int32_t token_id) {
  float max_logit = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < vocab_size; ++i) max_logit = std::max(max_logit, logits[i]);
  double sum = 0.0;
  for (int i = 0; i < vocab_size; ++i) sum += std::exp(static_cast<double>(logits[i] - max_logit));
  const float log_z = max_logit + static_cast<float>(std::log(sum));
  out.logprob = logits[token_id] - log_z;
  if (top <= 0) return;
  std::vector<int32_t> ids(static_cast<size_t>(vocab_size));
  std::iota(ids.begin(), ids.end(), 0);
  const int count = std::min(top, vocab_size);
  std::partial_sort(ids.begin(), ids.begin() + count, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int i = 0; i < count; ++i) out.top_logprobs.emplace_back(ids[i], logits[ids[i]] - log_z);
}

}  // namespace

SampledToken sample_token(float* logits, int vocab_size, const SamplingParams& params,
                          const std::vector<int32_t>& prompt_token_ids, const std::vector<int32_t>& output_token_ids,
                          int32_t eos_token_id, std::mt19937_64& rng) {
  LSERVE_CHECK(vocab_size >= 1, "sample_token: vocab_size must be >= 1");
  std::vector<float> raw;
  if (params.logprobs >= 0) raw.assign(logits, logits + vocab_size);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  if (static_cast<int>(output_token_ids.size()) < params.min_tokens) {
    if (eos_token_id >= 0 && eos_token_id < vocab_size) logits[eos_token_id] = neg_inf;
    for (int32_t id : params.stop_token_ids) {
      if (id < vocab_size) logits[id] = neg_inf;
    }
  }
  if (params.repetition_penalty != 1.0f) {
    std::vector<uint8_t> seen(static_cast<size_t>(vocab_size), 0);
    for (int32_t id : prompt_token_ids) if (id >= 0 && id < vocab_size) seen[id] = 1;
    for (int32_t id : output_token_ids) if (id >= 0 && id < vocab_size) seen[id] = 1;
    for (int i = 0; i < vocab_size; ++i) {
      if (seen[i]) logits[i] = logits[i] > 0 ? logits[i] / params.repetition_penalty : logits[i] * params.repetition_penalty;
    }
  }
  if (params.presence_penalty != 0.0f || params.frequency_penalty != 0.0f) {
    std::unordered_map<int32_t, int> counts;
    for (int32_t id : output_token_ids) ++counts[id];
    for (const auto& [id, count] : counts) {
      if (id < 0 || id >= vocab_size) continue;
      logits[id] -= params.frequency_penalty * static_cast<float>(count) + params.presence_penalty;
    }
  }

  SampledToken result;
  if (params.temperature == 0.0f) {
    result.token_id = static_cast<int32_t>(std::max_element(logits, logits + vocab_size) - logits);
  } else {
    // Candidates in descending order of logit (ties: lower id), truncated by top-k.
    std::vector<int32_t> order(static_cast<size_t>(vocab_size));
    std::iota(order.begin(), order.end(), 0);
    auto better = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    size_t keep = order.size();
    if (params.top_k >= 1 && static_cast<size_t>(params.top_k) < keep) {
      keep = static_cast<size_t>(params.top_k);
      std::nth_element(order.begin(), order.begin() + static_cast<int64_t>(keep), order.end(), better);
      order.resize(keep);
    }
    std::sort(order.begin(), order.end(), better);
    const float max_logit = logits[order[0]];
    std::vector<double> probs(order.size());
    double total = 0.0;
    for (size_t i = 0; i < order.size(); ++i) {
      probs[i] = std::exp(static_cast<double>((logits[order[i]] - max_logit) / params.temperature));
      total += probs[i];
    }
    for (double& p : probs) p /= total;
    size_t count = probs.size();
    if (params.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p
      double mass = 0.0;
      size_t i = 0;
      for (; i < count; ++i) {
        mass += probs[i];
        if (mass >= params.top_p) break;
      }
      count = std::min(count, i + 1);
    }
    if (params.min_p > 0.0f) {
      const double threshold = params.min_p * probs[0];
      size_t i = 1;
      while (i < count && probs[i] >= threshold) ++i;
      count = i;
    }
    double kept = 0.0;
    for (size_t i = 0; i < count; ++i) kept += probs[i];
    const double target = std::uniform_real_distribution<double>(0.0, 1.0)(rng) * kept;
    double cumulative = 0.0;
    size_t chosen = count - 1;
    for (size_t i = 0; i < count; ++i) {
      cumulative += probs[i];
      if (target < cumulative) {
        chosen = i;
        break;
      }
    }
    result.token_id = order[chosen];
  }
  if (params.logprobs >= 0) fill_logprobs(raw.data(), vocab_size, params.logprobs, result, result.token_id);
  return result;
}

}  // namespace lserve
