// SamplingParams::validate() (vLLM's ranges) and validate_for_model(). Sampling itself is the
// backend's sample op (ops/sample.h) and logprobs its logprobs op (ops/logprobs.h).
#include "lserve/sampling.h"

#include <algorithm>
#include <cmath>

#include "lserve/check.h"
#include "lserve/ops/logprobs.h"

namespace lserve {

void SamplingParams::validate() const {
  LSERVE_CHECK(std::isfinite(temperature) && temperature >= 0.0f,
               "SamplingParams.temperature must be >= 0 (0 means greedy), got ", temperature);
  LSERVE_CHECK(top_p > 0.0f && top_p <= 1.0f, "SamplingParams.top_p must be in (0, 1], got ", top_p);
  LSERVE_CHECK(top_k >= -1, "SamplingParams.top_k must be 0 or -1 (disabled) or >= 1, got ", top_k);
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
  LSERVE_CHECK(!logprobs || (*logprobs >= 0 && *logprobs <= kMaxLogprobs),
               "SamplingParams.logprobs must be None or in [0, ", kMaxLogprobs, "], got ", logprobs.value_or(0));
  LSERVE_CHECK(!seed || *seed >= 0, "SamplingParams.seed must be None or in [0, 2**63), got ", seed.value_or(0));
  for (size_t i = 0; i < stop_token_ids.size(); ++i) {
    LSERVE_CHECK(stop_token_ids[i] >= 0, "SamplingParams.stop_token_ids[", i, "] must be >= 0, got ",
                 stop_token_ids[i]);
  }
}

void SamplingParams::validate_for_model(int vocab_size, const std::vector<int32_t>& eos_token_ids) const {
  validate();
  if (min_tokens == 0) return;
  std::vector<uint8_t> masked(static_cast<size_t>(std::max(vocab_size, 0)), 0);
  auto mask = [&](const std::vector<int32_t>& token_ids) {
    for (int32_t token_id : token_ids) {
      if (token_id >= 0 && token_id < vocab_size) masked[token_id] = 1;
    }
  };
  mask(stop_token_ids);
  if (!ignore_eos) mask(eos_token_ids);
  LSERVE_CHECK(std::find(masked.begin(), masked.end(), 0) != masked.end(), "SamplingParams: with min_tokens=",
               min_tokens, ", stop_token_ids", ignore_eos ? "" : " and the eos ids", " mask all ", vocab_size,
               " tokens of the vocabulary, leaving nothing to sample");
}

}  // namespace lserve
