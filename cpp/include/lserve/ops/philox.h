// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator, ten rounds of 32x32->64-bit multiplies and key bumps, no state. Plain
// C++ when not compiled by nvcc, so the CPU reference and the CUDA kernels draw identical bits.
// Known answers (Random123's kat_vectors) are pinned in tests/ops/test_sample.py. Lives beside the
// op contracts (cpp/include/lserve/ops/) so the CPU backend and the CUDA kernels include one file.
#pragma once

#include <cstdint>

// Host and device: nvcc compiles these for both; any other compiler sees plain inline C++.
#ifndef LSERVE_HOST_DEVICE
#if defined(__CUDACC__)
#define LSERVE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LSERVE_HOST_DEVICE inline
#endif
#endif

namespace lserve::sample_rules {

struct Philox4x32 {
  uint32_t words[4];
};

// High 32 bits of a * b.
LSERVE_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// High 64 bits of a * b: floor(a * b / 2^64), i.e. a uniform integer in [0, b) for a uniform a.
LSERVE_HOST_DEVICE uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// One block of 128 random bits for (counter, key).
LSERVE_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMultiplier0 = 0xD2511F53u, kMultiplier1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // golden ratio, sqrt(3) - 1
  uint32_t* c = counter.words;
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kMultiplier0, c[0]), lo0 = kMultiplier0 * c[0];
    const uint32_t hi1 = mulhi32(kMultiplier1, c[2]), lo1 = kMultiplier1 * c[2];
    const uint32_t next0 = hi1 ^ c[1] ^ key0, next2 = hi0 ^ c[3] ^ key1;
    c[0] = next0;
    c[1] = lo1;
    c[2] = next2;
    c[3] = lo0;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// The sampler's 64 random bits for one draw: key = seed, counter = (offset, 0). The position of
// the row in its batch is deliberately not an input, so a seeded request draws the same numbers
// whatever else is batched with it. Bits: words[0] high, words[1] low.
LSERVE_HOST_DEVICE uint64_t sample_random_bits(int64_t seed, int64_t offset) {
  const uint64_t key = static_cast<uint64_t>(seed), count = static_cast<uint64_t>(offset);
  const Philox4x32 counter{{static_cast<uint32_t>(count), static_cast<uint32_t>(count >> 32), 0u, 0u}};
  const Philox4x32 bits = philox4x32_10(counter, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  return (static_cast<uint64_t>(bits.words[0]) << 32) | bits.words[1];
}

}  // namespace lserve::sample_rules
