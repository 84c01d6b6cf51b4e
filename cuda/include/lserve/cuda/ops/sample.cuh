// sample (contract: cpp/include/lserve/ops/sample.h; reference: cpp/src/cpu/sample.cpp, which shares
// the arithmetic in lserve/ops/sample_rules.h, so tokens agree bit for bit). One CTA per row (1024 threads; 256
// for vocabularies up to 2048).
// Passes over the row are block-strided (coalesced) loops: bans and penalties over the row's CSR
// ranges, the max/argmax, probabilities written in place, then top-k and top-p thresholds by an
// MSB-first radix select over the probabilities' float bits (8 bits a pass, 256-bin shared
// histograms of counts and integer weights; no sort), then the draw, where thread t owns the
// contiguous tokens [t * span, (t + 1) * span) so one block scan of the per-thread kept weights lays
// them end to end in token order. Integer weights make every reduction order give the same sums.
// Nothing allocates or synchronises the device: graph-capturable. Invalid rows get token -1.
// Floor: at most 12 reads of the row (max, probabilities read + write, 4 + 4 radix passes, 2 for the
// draw); batch 64 x vocab 128256 float32 is 33 MB a pass, ~0.4 GB in all, ~0.15 ms at H200 HBM
// bandwidth (partly L2-resident); rows without top-k or top-p skip their 4 passes. Not yet measured.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "lserve/ops/philox.h"
#include "lserve/ops/sample_rules.h"

namespace lserve::cuda {

struct SampleParams {
  float* logits = nullptr;                     // (num_rows, vocab_size), row stride logits_stride; scratch
  const float* temperature = nullptr;          // (num_rows,)
  const int32_t* top_k = nullptr;              // (num_rows,)
  const float* top_p = nullptr;                // (num_rows,)
  const float* min_p = nullptr;                // (num_rows,)
  const int64_t* seed = nullptr;               // (num_rows,)
  const int64_t* offset = nullptr;             // (num_rows,)
  int32_t* output = nullptr;                   // (num_rows,)
  const int32_t* history_indptr = nullptr;     // (num_rows + 1,); null: no penalties
  const int32_t* history_token_ids = nullptr;  // (num_history,)
  const int32_t* num_prompt_tokens = nullptr;  // (num_rows,)
  const float* repetition_penalty = nullptr;   // (num_rows,)
  const float* presence_penalty = nullptr;     // (num_rows,)
  const float* frequency_penalty = nullptr;    // (num_rows,)
  uint32_t* workspace = nullptr;               // (num_rows, vocab_size) token counters, any contents
  const int32_t* banned_indptr = nullptr;      // (num_rows + 1,); null: nothing banned
  const int32_t* banned_token_ids = nullptr;   // (num_banned,)
  int64_t logits_stride = 0;
  int64_t num_history = 0;
  int64_t num_banned = 0;
  int num_rows = 0;
  int vocab_size = 0;
};

namespace sample_detail {

using namespace ::lserve::sample_rules;

// Threads per CTA, by vocabulary: 1024 gives one row the memory parallelism of a whole SM (a decode
// batch has fewer rows than an H200 has SMs; __launch_bounds__ caps registers at 64 a thread); small
// vocabularies (tests, toy models) take 256 so most threads have work.
constexpr int kLargeVocabThreads = 1024;
constexpr int kSmallVocabThreads = 256;
constexpr int kSmallVocabSize = 8 * kSmallVocabThreads;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kDigitsPerLane = kRadixBins / 32;  // the digit search spreads the bins over one warp
constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint32_t kClaimedBit = 0x80000000u;  // workspace counter: the token's penalties are applied

template <int kWarps>
struct SharedStorage {
  unsigned long long mass_hist[kRadixBins];  // integer weight per digit
  unsigned int count_hist[kRadixBins];       // tokens per digit (top-k)
  unsigned long long warp_sum[kWarps];
  float warp_value[kWarps];
  int warp_index[kWarps];
  // The digit search's answer, broadcast to the block.
  unsigned int digit;
  int found;
  unsigned long long above_count;  // tokens (resp. weight) above the digit's bucket
  unsigned long long above_mass;
  unsigned long long mass_at_or_above;
};

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Sum over the block; every thread gets it. Two __syncthreads.
template <int kWarps>
__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long value,
                                                             SharedStorage<kWarps>& shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  value = warp_sum_u64(value);
  if (lane == 0) shared.warp_sum[warp] = value;
  __syncthreads();
  unsigned long long total = 0;
  for (int w = 0; w < kWarps; ++w) total += shared.warp_sum[w];
  __syncthreads();
  return total;
}

// Exclusive prefix sum in thread order; *total gets the block's sum. Two __syncthreads.
template <int kWarps>
__device__ __forceinline__ unsigned long long block_exclusive_scan_u64(unsigned long long value,
                                                                        unsigned long long* total,
                                                                        SharedStorage<kWarps>& shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned long long inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const unsigned long long lower = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += lower;
  }
  if (lane == 31) shared.warp_sum[warp] = inclusive;
  __syncthreads();
  unsigned long long warp_offset = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    const unsigned long long warp_total = shared.warp_sum[w];
    warp_offset += w < warp ? warp_total : 0;
    sum += warp_total;
  }
  __syncthreads();
  *total = sum;
  return warp_offset + inclusive - value;
}

