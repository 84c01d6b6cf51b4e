// Host-side sampler: SamplingParams::validate() (vLLM's ranges) and sample_token(). Steps, in
// order: logprobs from the raw logits; min_tokens masking; repetition, frequency and presence
// penalties; then argmax (temperature 0) or temperature -> softmax -> top-k -> top-p -> min-p ->
// one seeded draw. tests/test_sampling.py holds the numpy reference of every step.
#include "lserve/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "lserve/check.h"

namespace lserve {

namespace {

constexpr int kMaxLogprobs = 20;  // vLLM's default max_logprobs
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Uniform double in [0, 1) from the top 53 bits of one 64-bit draw. Fixed arithmetic, unlike
// std::uniform_real_distribution whose algorithm each standard library picks, so a seed gives
// the same tokens on every platform.
double uniform_unit(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
}

// Strict total order "larger value first, lower token id on ties": every selection below (top-k
// boundary, top-p prefix, draw order) is deterministic.
struct LargerFirst {
  const float* values;
  bool operator()(int32_t a, int32_t b) const {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  }
};

// log_softmax of x at max_value: x - max - log(sum_exp), written so that x == max gives
// -log(sum_exp) even when max is +inf.
struct LogSoftmax {
  float max_value = kNegInf;
  double log_sum_exp = 0.0;  // log(sum_i exp(x_i - max))
  float operator()(float x) const {
    if (x == max_value) return static_cast<float>(-log_sum_exp);
    return static_cast<float>(static_cast<double>(x) - max_value - log_sum_exp);
  }
};

LogSoftmax raw_log_softmax(const float* logits, int vocab_size, float max_value) {
  LogSoftmax result;
  result.max_value = max_value;
  double sum_exp = 0.0;
  for (int i = 0; i < vocab_size; ++i) {
    sum_exp += logits[i] == max_value ? 1.0f : std::exp(logits[i] - max_value);
  }
  result.log_sum_exp = std::log(sum_exp);
  return result;
}

// The num_top best tokens by raw logit, best first. One pass with a small sorted buffer:
// O(vocab_size) for the usual case where most tokens lose to the current num_top-th.
std::vector<std::pair<int32_t, float>> top_logprobs(const float* logits, int vocab_size, int num_top,
                                                    const LogSoftmax& log_softmax) {
  const LargerFirst larger{logits};
  const size_t capacity = static_cast<size_t>(std::min(num_top, vocab_size));
  std::vector<int32_t> best;
  best.reserve(capacity + 1);
  for (int32_t i = 0; i < vocab_size && capacity > 0; ++i) {
    if (best.size() == capacity && !larger(i, best.back())) continue;
    best.insert(std::upper_bound(best.begin(), best.end(), i, larger), i);
    if (best.size() > capacity) best.pop_back();
  }
  std::vector<std::pair<int32_t, float>> result;
  result.reserve(best.size());
  for (int32_t token_id : best) result.emplace_back(token_id, log_softmax(logits[token_id]));
  return result;
}

void check_token_ids(const std::vector<int32_t>& token_ids, int vocab_size, const char* what) {
  for (size_t i = 0; i < token_ids.size(); ++i) {
    LSERVE_CHECK(token_ids[i] >= 0 && token_ids[i] < vocab_size, "sample_token: ", what, "[", i, "] = ",
                 token_ids[i], " outside the vocabulary [0, ", vocab_size, ")");
  }
}

// Top-p histogram bucket of a probability in [0, 1]: the float's exponent and top mantissa bits,
// so buckets grow with p and each spans 1/16 of an octave.
constexpr int kBucketMantissaBits = 4;
constexpr int kNumBuckets = 128 << kBucketMantissaBits;  // exponents 0..127 cover [0, 1]

int prob_bucket(float prob) {
  uint32_t bits;
  std::memcpy(&bits, &prob, sizeof(bits));
  return static_cast<int>(bits >> (23 - kBucketMantissaBits));
}

// The highest bucket such that it and the buckets above hold at least target_mass. Tokens in
// those buckets form a prefix of the best-first order that reaches the target, so the top-p
// prefix lies inside it: only those tokens need sorting. One O(vocab_size) pass, no sort.
int top_p_cut_bucket(const float* probs, int vocab_size, double target_mass) {
  std::vector<double> bucket_mass(kNumBuckets, 0.0);
  for (int i = 0; i < vocab_size; ++i) bucket_mass[prob_bucket(probs[i])] += probs[i];
  double running = 0.0;
  for (int bucket = kNumBuckets - 1; bucket > 0; --bucket) {
    running += bucket_mass[bucket];
    if (running >= target_mass) return bucket;
  }
  return 0;
}

// Walks the tokens in the given order and returns the first whose running weight exceeds
// u * total_weight. Rounding can leave the walk short of the target: then the last token with
// positive weight wins. A token of weight 0 is never returned.
template <typename TokenAt>
int32_t draw_in_order(size_t num_tokens, TokenAt token_at, const float* weights, double total_weight,
                      double u) {
  const double target = u * total_weight;
  double running = 0.0;
  int32_t last_positive = -1;
  for (size_t j = 0; j < num_tokens; ++j) {
    const int32_t token_id = token_at(j);
    if (weights[token_id] <= 0.0f) continue;
    running += weights[token_id];
    last_positive = token_id;
    if (running > target) return token_id;
  }
  return last_positive;
}

// min_tokens: eos and the stop ids cannot end the output early. As in vLLM, the eos ids count as
// stop tokens only without ignore_eos. Ids outside the vocabulary can never be sampled; skipped.
void mask_stop_tokens(float* logits, int vocab_size, const SamplingParams& params,
                      const std::vector<int32_t>& eos_token_ids) {
  if (!params.ignore_eos) {
    for (int32_t token_id : eos_token_ids) {
      if (token_id >= 0 && token_id < vocab_size) logits[token_id] = kNegInf;
    }
  }
  for (int32_t token_id : params.stop_token_ids) {
    if (token_id < vocab_size) logits[token_id] = kNegInf;
  }
}

// Repetition penalty (HF / vLLM): once per distinct token of the prompt or the output,
// logit > 0 ? logit / penalty : logit * penalty. O(number of ids), plus one byte per token.
void apply_repetition_penalty(float* logits, int vocab_size, float penalty,
                              const std::vector<int32_t>& prompt_token_ids,
                              const std::vector<int32_t>& output_token_ids) {
  std::vector<uint8_t> pending(static_cast<size_t>(vocab_size), 0);
  for (int32_t token_id : prompt_token_ids) pending[token_id] = 1;
  for (int32_t token_id : output_token_ids) pending[token_id] = 1;
  auto apply = [&](int32_t token_id) {
    if (!pending[token_id]) return;
    pending[token_id] = 0;
    float& logit = logits[token_id];
    logit = logit > 0.0f ? logit / penalty : logit * penalty;
  };
  for (int32_t token_id : prompt_token_ids) apply(token_id);
  for (int32_t token_id : output_token_ids) apply(token_id);
}

// OpenAI / vLLM presence and frequency penalties over the output tokens:
// logit -= frequency * count + presence * (count > 0).
void apply_output_penalties(float* logits, int vocab_size, const SamplingParams& params,
                            const std::vector<int32_t>& output_token_ids) {
  std::vector<int32_t> counts(static_cast<size_t>(vocab_size), 0);
  for (int32_t token_id : output_token_ids) ++counts[token_id];
  for (int32_t token_id : output_token_ids) {
    const int32_t count = counts[token_id];
    if (count == 0) continue;  // already applied
    counts[token_id] = 0;
    logits[token_id] -= params.frequency_penalty * static_cast<float>(count) + params.presence_penalty;
  }
}

// Draws from probs (vocab_size,), unnormalised with maximum exactly 1 and sum total, after top-k,
// top-p and min-p. The kept tokens are walked best first (unfiltered: in token order, no sort).
int32_t draw_filtered(const float* probs, int vocab_size, double total, const SamplingParams& params, double u) {
  const bool use_top_k = params.top_k >= 1 && params.top_k < vocab_size;
  const bool use_top_p = params.top_p < 1.0f;
  const bool use_min_p = params.min_p > 0.0f;
  if (!use_top_k && !use_top_p && !use_min_p) {
    return draw_in_order(static_cast<size_t>(vocab_size), [](size_t j) { return static_cast<int32_t>(j); },
                         probs, total, u);
  }
  // min-p compares with the largest probability, which is 1 here; renormalising after top-k or
  // top-p scales every probability alike, so the test is the same before or after them.
  const float min_prob = params.min_p;
  const LargerFirst larger{probs};
  std::vector<int32_t> candidates;
  if (use_top_k) {
    // The k-th largest value by nth_element on a copy of the values (plain float compares, not
    // loads through token indices); then every token above it and the lowest-id ties at it.
    std::vector<float> values(probs, probs + vocab_size);
    std::nth_element(values.begin(), values.begin() + (params.top_k - 1), values.end(), std::greater<float>());
    const float kth_value = values[params.top_k - 1];
    candidates.reserve(static_cast<size_t>(params.top_k));
    for (int32_t i = 0; i < vocab_size; ++i) {
      if (probs[i] > kth_value) candidates.push_back(i);
    }
    for (int32_t i = 0; i < vocab_size && static_cast<int>(candidates.size()) < params.top_k; ++i) {
      if (probs[i] == kth_value) candidates.push_back(i);
    }
    total = 0.0;  // top_p is a fraction of the mass after top-k
    for (int32_t token_id : candidates) total += probs[token_id];
    if (use_min_p) {
      candidates.erase(std::remove_if(candidates.begin(), candidates.end(),
                                      [&](int32_t token_id) { return probs[token_id] < min_prob; }),
                       candidates.end());
    }
  } else {
    const int cut_bucket =
        use_top_p ? top_p_cut_bucket(probs, vocab_size, static_cast<double>(params.top_p) * total) : 0;
    for (int32_t i = 0; i < vocab_size; ++i) {
      if (probs[i] > 0.0f && probs[i] >= min_prob && prob_bucket(probs[i]) >= cut_bucket) {
        candidates.push_back(i);
      }
    }
  }
  std::sort(candidates.begin(), candidates.end(), larger);
  // Top-p and min-p each keep a prefix of the best-first order: top-p the shortest one whose mass
  // reaches top_p * total. The kept set is the shorter prefix.
  const double target_mass = static_cast<double>(params.top_p) * total;
  size_t num_kept = candidates.size();
  double kept_mass = 0.0;
  for (size_t j = 0; j < num_kept; ++j) {
    kept_mass += probs[candidates[j]];
    if (use_top_p && kept_mass >= target_mass) {
      num_kept = j + 1;
      break;
    }
  }
  return draw_in_order(num_kept, [&](size_t j) { return candidates[j]; }, probs, kept_mass, u);
}

}  // namespace

void SamplingParams::validate() const {
  LSERVE_CHECK(std::isfinite(temperature) && temperature >= 0.0f,
               "SamplingParams.temperature must be >= 0 (0 means greedy), got ", temperature);
  LSERVE_CHECK(top_p > 0.0f && top_p <= 1.0f, "SamplingParams.top_p must be in (0, 1], got ", top_p);
  LSERVE_CHECK(top_k >= -1, "SamplingParams.top_k must be -1 or 0 (disabled) or >= 1, got ", top_k);
  LSERVE_CHECK(min_p >= 0.0f && min_p <= 1.0f, "SamplingParams.min_p must be in [0, 1], got ", min_p);
  LSERVE_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0.0f,
               "SamplingParams.repetition_penalty must be > 0 (1 means none), got ", repetition_penalty);
  LSERVE_CHECK(presence_penalty >= -2.0f && presence_penalty <= 2.0f,
               "SamplingParams.presence_penalty must be in [-2, 2], got ", presence_penalty);
  LSERVE_CHECK(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f,
               "SamplingParams.frequency_penalty must be in [-2, 2], got ", frequency_penalty);
  LSERVE_CHECK(max_tokens >= 1, "SamplingParams.max_tokens must be >= 1, got ", max_tokens);
  LSERVE_CHECK(min_tokens >= 0 && min_tokens <= max_tokens, "SamplingParams.min_tokens must be in [0, max_tokens=",
               max_tokens, "], got ", min_tokens);
  LSERVE_CHECK(logprobs == -1 || (logprobs >= 0 && logprobs <= kMaxLogprobs),
               "SamplingParams.logprobs must be -1 (none) or in [0, ", kMaxLogprobs, "], got ", logprobs);
  for (size_t i = 0; i < stop_token_ids.size(); ++i) {
    LSERVE_CHECK(stop_token_ids[i] >= 0, "SamplingParams.stop_token_ids[", i, "] must be >= 0, got ",
                 stop_token_ids[i]);
  }
}

