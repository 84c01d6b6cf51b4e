// ggml block formats on the CPU: the weight blocks as stored (Q8_0, Q4_0, Q4_1; layouts in
// lserve/tensor.h), the 8-bit activation blocks the GEMM multiplies them with, and exact
// row dequantisation (the same formulas as gguf-py quants.py, so the result is bit for bit theirs:
// an f16 scale times an integer of at most 8 bits is exact in float32, plus one rounding for Q4_1's
// minimum). Kernels: cpp/src/cpu/gemm_quant.cpp; reference: tests/ops/test_gemm_quant.py.
#pragma once

#include <cstdint>
#include <cstring>

#include "lserve/tensor.h"

namespace lserve::cpu {

constexpr int64_t kQuantBlock = 32;  // items per block, every format here

struct BlockQ8_0 {
  uint16_t d;      // f16 scale
  int8_t qs[32];   // value = d * q
};
struct BlockQ4_0 {
  uint16_t d;      // f16 scale
  uint8_t qs[16];  // value = d * (q - 8); item i: low nibble of qs[i], item 16 + i: high nibble
};
struct BlockQ4_1 {
  uint16_t d, m;   // f16 scale and minimum
  uint8_t qs[16];  // value = d * q + m; nibbles as Q4_0
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20,
              "ggml block layouts are packed");

// One block of 32 activations quantised on the fly (the GEMM's int8 side): x ~ d * q,
// q = round-half-even(x / d), d = max|x| / 127, and s = d * sum(q) (the term a weight block's
// minimum multiplies). 40 bytes.
struct ActBlock {
  float d;
  float s;
  int8_t qs[32];
};

inline float half_to_float(uint16_t bits) { return f16_to_float(f16_t{bits}); }

// dst[0, count) = the dequantised items of `count / 32` consecutive blocks of `dtype` at src.
inline void dequantize_row(DType dtype, const void* src, float* dst, int64_t count) {
  const int64_t num_blocks = count / kQuantBlock;
  switch (dtype) {
    case DType::kQ8_0: {
      const auto* blocks = static_cast<const BlockQ8_0*>(src);
      for (int64_t b = 0; b < num_blocks; ++b, dst += kQuantBlock) {
        const float d = half_to_float(blocks[b].d);
        for (int i = 0; i < 32; ++i) dst[i] = static_cast<float>(blocks[b].qs[i]) * d;
      }
      return;
    }
    case DType::kQ4_0: {
      const auto* blocks = static_cast<const BlockQ4_0*>(src);
      for (int64_t b = 0; b < num_blocks; ++b, dst += kQuantBlock) {
        const float d = half_to_float(blocks[b].d);
        for (int i = 0; i < 16; ++i) {
          dst[i] = d * static_cast<float>(static_cast<int>(blocks[b].qs[i] & 0x0f) - 8);
          dst[i + 16] = d * static_cast<float>(static_cast<int>(blocks[b].qs[i] >> 4) - 8);
        }
      }
      return;
    }
    case DType::kQ4_1: {
      const auto* blocks = static_cast<const BlockQ4_1*>(src);
      for (int64_t b = 0; b < num_blocks; ++b, dst += kQuantBlock) {
        const float d = half_to_float(blocks[b].d), m = half_to_float(blocks[b].m);
        for (int i = 0; i < 16; ++i) {
          dst[i] = d * static_cast<float>(blocks[b].qs[i] & 0x0f) + m;
          dst[i + 16] = d * static_cast<float>(blocks[b].qs[i] >> 4) + m;
        }
      }
      return;
    }
    default:
      LSERVE_THROW("dequantize_row: ", dtype_name(dtype), " is not a block format");
  }
}

}  // namespace lserve::cpu