// Largest value over the block, the lowest index among equals; every thread gets both. Two
// __syncthreads.
template <int kWarps>
__device__ __forceinline__ void block_argmax(float& value, int& index, SharedStorage<kWarps>& shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(kFullMask, value, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
  if (lane == 0) {
    shared.warp_value[warp] = value;
    shared.warp_index[warp] = index;
  }
  __syncthreads();
  value = shared.warp_value[0];
  index = shared.warp_index[0];
  for (int w = 1; w < kWarps; ++w) {
    const float other_value = shared.warp_value[w];
    const int other_index = shared.warp_index[w];
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
  __syncthreads();
}

struct Threshold {
  float probability = 0.0f;     // K: keep tokens with probability >= K
  bool found = false;           // false: all tokens together fall short of the target (no cut)
  unsigned long long mass = 0;  // weight of the tokens with probability >= K
};

// Among tokens of non-zero weight, the largest probability K such that the tokens with probability
// >= K number (by_mass false) or weigh (by_mass true) at least target. Non-negative floats order like
// their bits, so this is a radix select on the bits, most significant digit first: each pass
// histograms the tokens whose higher digits match the prefix chosen so far, and one warp finds the
// digit where the running count (weight) from the top reaches the target. probs: (vocab_size,).
template <int kThreads>
__device__ Threshold select_threshold(const float* probs, int vocab_size, bool by_mass, unsigned long long target,
                                      SharedStorage<kThreads / 32>& shared) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  uint32_t prefix = 0, prefix_mask = 0;
  unsigned long long above_count = 0, above_mass = 0, mass_at_or_above = 0;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int bin = tid; bin < kRadixBins; bin += kThreads) {
      shared.count_hist[bin] = 0;
      shared.mass_hist[bin] = 0;
    }
    __syncthreads();
    for (int i = tid; i < vocab_size; i += kThreads) {
      const float probability = probs[i];
      const unsigned long long weight = sample_weight(probability);
      const uint32_t key = __float_as_uint(probability);
      if (weight == 0 || (key & prefix_mask) != prefix) continue;
      const uint32_t digit = (key >> shift) & (kRadixBins - 1);
      if (!by_mass) atomicAdd(&shared.count_hist[digit], 1u);
      atomicAdd(&shared.mass_hist[digit], weight);
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns digits 255 - 8 l down to 248 - 8 l: lanes in order walk the digits from the top.
      unsigned long long lane_count = 0, lane_mass = 0;
      for (int k = 0; k < kDigitsPerLane; ++k) {
        const int digit = kRadixBins - 1 - lane * kDigitsPerLane - k;
        lane_count += shared.count_hist[digit];
        lane_mass += shared.mass_hist[digit];
      }
      unsigned long long count = lane_count, mass = lane_mass;  // inclusive over lanes 0..lane
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const unsigned long long lower_count = __shfl_up_sync(kFullMask, count, offset);
        const unsigned long long lower_mass = __shfl_up_sync(kFullMask, mass, offset);
        if (lane >= offset) {
          count += lower_count;
          mass += lower_mass;
        }
      }
      const unsigned long long reached = by_mass ? above_mass + mass : above_count + count;
      const unsigned ballot = __ballot_sync(kFullMask, reached >= target);
      if (lane == 0) shared.found = ballot != 0;
      if (ballot != 0 && lane == __ffs(ballot) - 1) {
        count = above_count + count - lane_count;  // everything above this lane's top digit
        mass = above_mass + mass - lane_mass;
        for (int k = 0; k < kDigitsPerLane; ++k) {
          const int digit = kRadixBins - 1 - lane * kDigitsPerLane - k;
          const unsigned long long digit_count = shared.count_hist[digit], digit_mass = shared.mass_hist[digit];
          if ((by_mass ? mass + digit_mass : count + digit_count) >= target) {
            shared.digit = static_cast<unsigned>(digit);
            shared.above_count = count;
            shared.above_mass = mass;
            shared.mass_at_or_above = mass + digit_mass;
            break;
          }
          count += digit_count;
          mass += digit_mass;
        }
      }
    }
    __syncthreads();
    const bool found = shared.found != 0;
    const uint32_t digit = shared.digit;
    above_count = shared.above_count;
    above_mass = shared.above_mass;
    mass_at_or_above = shared.mass_at_or_above;
    __syncthreads();  // everyone has read the answer before the next pass or caller reuses the storage
    if (!found) return Threshold{};
    prefix |= digit << shift;
    prefix_mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
  }
  return Threshold{__uint_as_float(prefix), true, mass_at_or_above};
}

