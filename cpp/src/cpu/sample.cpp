// CPU sample (ops/sample.h): the reference of the CUDA kernel. One row at a time, plain loops in the
// order the contract states; the thresholds by nth_element and a sort. All arithmetic comes from
// lserve/ops/sample_rules.h, which the kernel shares, so both give the same bits;
// weights are integers, so sums need no care about order. Invalid rows raise lserve::Error.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_backend.h"
#include "lserve/ops/sample_rules.h"  // shared with the CUDA kernel

namespace lserve::cpu {

namespace {

namespace rules = ::lserve::sample_rules;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

[[noreturn]] void throw_param_error(int error, int64_t row, const float* values) {
  switch (error) {
    case rules::kSampleBadTemperature:
      LSERVE_THROW("sample: temperature[", row, "] = ", values[0], " must be finite and >= 0 (0 = greedy)");
    case rules::kSampleBadTopP: LSERVE_THROW("sample: top_p[", row, "] = ", values[1], " must be in (0, 1]");
    case rules::kSampleBadMinP: LSERVE_THROW("sample: min_p[", row, "] = ", values[2], " must be in [0, 1]");
    case rules::kSampleBadRepetitionPenalty:
      LSERVE_THROW("sample: repetition_penalty[", row, "] = ", values[3], " must be finite and > 0 (1 = off)");
    case rules::kSampleBadPresencePenalty:
      LSERVE_THROW("sample: presence_penalty[", row, "] = ", values[4], " must be finite");
    case rules::kSampleBadFrequencyPenalty:
      LSERVE_THROW("sample: frequency_penalty[", row, "] = ", values[5], " must be finite");
    default: LSERVE_THROW("sample: row ", row, ": invalid parameter (code ", error, ")");
  }
}

// [begin, end) of a row's CSR range; raises unless 0 <= begin <= end <= num_ids.
std::pair<int64_t, int64_t> csr_range(const TensorView& indptr, int64_t num_ids, int64_t row, const char* what) {
  const int32_t* data = indptr.data_ptr<int32_t>();
  const int64_t begin = data[row], end = data[row + 1];
  LSERVE_CHECK(begin >= 0 && begin <= end && end <= num_ids, "sample: ", what, "[", row, ":", row + 2, "] = [",
               begin, ", ", end, "] is not a range inside the ", num_ids, " ids");
  return {begin, end};
}

int32_t sample_row(const SampleArgs& args, int64_t row) {
  const int64_t vocab_size = args.logits.size(1);
  float* logits = args.logits.data_ptr<float>() + row * args.logits.stride(0);  // (vocab_size,)
  const float temperature = args.temperature.data_ptr<float>()[row];
  const int32_t top_k = args.top_k.data_ptr<int32_t>()[row];
  const float top_p = args.top_p.data_ptr<float>()[row];
  const float min_p = args.min_p.data_ptr<float>()[row];
  const bool has_penalties = args.has_penalties();
  const float repetition = has_penalties ? args.repetition_penalty.data_ptr<float>()[row] : 1.0f;
  const float presence = has_penalties ? args.presence_penalty.data_ptr<float>()[row] : 0.0f;
  const float frequency = has_penalties ? args.frequency_penalty.data_ptr<float>()[row] : 0.0f;
  const int error =
      rules::sample_param_error(temperature, top_p, min_p, has_penalties, repetition, presence, frequency);
  if (error != rules::kSampleParamOk) {
    const float values[] = {temperature, top_p, min_p, repetition, presence, frequency};
    throw_param_error(error, row, values);
  }

  // 0. Ranges and raw logits.
  int64_t history_begin = 0, history_end = 0, prompt_end = 0;
  if (has_penalties) {
    std::tie(history_begin, history_end) =
        csr_range(args.history_indptr, args.history_token_ids.size(0), row, "history_indptr");
    const int32_t num_prompt = args.num_prompt_tokens.data_ptr<int32_t>()[row];
    LSERVE_CHECK(num_prompt >= 0 && num_prompt <= history_end - history_begin, "sample: num_prompt_tokens[", row,
                 "] = ", num_prompt, " outside [0, ", history_end - history_begin, "] (the row's history length)");
    prompt_end = history_begin + num_prompt;
  }
  int64_t banned_begin = 0, banned_end = 0;
  if (args.has_banned()) {
    std::tie(banned_begin, banned_end) =
        csr_range(args.banned_indptr, args.banned_token_ids.size(0), row, "banned_indptr");
  }
  for (int64_t i = 0; i < vocab_size; ++i) {
    LSERVE_CHECK(!std::isnan(logits[i]), "sample: logits[", row, ", ", i, "] is NaN");
  }

  // 1. Banned ids.
  const int32_t* banned = args.has_banned() ? args.banned_token_ids.data_ptr<int32_t>() : nullptr;
  for (int64_t j = banned_begin; j < banned_end; ++j) {
    if (banned[j] >= 0 && banned[j] < vocab_size) logits[banned[j]] = kNegInf;
  }

  // 2. Penalties, once per distinct token: repetition, then presence/frequency for output tokens.
  const bool use_repetition = repetition != 1.0f;
  const bool use_output = (presence != 0.0f || frequency != 0.0f) && history_end > prompt_end;
  if (use_repetition || use_output) {
    const int32_t* history = args.history_token_ids.data_ptr<int32_t>();
    for (int64_t j = history_begin; j < history_end; ++j) {
      LSERVE_CHECK(history[j] >= 0 && history[j] < vocab_size, "sample: history_token_ids[", j, "] = ", history[j],
                   " (row ", row, ") outside the vocabulary [0, ", vocab_size, ")");
    }
    std::vector<int32_t> output_counts(static_cast<size_t>(vocab_size), 0);
    std::vector<uint8_t> done(static_cast<size_t>(vocab_size), 0);
    if (use_output) {
      for (int64_t j = prompt_end; j < history_end; ++j) ++output_counts[history[j]];
    }
    for (int64_t j = history_begin; j < history_end; ++j) {
      const int32_t token_id = history[j];
      if (done[token_id]) continue;
      done[token_id] = 1;
      float logit = logits[token_id];
      if (use_repetition) logit = rules::apply_repetition_penalty(logit, repetition);
      if (use_output && output_counts[token_id] > 0) {
        logit = rules::apply_output_penalties(logit, output_counts[token_id], presence, frequency);
      }
      logits[token_id] = logit;
    }
  }

  // 3. Maximum; greedy is the first maximum.
  int64_t argmax = 0;
  for (int64_t i = 1; i < vocab_size; ++i) {
    if (logits[i] > logits[argmax]) argmax = i;
  }
  const float max_logit = logits[argmax];
  LSERVE_CHECK(max_logit != kNegInf, "sample: row ", row, ": every token is masked (-inf logits after the ",
               banned_end - banned_begin, " banned ids)");
  if (temperature == 0.0f) return static_cast<int32_t>(argmax);

  // 4. Probabilities (in place) and weights.
  const float inv_temperature = rules::exact::div(1.0f, temperature);
  uint64_t total = 0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    logits[i] = rules::sample_probability(logits[i], max_logit, inv_temperature);
    total += rules::sample_weight(logits[i]);
  }
  const float* probs = logits;
  auto weight = [&](int64_t i) { return rules::sample_weight(probs[i]); };
  auto mass_at_or_above = [&](float threshold) {
    uint64_t mass = 0;
    for (int64_t i = 0; i < vocab_size; ++i) mass += probs[i] >= threshold ? weight(i) : 0;
    return mass;
  };

