// The arithmetic of the sample op (ops/sample.h) that the CPU reference (cpp/src/cpu/sample.cpp) and
// the CUDA kernel (cuda/include/lserve/cuda/ops/sample.cuh) share, so both produce the same bits:
// penalties, exp, probability -> integer weight, the top-p target, parameter ranges.
// Only IEEE-rounded +, -, *, / and exact conversions: on the device through the _rn intrinsics,
// which nvcc never contracts into FMAs; on the host the file must be compiled without FP
// contraction (lserve_core uses -ffp-contract=off). Plain C++ when not compiled by nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lserve/ops/philox.h"

namespace lserve::sample_rules {

namespace exact {

LSERVE_HOST_DEVICE float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LSERVE_HOST_DEVICE float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LSERVE_HOST_DEVICE float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LSERVE_HOST_DEVICE float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
LSERVE_HOST_DEVICE bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}
LSERVE_HOST_DEVICE float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#endif
}

}  // namespace exact

// ---- penalties (vLLM / sample_token's formulas, in its order) ----------------------------------

// Repetition penalty of a token seen in the prompt or the output.
LSERVE_HOST_DEVICE float apply_repetition_penalty(float logit, float penalty) {
  return logit > 0.0f ? exact::div(logit, penalty) : exact::mul(logit, penalty);
}

// Presence and frequency penalties of a token seen count >= 1 times in the output.
LSERVE_HOST_DEVICE float apply_output_penalties(float logit, int32_t count, float presence, float frequency) {
#if defined(__CUDA_ARCH__)
  const float count_f = __int2float_rn(count);
#else
  const float count_f = static_cast<float>(count);
#endif
  return exact::sub(logit, exact::add(exact::mul(frequency, count_f), presence));
}

// ---- probabilities and weights ------------------------------------------------------------------

// e^d for d <= 0 from rounded float +, -, * only (no libm): Cody-Waite reduction d = n ln2 + r,
// |r| <= ln2 / 2, a degree-7 Taylor polynomial (truncation < 6e-9 relative), scaled by 2^n.
// Relative error a few float ulps. d < -40 (and -inf) gives 0: e^-40 is far below the smallest
// non-zero weight, 2^-40.
LSERVE_HOST_DEVICE float sample_exp(float d) {
  if (!(d >= -40.0f)) return 0.0f;
  // Constants as hex literals: the same bits whatever compiler folds them.
  constexpr float kLog2e = 0x1.715476p+0f;
  constexpr float kLn2Hi = 0x1.62e4p-1f;  // 0.693145751953125, 16 significant bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = 0x1.7f7d1cp-20f;  // ln 2 - kLn2Hi
  constexpr float kInv5040 = 0x1.a01a02p-13f, kInv720 = 0x1.6c16c2p-10f, kInv120 = 0x1.111112p-7f;
  constexpr float kInv24 = 0x1.555556p-5f, kInv6 = 0x1.555556p-3f;
  const float t = exact::mul(d, kLog2e);
#if defined(__CUDA_ARCH__)
  const float n = floorf(exact::add(t, 0.5f));
#else
  const float n = std::floor(exact::add(t, 0.5f));
#endif
  const float r = exact::sub(exact::sub(d, exact::mul(n, kLn2Hi)), exact::mul(n, kLn2Lo));
  float poly = kInv5040;
  poly = exact::add(exact::mul(poly, r), kInv720);
  poly = exact::add(exact::mul(poly, r), kInv120);
  poly = exact::add(exact::mul(poly, r), kInv24);
  poly = exact::add(exact::mul(poly, r), kInv6);
  poly = exact::add(exact::mul(poly, r), 0.5f);
  poly = exact::add(exact::mul(poly, r), 1.0f);
  poly = exact::add(exact::mul(poly, r), 1.0f);
  const int exponent = static_cast<int>(n);  // in [-58, 0]: 2^n is a normal float
  return exact::mul(poly, exact::bits_to_float(static_cast<uint32_t>(exponent + 127) << 23));
}

// Unnormalised probability of a (penalised) logit under the row's maximum: exactly 1 at the
// maximum (also when it is +inf), else e^((logit - max) * inv_temperature).
LSERVE_HOST_DEVICE float sample_probability(float logit, float max_logit, float inv_temperature) {
  if (logit == max_logit) return 1.0f;
  return sample_exp(exact::mul(exact::sub(logit, max_logit), inv_temperature));
}

// Fixed-point weight of a probability in [0, 1]: floor(p * 2^40). Sums of weights are integers, so
// every reduction order gives the same total and the draw is exact; p < 2^-40 weighs 0 (never
// drawn). The maximum (p = 1) weighs 2^40, so a row's mass is >= 2^40 and < 2^63 for vocabularies
// below 2^23.
constexpr int kSampleWeightBits = 40;
constexpr uint64_t kSampleMaxWeight = uint64_t{1} << kSampleWeightBits;

LSERVE_HOST_DEVICE uint64_t sample_weight(float probability) {
  constexpr float kScale = static_cast<float>(kSampleMaxWeight);
#if defined(__CUDA_ARCH__)
  return __float2ull_rz(__fmul_rn(probability, kScale));
#else
  return static_cast<uint64_t>(probability * kScale);
#endif
}

// top-p keeps the tokens of largest probability whose weight reaches ceil(top_p * mass), in double
// (exactly rounded on both sides); at least 1 and at most mass.
LSERVE_HOST_DEVICE uint64_t sample_top_p_target(float top_p, uint64_t mass) {
#if defined(__CUDA_ARCH__)
  const double mass_d = __ull2double_rn(mass);
  const double target = ceil(__dmul_rn(static_cast<double>(top_p), mass_d));
  uint64_t result = target >= mass_d ? mass : __double2ull_rz(target);
#else
  const double mass_d = static_cast<double>(mass);
  const double target = std::ceil(static_cast<double>(top_p) * mass_d);
  uint64_t result = target >= mass_d ? mass : static_cast<uint64_t>(target);
#endif
  return result < 1 ? 1 : result;
}

// ---- parameter ranges -----------------------------------------------------------------------------

// The first per-row parameter outside its range (kSampleParamOk when none). The CPU reference
// raises naming it; the CUDA kernel writes -1 for the row.
enum SampleParamError : int {
  kSampleParamOk = 0,
  kSampleBadTemperature,        // finite, >= 0
  kSampleBadTopP,               // (0, 1]
  kSampleBadMinP,               // [0, 1]
  kSampleBadRepetitionPenalty,  // finite, > 0
  kSampleBadPresencePenalty,    // finite
  kSampleBadFrequencyPenalty,   // finite
};

LSERVE_HOST_DEVICE int sample_param_error(float temperature, float top_p, float min_p, bool has_penalties,
                                          float repetition_penalty, float presence_penalty,
                                          float frequency_penalty) {
  if (!(exact::is_finite(temperature) && temperature >= 0.0f)) return kSampleBadTemperature;
  if (!(top_p > 0.0f && top_p <= 1.0f)) return kSampleBadTopP;
  if (!(min_p >= 0.0f && min_p <= 1.0f)) return kSampleBadMinP;
  if (has_penalties) {
    if (!(exact::is_finite(repetition_penalty) && repetition_penalty > 0.0f)) return kSampleBadRepetitionPenalty;
    if (!exact::is_finite(presence_penalty)) return kSampleBadPresencePenalty;
    if (!exact::is_finite(frequency_penalty)) return kSampleBadFrequencyPenalty;
  }
  return kSampleParamOk;
}

}  // namespace lserve::sample_rules
