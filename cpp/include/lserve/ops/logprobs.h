// logprobs: OpenAI / vLLM logprobs of sampled tokens, computed on the backend's device from the
// same raw logits the sampler reads, so asking for them never changes which token is drawn and
// never moves a whole logits row to the host. Row r reads logits[row_indices[r]] (several rows may
// read one logits row: the samples of a group share their leader's first logits) and reports
//   logprobs[r]         = log_softmax(row)[token_ids[r]],
//   top_token_ids[r, j] = the j-th best token of the row: larger logit first, lower id on ties,
//   top_logprobs[r, j]  = log_softmax(row)[top_token_ids[r, j]],
// where log_softmax(x)_i = x_i - max(x) - log(sum_k exp(x_k - max(x))) (sum in float64; a token
// at the maximum gets exactly -log(sum), also when the maximum is +inf). The logits are the raw
// model outputs: before penalties, min_tokens bans and temperature (vLLM's default, "raw_logprobs").
// Data, not parameters, decide the values: a row holding a NaN gives NaN logprobs (its top ids are
// still written, in the order above with NaN ranked last), and token_ids[r] outside the vocabulary
// (e.g. -1 from a sample row the sampler rejected) gives logprobs[r] = NaN. Neither raises, on any
// backend. row_indices[r] outside the logits rows: the CPU raises lserve::Error naming r; CUDA, which
// cannot raise without a sync, writes NaN logprobs and -1 ids. Reference: cpp/src/cpu/logprobs.cpp; CUDA: cuda/include/lserve/cuda/ops/logprobs.cuh.
#pragma once
#include <cstdint>

#include "lserve/ops/common.h"

namespace lserve {

// Most top logprobs one row may ask for (vLLM's default max_logprobs).
constexpr int kMaxLogprobs = 20;

struct LogprobsArgs {
  TensorView logits;         // (num_logits_rows, vocab_size) float32, rows contiguous; read only
  TensorView row_indices;    // (num_rows,) int32 in [0, num_logits_rows): the logits row of row r
  TensorView token_ids;      // (num_rows,) int32: the token whose logprob row r reports
  TensorView logprobs;       // (num_rows,) float32 out
  TensorView top_token_ids;  // (num_rows, num_top) int32 out, num_top in [0, kMaxLogprobs]; a vocabulary
                             // smaller than num_top leaves the tail -1 (logprob -inf)
  TensorView top_logprobs;   // (num_rows, num_top) float32 out

  int64_t num_top() const { return top_token_ids.size(1); }

  void validate(const Device& device) const {
    const char* op = "logprobs";
    TensorCheck(logits, op, "logits").ndim(2).dtype(DType::kF32).device(device).rows_contiguous();
    LSERVE_CHECK(logits.size(1) >= 1 && logits.size(1) <= INT32_MAX, op,
                 ": 'logits' vocab_size (dim 1) must be in [1, 2^31), got shape ", logits.shape_str());
    TensorCheck(row_indices, op, "row_indices").ndim(1).dtype(DType::kI32).device(device).contiguous();
    const int64_t num_rows = row_indices.size(0);
    TensorCheck(token_ids, op, "token_ids").ndim(1).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_rows);
    TensorCheck(logprobs, op, "logprobs").ndim(1).dtype(DType::kF32).device(device).contiguous().size(0, num_rows);
    TensorCheck(top_token_ids, op, "top_token_ids").ndim(2).dtype(DType::kI32).device(device).contiguous()
        .size(0, num_rows);
    TensorCheck(top_logprobs, op, "top_logprobs").ndim(2).dtype(DType::kF32).device(device).contiguous()
        .size(0, num_rows).size(1, top_token_ids.size(1));
    LSERVE_CHECK(num_top() <= kMaxLogprobs, op, ": at most ", kMaxLogprobs, " top logprobs per row, got ",
                 num_top(), " ('top_token_ids' shape ", top_token_ids.shape_str(), ")");
    if (device.type == DeviceType::kCPU) {  // on a device the indices are checked where they are read
      const int32_t* indices = row_indices.data_ptr<int32_t>();
      for (int64_t r = 0; r < num_rows; ++r) {
        LSERVE_CHECK(indices[r] >= 0 && indices[r] < logits.size(0), op, ": row_indices[", r, "] = ", indices[r],
                     " outside [0, ", logits.size(0), ") (the logits rows)");
      }
    }
  }
};

}  // namespace lserve
