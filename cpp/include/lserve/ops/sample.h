// sample: one token per row of a float32 logits matrix, on the backend's device, with per-row
// parameters. The engine's only sampler, on every backend; the steps, in order:
//   1. banned ids -> -inf (min_tokens masking of eos/stop ids; ids outside the vocabulary skipped);
//   2. repetition penalty on each distinct prompt or output token (HF / vLLM: logit > 0 ? logit / p
//      : logit * p), then presence/frequency penalties on each distinct output token (OpenAI / vLLM:
//      logit -= frequency * count + presence), float32;
//   3. temperature 0: argmax, the lowest id on ties;
//   4. else p = exp((logit - max) / T) (exactly 1 at the maximum), then top-k, top-p, min-p, one draw.
// Filters are thresholds, so a GPU needs no sort (CPU = CUDA bit for bit):
//   - weights: w = floor(p * 2^40) (integers, so sums are exact in any order; p < 2^-40 weighs 0);
//   - top-k (1 <= top_k < vocab_size): keeps every token with p >= p_k, p_k the top_k-th largest p
//     among tokens of non-zero weight (ties at p_k all stay; fewer than top_k such tokens: no cut);
//   - top-p (< 1): with M the weight top-k keeps, keeps every token with p >= p_p, p_p the largest
//     p such that the tokens with p >= p_p weigh at least ceil(top_p * M) (ties at p_p all stay);
//   - min-p: keeps p >= min_p (the maximum is 1, so this is min_p * max as in vLLM);
//   - draw: r = Philox4x32-10(key = seed, counter = offset) (64 bits), target = floor(r * S / 2^64)
//     with S the kept weight; the token is the first, in token-id order, whose running kept weight
//     exceeds target. The same (seed, offset) gives the same token; the row's position in the
//     batch does not matter. Pass the tokens generated so far as offset for a fresh draw per step.
// Invalid rows (a parameter out of range, a NaN logit, a history id outside the vocabulary when the
// row's penalties are on, a malformed CSR range, every token -inf): the CUDA backend cannot raise
// without a sync and writes -1; the CPU reference raises lserve::Error naming the row, or, with
// raise_invalid_rows = false (the engine's setting: one bad row aborts only its own request), writes
// -1 like CUDA.
// Numerics: lserve/ops/sample_rules.h and lserve/ops/philox.h, shared by both backends.
#pragma once
#include <cstdint>

#include "lserve/ops/common.h"

namespace lserve {

// Largest vocabulary: a row's total weight (< vocab_size * 2^40) must stay below 2^63.
constexpr int64_t kSampleMaxVocabSize = int64_t{1} << 22;

// Bytes of SampleArgs::workspace: one uint32 token counter per (row, token) for the penalties.
inline int64_t sample_workspace_bytes(int64_t num_rows, int64_t vocab_size) {
  return num_rows * vocab_size * static_cast<int64_t>(sizeof(uint32_t));
}

struct SampleArgs {
  TensorView logits;       // (num_rows, vocab_size) float32, rows contiguous. Scratch: the op overwrites it
  TensorView temperature;  // (num_rows,) float32, finite, >= 0; 0 = greedy
  TensorView top_k;        // (num_rows,) int32; <= 0 (or >= vocab_size) = off
  TensorView top_p;        // (num_rows,) float32 in (0, 1]; 1 = off
  TensorView min_p;        // (num_rows,) float32 in [0, 1]; 0 = off
  TensorView seed;         // (num_rows,) int64: the Philox key of the row's request
  TensorView offset;       // (num_rows,) int64: the Philox counter, e.g. the request's tokens generated so far
  TensorView output;       // (num_rows,) int32 out: the sampled token ids (-1: invalid row, CUDA only)

  // Penalties: all seven present, or all absent (no penalties).
  TensorView history_indptr;      // (num_rows + 1,) int32: row r's history is [indptr[r], indptr[r + 1])
  TensorView history_token_ids;   // (num_history,) int32: per row its prompt tokens, then its output tokens
  TensorView num_prompt_tokens;   // (num_rows,) int32: how many leading history tokens are prompt tokens
  TensorView repetition_penalty;  // (num_rows,) float32, finite, > 0; 1 = off (prompt and output tokens)
  TensorView presence_penalty;    // (num_rows,) float32, finite; 0 = off (output tokens)
  TensorView frequency_penalty;   // (num_rows,) float32, finite; 0 = off (output tokens)
  TensorView workspace;           // (>= sample_workspace_bytes(num_rows, vocab_size),) uint8, 4-byte aligned;
                                  // contents need no initialisation and are left undefined

