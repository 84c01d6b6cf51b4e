// SamplingParams (vLLM's names and defaults) and the host-side sampler: penalties, temperature,
// top-k, top-p, min-p, seeded per request; logprobs from the raw model logits.
#pragma once

#include <cstdint>
#include <random>
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
  int logprobs = -1;                // -1: none; k >= 0: the sampled token's plus the top k
  int64_t seed = -1;                // -1: drawn from the engine's generator

  // Throws lserve::Error naming the parameter and the allowed range.
  void validate() const;
};

struct SampledToken {
  int32_t token_id = 0;
  float logprob = 0.0f;                                 // of token_id, under the raw logits
  std::vector<std::pair<int32_t, float>> top_logprobs;  // best first, size params.logprobs
};

// Samples one token from logits (vocab_size,) float32 on the host. `logits` is scratch: the
// sampler modifies it. prompt/output ids feed the penalties; every eos_token_ids entry (unless
// params.ignore_eos) and params.stop_token_ids are masked while output_token_ids.size() <
// min_tokens. Throws lserve::Error on invalid params, ids outside the vocabulary, NaN logits, or
// when masking leaves no token to sample.
SampledToken sample_token(float* logits, int vocab_size, const SamplingParams& params,
                          const std::vector<int32_t>& prompt_token_ids,
                          const std::vector<int32_t>& output_token_ids,
                          const std::vector<int32_t>& eos_token_ids, std::mt19937_64& rng);

}  // namespace lserve