SampledToken sample_token(float* logits, int vocab_size, const SamplingParams& params,
                          const std::vector<int32_t>& prompt_token_ids,
                          const std::vector<int32_t>& output_token_ids,
                          const std::vector<int32_t>& eos_token_ids, std::mt19937_64& rng) {
  LSERVE_CHECK(logits != nullptr, "sample_token: logits is null");
  LSERVE_CHECK(vocab_size >= 1, "sample_token: vocab_size must be >= 1, got ", vocab_size);
  params.validate();
  check_token_ids(prompt_token_ids, vocab_size, "prompt_token_ids");
  check_token_ids(output_token_ids, vocab_size, "output_token_ids");

  float raw_max = kNegInf;
  bool has_nan = false;
  for (int i = 0; i < vocab_size; ++i) {
    has_nan |= std::isnan(logits[i]);
    raw_max = logits[i] > raw_max ? logits[i] : raw_max;
  }
  if (has_nan) {
    const float* nan_at = std::find_if(logits, logits + vocab_size, [](float x) { return std::isnan(x); });
    LSERVE_THROW("sample_token: logits[", nan_at - logits, "] is NaN");
  }

  // 1. Logprobs from the raw logits.
  SampledToken result;
  const bool want_logprobs = params.logprobs >= 0;
  LogSoftmax log_softmax;
  if (want_logprobs) {
    log_softmax = raw_log_softmax(logits, vocab_size, raw_max);
    result.top_logprobs = top_logprobs(logits, vocab_size, params.logprobs, log_softmax);
  }

  // 2. Masking and penalties, in place; the raw values stay behind for the sampled logprob.
  const bool mask_stops = static_cast<int64_t>(output_token_ids.size()) < params.min_tokens;
  const bool repetition =
      params.repetition_penalty != 1.0f && !(prompt_token_ids.empty() && output_token_ids.empty());
  const bool output_penalties =
      (params.presence_penalty != 0.0f || params.frequency_penalty != 0.0f) && !output_token_ids.empty();
  const bool modified = mask_stops || repetition || output_penalties;
  std::vector<float> raw_logits;
  if (want_logprobs && modified) raw_logits.assign(logits, logits + vocab_size);
  if (mask_stops) mask_stop_tokens(logits, vocab_size, params, eos_token_ids);
  if (repetition) {
    apply_repetition_penalty(logits, vocab_size, params.repetition_penalty, prompt_token_ids, output_token_ids);
  }
  if (output_penalties) apply_output_penalties(logits, vocab_size, params, output_token_ids);

  float max_logit = raw_max;
  if (modified) {
    max_logit = kNegInf;
    for (int i = 0; i < vocab_size; ++i) max_logit = logits[i] > max_logit ? logits[i] : max_logit;
  }
  LSERVE_CHECK(max_logit != kNegInf, "sample_token: every token is masked (-inf logits; min_tokens=",
               params.min_tokens, ", outputs so far ", output_token_ids.size(), ")");

  if (params.temperature == 0.0f) {
    // 3a. Greedy: the first maximum, i.e. the lowest token id on ties. Draws nothing from rng.
    result.token_id = static_cast<int32_t>(std::find(logits, logits + vocab_size, max_logit) - logits);
  } else {
    // 3b. probs: softmax at the temperature, unnormalised, the largest exactly 1 (also when the
    // maximum is +inf). Then the filters and one draw.
    std::vector<float> probs(static_cast<size_t>(vocab_size));
    const float inv_temperature = 1.0f / params.temperature;
    double total = 0.0;
    for (int i = 0; i < vocab_size; ++i) {
      const float prob = logits[i] == max_logit ? 1.0f : std::exp((logits[i] - max_logit) * inv_temperature);
      probs[i] = prob;
      total += prob;
    }
    result.token_id = draw_filtered(probs.data(), vocab_size, total, params, uniform_unit(rng));
  }

  if (want_logprobs) {
    result.logprob = log_softmax(modified ? raw_logits[result.token_id] : logits[result.token_id]);
  }
  return result;
}

}  // namespace lserve
