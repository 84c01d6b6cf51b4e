// Small fp32 vector helpers for the CPU ops, written as plain loops with eight partial sums so
// that the compiler vectorises the reductions without -ffast-math (lane order is fixed, so the
// result does not depend on the instruction set).
#pragma once

#include <cstdint>

#include "convert.h"

namespace lserve::cpu {

constexpr int kLanes = 8;

// sum_i a[i] * b[i], fp32 accumulation in kLanes partial sums.
LSERVE_CPU_INLINE float dot(const float* a, const float* b, int64_t count) {
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  }
  for (; i < count; ++i) partial[i % kLanes] += a[i] * b[i];
  float sum = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  return sum;
}

LSERVE_CPU_INLINE float sum_squares(const float* a, int64_t count) { return dot(a, a, count); }

}  // namespace lserve::cpu
