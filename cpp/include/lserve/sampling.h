// SamplingParams (vLLM's names and defaults). The engine samples every row with the backend's
// sample op (ops/sample.h: penalties, min_tokens bans, temperature, top-k, top-p, min-p, one
// Philox draw keyed by (seed, tokens generated so far)) and computes logprobs with its logprobs op
// (ops/logprobs.h: log-softmax of the raw model logits, before penalties and temperature).
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace lserve {

struct SamplingParams {
  float temperature = 1.0f;         // 0: greedy
  float top_p = 1.0f;               // (0, 1]
  int top_k = 0;                    // 0 or -1: disabled
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // > 0; applies to prompt and output tokens
  float presence_penalty = 0.0f;    // [-2, 2]; output tokens
  float frequency_penalty = 0.0f;   // [-2, 2]; output tokens
  int max_tokens = 16;              // >= 1
  int min_tokens = 0;               // >= 0, <= max_tokens
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  std::optional<int> logprobs;      // none, or k in [0, 20]: the sampled token's plus the top k
  std::optional<int64_t> seed;      // >= 0, the sampler's Philox key; none: drawn from the engine's generator

  // Throws lserve::Error naming the parameter, its value and the allowed range. The reals are held
  // (and sampled) as 32-bit floats: the Python bindings refuse a value that does not survive that
  // rounding (inf, or a non-zero value that becomes 0), naming the field.
  void validate() const;
  // validate(), and that min_tokens masking (stop_token_ids, and eos_token_ids unless ignore_eos)
  // leaves some token of [0, vocab_size) to sample: the engine checks this when a request arrives.
  void validate_for_model(int vocab_size, const std::vector<int32_t>& eos_token_ids) const;
};

// One sampled token and, when params.logprobs is set, its logprobs (ops/logprobs.h).
struct SampledToken {
  int32_t token_id = 0;
  float logprob = 0.0f;                                 // of token_id, under the raw logits
  std::vector<std::pair<int32_t, float>> top_logprobs;  // best first, size params.logprobs
};

}  // namespace lserve