  // Banned tokens (set to -inf before the penalties): both present, or both absent.
  TensorView banned_indptr;     // (num_rows + 1,) int32: row r's banned ids are [indptr[r], indptr[r + 1])
  TensorView banned_token_ids;  // (num_banned,) int32; ids outside [0, vocab_size) are skipped

  bool raise_invalid_rows = true;  // CPU: raise on an invalid row (true) or write -1 for it (false)

  bool has_penalties() const { return history_indptr.defined(); }
  bool has_banned() const { return banned_indptr.defined(); }

  void validate(const Device& device) const {
    const char* op = "sample";
    TensorCheck(logits, op, "logits").ndim(2).dtype(DType::kF32).device(device).rows_contiguous();
    const int64_t num_rows = logits.size(0), vocab_size = logits.size(1);
    LSERVE_CHECK(vocab_size >= 1 && vocab_size <= kSampleMaxVocabSize, op,
                 ": 'logits' vocab_size (dim 1) must be in [1, ", kSampleMaxVocabSize, "], got shape ",
                 logits.shape_str());
    auto per_row = [&](const TensorView& view, const char* name, DType dtype) {
      TensorCheck(view, op, name).ndim(1).dtype(dtype).device(device).contiguous().size(0, num_rows);
    };
    per_row(temperature, "temperature", DType::kF32);
    per_row(top_k, "top_k", DType::kI32);
    per_row(top_p, "top_p", DType::kF32);
    per_row(min_p, "min_p", DType::kF32);
    per_row(seed, "seed", DType::kI64);
    per_row(offset, "offset", DType::kI64);
    per_row(output, "output", DType::kI32);

    const bool any_penalty = history_indptr.defined() || history_token_ids.defined() || num_prompt_tokens.defined() ||
                             repetition_penalty.defined() || presence_penalty.defined() ||
                             frequency_penalty.defined() || workspace.defined();
    if (any_penalty) {
      LSERVE_CHECK(history_indptr.defined() && history_token_ids.defined() && num_prompt_tokens.defined() &&
                       repetition_penalty.defined() && presence_penalty.defined() && frequency_penalty.defined() &&
                       workspace.defined(),
                   op, ": the penalty tensors (history_indptr, history_token_ids, num_prompt_tokens, "
                   "repetition_penalty, presence_penalty, frequency_penalty, workspace) go together; some are missing");
      TensorCheck(history_indptr, op, "history_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_rows + 1);
      TensorCheck(history_token_ids, op, "history_token_ids").ndim(1).dtype(DType::kI32).device(device).contiguous();
      per_row(num_prompt_tokens, "num_prompt_tokens", DType::kI32);
      per_row(repetition_penalty, "repetition_penalty", DType::kF32);
      per_row(presence_penalty, "presence_penalty", DType::kF32);
      per_row(frequency_penalty, "frequency_penalty", DType::kF32);
      TensorCheck(workspace, op, "workspace").ndim(1).dtype(DType::kU8).device(device).contiguous();
      const int64_t needed = sample_workspace_bytes(num_rows, vocab_size);
      LSERVE_CHECK(workspace.size(0) >= needed, op, ": 'workspace' holds ", workspace.size(0), " bytes, needs ",
                   needed, " (sample_workspace_bytes(", num_rows, ", ", vocab_size, "))");
      LSERVE_CHECK(reinterpret_cast<uintptr_t>(workspace.data) % alignof(uint32_t) == 0, op,
                   ": 'workspace' must be 4-byte aligned");
    }
    if (banned_indptr.defined() || banned_token_ids.defined()) {
      LSERVE_CHECK(banned_indptr.defined() && banned_token_ids.defined(), op,
                   ": 'banned_indptr' and 'banned_token_ids' go together; one is missing");
      TensorCheck(banned_indptr, op, "banned_indptr").ndim(1).dtype(DType::kI32).device(device).contiguous()
          .size(0, num_rows + 1);
      TensorCheck(banned_token_ids, op, "banned_token_ids").ndim(1).dtype(DType::kI32).device(device).contiguous();
    }
  }
};

}  // namespace lserve