// [begin, end) of row's CSR range when 0 <= begin <= end <= num_ids.
__device__ __forceinline__ bool csr_range(const int32_t* indptr, int row, int64_t num_ids, int64_t& begin,
                                          int64_t& end) {
  begin = indptr[row];
  end = indptr[row + 1];
  return begin >= 0 && begin <= end && end <= num_ids;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads, 1) sample_kernel(const SampleParams params) {
  __shared__ SharedStorage<kThreads / 32> shared;
  const int row = blockIdx.x, tid = threadIdx.x;
  const int vocab_size = params.vocab_size;
  float* logits = params.logits + static_cast<int64_t>(row) * params.logits_stride;  // (vocab_size,)

  // Row parameters (the same in every thread, so every early return below is block-uniform).
  const float temperature = params.temperature[row];
  const int32_t top_k = params.top_k[row];
  const float top_p = params.top_p[row];
  const float min_p = params.min_p[row];
  const bool has_penalties = params.history_indptr != nullptr;
  const float repetition = has_penalties ? params.repetition_penalty[row] : 1.0f;
  const float presence = has_penalties ? params.presence_penalty[row] : 0.0f;
  const float frequency = has_penalties ? params.frequency_penalty[row] : 0.0f;
  bool valid = sample_param_error(temperature, top_p, min_p, has_penalties, repetition, presence, frequency) ==
               kSampleParamOk;
  int64_t history_begin = 0, history_end = 0, prompt_end = 0;
  if (has_penalties) {
    valid = csr_range(params.history_indptr, row, params.num_history, history_begin, history_end) && valid;
    const int64_t num_prompt = params.num_prompt_tokens[row];
    valid = valid && num_prompt >= 0 && num_prompt <= history_end - history_begin;
    prompt_end = history_begin + num_prompt;
  }
  int64_t banned_begin = 0, banned_end = 0;
  if (params.banned_indptr != nullptr) {
    valid = csr_range(params.banned_indptr, row, params.num_banned, banned_begin, banned_end) && valid;
  }
  if (!valid) {
    if (tid == 0) params.output[row] = -1;
    return;
  }
  bool invalid_data = false;  // this thread saw a NaN logit or a history id outside the vocabulary

  // 1. Banned ids -> -inf. The first thread to reach a duplicate id reads its raw value (NaN check).
  for (int64_t j = banned_begin + tid; j < banned_end; j += kThreads) {
    const int32_t token_id = params.banned_token_ids[j];
    if (token_id < 0 || token_id >= vocab_size) continue;
    invalid_data |= isnan(logits[token_id]);
    logits[token_id] = -INFINITY;
  }

  // 2. Penalties, once per distinct token. The row's workspace counters: zero every history token's,
  // count the output occurrences, then the first thread to set a token's claimed bit applies its
  // repetition and output penalties (the counter holds its output count).
  const bool use_repetition = repetition != 1.0f;
  const bool use_output = (presence != 0.0f || frequency != 0.0f) && history_end > prompt_end;
  if (use_repetition || use_output) {
    uint32_t* counters = params.workspace + static_cast<int64_t>(row) * vocab_size;  // (vocab_size,)
    const int32_t* history = params.history_token_ids;
    for (int64_t j = history_begin + tid; j < history_end; j += kThreads) {
      const int32_t token_id = history[j];
      if (token_id >= 0 && token_id < vocab_size) {
        counters[token_id] = 0;
      } else {
        invalid_data = true;
      }
    }
    __syncthreads();  // also orders the bans before the penalties read the logits
    if (use_output) {
      for (int64_t j = prompt_end + tid; j < history_end; j += kThreads) {
        const int32_t token_id = history[j];
        if (token_id >= 0 && token_id < vocab_size) atomicAdd(&counters[token_id], 1u);
      }
    }
    __syncthreads();
    for (int64_t j = history_begin + tid; j < history_end; j += kThreads) {
      const int32_t token_id = history[j];
      if (token_id < 0 || token_id >= vocab_size) continue;
      const uint32_t previous = atomicOr(&counters[token_id], kClaimedBit);
      if (previous & kClaimedBit) continue;
      float logit = logits[token_id];
      if (use_repetition) logit = apply_repetition_penalty(logit, repetition);
      if (use_output && previous > 0) {
        logit = apply_output_penalties(logit, static_cast<int32_t>(previous), presence, frequency);
      }
      logits[token_id] = logit;
    }
  }
  __syncthreads();

  // 3. Maximum; greedy rows are done.
  float max_logit = -INFINITY;
  int argmax = INT_MAX;
  for (int i = tid; i < vocab_size; i += kThreads) {
    const float logit = logits[i];
    invalid_data |= isnan(logit);
    if (logit > max_logit) {
      max_logit = logit;
      argmax = i;
    }
  }
  invalid_data = __syncthreads_or(invalid_data);
  block_argmax(max_logit, argmax, shared);
  if (invalid_data || max_logit == -INFINITY) {
    if (tid == 0) params.output[row] = -1;
    return;
  }
  if (temperature == 0.0f) {
    if (tid == 0) params.output[row] = argmax;
    return;
  }

  // 4. Probabilities, in place (each thread rewrites the elements it reads), and their total weight.
  const float inv_temperature = exact::div(1.0f, temperature);
  unsigned long long thread_total = 0;
  for (int i = tid; i < vocab_size; i += kThreads) {
    const float probability = sample_probability(logits[i], max_logit, inv_temperature);
    logits[i] = probability;
    thread_total += sample_weight(probability);
  }
  const unsigned long long total = block_sum_u64(thread_total, shared);  // its barriers publish the writes
  const float* probs = logits;

  // 5-6. top-k, then top-p over the weight top-k keeps.
  float top_k_threshold = 0.0f;
  unsigned long long top_k_mass = total;
  if (top_k >= 1 && top_k < vocab_size) {
    const Threshold threshold =
        select_threshold<kThreads>(probs, vocab_size, false, static_cast<unsigned>(top_k), shared);
    if (threshold.found) {
      top_k_threshold = threshold.probability;
      top_k_mass = threshold.mass;
    }
  }
  float top_p_threshold = 0.0f;
  if (top_p < 1.0f) {
    const unsigned long long target = sample_top_p_target(top_p, top_k_mass);
    top_p_threshold = select_threshold<kThreads>(probs, vocab_size, true, target, shared).probability;
  }

  // 7. min-p, then one draw: the kept weights of thread t's tokens follow those of threads < t.
  const float threshold = fmaxf(fmaxf(top_k_threshold, top_p_threshold), min_p);
  const int span = (vocab_size + kThreads - 1) / kThreads;
  const int begin = min(vocab_size, tid * span), end = min(vocab_size, begin + span);
  unsigned long long thread_kept = 0;
  for (int i = begin; i < end; ++i) {
    const float probability = probs[i];
    if (probability >= threshold) thread_kept += sample_weight(probability);
  }
  if (tid == 0) params.output[row] = -1;  // overwritten below, after the scan's barriers
  unsigned long long kept_mass = 0;
  const unsigned long long before = block_exclusive_scan_u64(thread_kept, &kept_mass, shared);
  const unsigned long long target = mulhi64(sample_random_bits(params.seed[row], params.offset[row]), kept_mass);
  if (before <= target && target < before + thread_kept) {
    unsigned long long running = before;
    for (int i = begin; i < end; ++i) {
      const float probability = probs[i];
      if (probability < threshold) continue;
      running += sample_weight(probability);
      if (running > target) {
        params.output[row] = i;
        break;
      }
    }
  }
}

}  // namespace sample_detail

inline cudaError_t launch_sample(const SampleParams& params, cudaStream_t stream) {
  using namespace sample_detail;
  if (params.num_rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(params.num_rows));
  if (params.vocab_size <= kSmallVocabSize) {
    sample_kernel<kSmallVocabThreads><<<grid, kSmallVocabThreads, 0, stream>>>(params);
  } else {
    sample_kernel<kLargeVocabThreads><<<grid, kLargeVocabThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace lserve::cuda