  // 5. top-k: the top_k-th largest probability among tokens of non-zero weight.
  float top_k_threshold = 0.0f;
  uint64_t top_k_mass = total;
  if (top_k >= 1 && top_k < vocab_size) {
    std::vector<float> positive;
    for (int64_t i = 0; i < vocab_size; ++i) {
      if (weight(i) > 0) positive.push_back(probs[i]);
    }
    if (static_cast<int64_t>(positive.size()) >= top_k) {
      std::nth_element(positive.begin(), positive.begin() + (top_k - 1), positive.end(), std::greater<float>());
      top_k_threshold = positive[top_k - 1];
      top_k_mass = mass_at_or_above(top_k_threshold);
    }
  }

  // 6. top-p: the largest probability whose tokens at or above it weigh ceil(top_p * top_k_mass).
  float top_p_threshold = 0.0f;
  if (top_p < 1.0f) {
    const uint64_t target = rules::sample_top_p_target(top_p, top_k_mass);
    std::vector<float> kept;
    for (int64_t i = 0; i < vocab_size; ++i) {
      if (weight(i) > 0 && probs[i] >= top_k_threshold) kept.push_back(probs[i]);
    }
    std::sort(kept.begin(), kept.end(), std::greater<float>());
    uint64_t running = 0;
    for (float prob : kept) {
      running += rules::sample_weight(prob);
      if (running >= target) {
        top_p_threshold = prob;
        break;
      }
    }
  }

  // 7. min-p, then one draw over the kept weights in token order.
  const float threshold = std::max({top_k_threshold, top_p_threshold, min_p});
  const uint64_t kept_mass = mass_at_or_above(threshold);
  const uint64_t target = rules::mulhi64(
      rules::sample_random_bits(args.seed.data_ptr<int64_t>()[row], args.offset.data_ptr<int64_t>()[row]), kept_mass);
  uint64_t running = 0;
  for (int64_t i = 0; i < vocab_size; ++i) {
    if (probs[i] < threshold) continue;
    running += weight(i);
    if (running > target) return static_cast<int32_t>(i);
  }
  LSERVE_THROW("sample: row ", row, ": internal error, the draw ran past the kept weight ", kept_mass);
}

}  // namespace

void sample(const CpuContext& context, const SampleArgs& args) {
  const int64_t num_rows = args.logits.size(0);
  int32_t* output = args.output.data_ptr<int32_t>();  // (num_rows,)
  context.pool->parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      if (args.raise_invalid_rows) {
        output[row] = sample_row(args, row);
        continue;
      }
      try {
        output[row] = sample_row(args, row);
      } catch (const Error&) {
        output[row] = -1;  // as CUDA marks it
      }
    }
  });
}

}  // namespace lserve::cpu
