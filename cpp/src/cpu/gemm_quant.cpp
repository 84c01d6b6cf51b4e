// CPU GEMM with block-format weights (Q8_0, Q4_0, Q4_1; lserve/tensor.h): output (num_tokens,
// out_features) = input (num_tokens, in_features) f32 @ dequant(weight)^T (+ bias), the weight read
// as stored. The arithmetic is fp32 throughout: the activations stay fp32 and each weight block of
// 32 is expanded to fp32 (w = d * q + m by one FMA; Q4_0 is m = -8 d, Q8_0 m = 0; every value is
// exactly gguf-py's dequantised value, see quant.h) into a small per-thread panel (kTileFeatures
// rows of in_features floats, in L1/L2) once per (feature group, block of up to kTokenBlock tokens),
// then multiplied with fp32 FMAs by a register tile of kTileTokens tokens x kTileFeatures features.
// The dequantisation is amortised over the token block in prefill. A single token (decode) takes
// kRowFeatures features at a time with the blocks dequantised in registers and used at once.
//
// Batch invariance: every (token, feature) output has its own 8-lane accumulator; lane l sums
// w[k] * x[k] for k = l, l + 8, ... in increasing k by FMA, then a fixed horizontal sum, then +bias.
// A tile of fewer tokens (leftovers; missing features repeat a present one into scratch outputs)
// and the one-token path run the same per-accumulator sequence, and the weight values do not
// depend on the tile, the token count or the thread. So row i of an M-row call
// equals the 1-row call on row i bit for bit (tests/ops/test_gemm_quant.py checks it). The scalar
// fallback does the same math in the same order (its own bits: no FMA contraction guarantee).
//
// Floor (decode, 1 token): the weight bytes, 20 B per 32 Q4_1 items: SmolLM2-135M's 30 layers are
// 66 MB and its Q8_0 lm_head 30 MB per token; at the ~10-20 GB/s of a 2-core VM that is 5-10 ms.
#include <algorithm>
#include <cmath>
#include <vector>

#include "aligned_buffer.h"
#include "convert.h"
#include "cpu_backend.h"
#include "quant.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LSERVE_CPU_X86 1
#endif

namespace lserve::cpu {

namespace {

// Register tile: kTileTokens x kTileFeatures 8-lane accumulators (12 ymm), the features' weight
// vectors (3) and a token's vector: AVX2's 16 registers. 7 loads per 12 FMAs (4 x 2: 6 per 8 ran
// at 0.8x the float32 GEMM, 4 x 3 at ~1.0x on a 256 x 576 x 1536 q4_1 product).
constexpr int kTileTokens = 4;
constexpr int kTileFeatures = 3;
// Tokens per dequantised panel: its kTileFeatures x in_features floats (12 KiB at 1536 inputs) are
// reused by up to kTokenBlock tokens, whose rows (64 x 6 KiB) stay in L2 across feature groups.
constexpr int64_t kTokenBlock = 64;
constexpr int kLanes = 8;
// Decode (one token): kRowFeatures features at a time, their blocks dequantised in registers and
// multiplied at once (8 independent FMA chains; no panel round trip).
constexpr int kRowFeatures = 8;

// ---- portable kernel -------------------------------------------------------------------------

// One accumulator's sequence: lane l sums w[k] * x[k] for k = l, l + 8, ..., then the AVX2 hsum's
// order ((l, l + 4), then pairs, then the last two), then + bias.
inline float dot_generic(const float* w, const float* x, int64_t in_features, float bias) {
  float acc[kLanes] = {};
  for (int64_t k = 0; k < in_features; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += w[k + l] * x[k + l];
  }
  float s[4];
  for (int l = 0; l < 4; ++l) s[l] = acc[l] + acc[l + 4];
  return ((s[0] + s[2]) + (s[1] + s[3])) + bias;
}

struct GenericKernels {
  static void dequantize(DType dtype, const uint8_t* weight_row, float* out, int64_t in_features) {
    dequantize_row(dtype, weight_row, out, in_features);
  }
  template <int kMt>
  static void tile(const float* const* panel, const float* const* x_rows, int64_t in_features, const float* bias,
                   float* const* out_rows) {
    for (int i = 0; i < kMt; ++i) {
      for (int j = 0; j < kTileFeatures; ++j) {
        out_rows[i][j] = dot_generic(panel[j], x_rows[i], in_features, bias ? bias[j] : 0.0f);
      }
    }
  }
  // One token x kRowFeatures features (decode): the same per-output sequence as tile.
  static void row(DType dtype, const uint8_t* const* weight_rows, const float* x, int64_t in_features,
                  const float* bias, float* out, float* scratch) {
    for (int j = 0; j < kRowFeatures; ++j) {
      dequantize_row(dtype, weight_rows[j], scratch, in_features);
      out[j] = dot_generic(scratch, x, in_features, bias ? bias[j] : 0.0f);
    }
  }
};

// ---- AVX2 kernels ----------------------------------------------------------------------------

#ifdef LSERVE_CPU_X86
#define LSERVE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LSERVE_AVX2_INLINE LSERVE_AVX2 inline __attribute__((always_inline))

LSERVE_AVX2_INLINE float hsum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// One row of blocks to fp32, the values of dequantize_row: d * q is exact in fp32 (f16 scale times
// an integer of <= 8 bits), so fma(q, d, m) rounds d * q + m once as dequantize_row does, and
// d * (q - 8) = fma(q, d, -8 d) exactly.
// One block's 32 values as 4 x 8 floats. Byte -> int32 widening straight from memory (one shuffle-
// port op per 8 bytes); a Q4 dword's low nibble is items 0-15, its high nibble items 16-31 (and /
// shift on the vector ports): 2 shuffles per Q4 block, 4 per Q8_0 block.
template <DType kWeight>
LSERVE_AVX2_INLINE void dequantize_block(const uint8_t* weight_row, int64_t b, __m256 out[4]) {
  if constexpr (kWeight == DType::kQ8_0) {
    const auto* block = reinterpret_cast<const BlockQ8_0*>(weight_row) + b;
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(block->d));
    for (int s = 0; s < 4; ++s) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block->qs + 8 * s));
      out[s] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
  } else {
    const uint8_t* qs;
    float scale, minimum;
    if constexpr (kWeight == DType::kQ4_0) {
      const auto* block = reinterpret_cast<const BlockQ4_0*>(weight_row) + b;
      scale = _cvtsh_ss(block->d);
      minimum = -8.0f * scale;
      qs = block->qs;
    } else {
      const auto* block = reinterpret_cast<const BlockQ4_1*>(weight_row) + b;
      scale = _cvtsh_ss(block->d);
      minimum = _cvtsh_ss(block->m);
      qs = block->qs;
    }
    const __m256i low_mask = _mm256_set1_epi32(0x0f);
    const __m256 d = _mm256_set1_ps(scale), m = _mm256_set1_ps(minimum);
    const __m256i bytes0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
    const __m256i bytes1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8)));
    out[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes0, low_mask)), d, m);  // items 0-7
    out[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes1, low_mask)), d, m);  // 8-15
    out[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes0, 4)), d, m);        // 16-23
    out[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes1, 4)), d, m);        // 24-31
  }
}

template <DType kWeight>
LSERVE_AVX2 void dequantize_avx2(const uint8_t* weight_row, float* out, int64_t num_blocks) {
  for (int64_t b = 0; b < num_blocks; ++b, out += kQuantBlock) {
    __m256 v[4];
    dequantize_block<kWeight>(weight_row, b, v);
    for (int s = 0; s < 4; ++s) _mm256_storeu_ps(out + 8 * s, v[s]);
  }
}

// One token x kRowFeatures features, weights dequantised in registers: acc[j] lane l += w * x over
// k = l, l + 8, ... in order, the sequence of tile_avx2's accumulators.
template <DType kWeight>
LSERVE_AVX2 void row_avx2(const uint8_t* const* weight_rows, const float* x, int64_t num_blocks, const float* bias,
                          float* out) {
  __m256 acc[kRowFeatures];
  for (int j = 0; j < kRowFeatures; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    for (int j = 0; j < kRowFeatures; ++j) {
      __m256 w[4];
      dequantize_block<kWeight>(weight_rows[j], b, w);
      for (int s = 0; s < 4; ++s) acc[j] = _mm256_fmadd_ps(w[s], _mm256_loadu_ps(x + b * kQuantBlock + 8 * s), acc[j]);
    }
  }
  for (int j = 0; j < kRowFeatures; ++j) out[j] = hsum(acc[j]) + (bias ? bias[j] : 0.0f);
}

// acc[i][j] lane l += panel[j][k + l] * x[i][k + l] for k = 0, 8, ...: the same FMA chain per
// accumulator for any kMt.
template <int kMt>
LSERVE_AVX2_INLINE void tile_avx2(const float* const* panel, const float* const* x_rows, int64_t in_features,
                                  const float* bias, float* const* out_rows) {
  __m256 acc[kMt][kTileFeatures];
  for (int i = 0; i < kMt; ++i) {
    for (int j = 0; j < kTileFeatures; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < in_features; k += kLanes) {
    __m256 w[kTileFeatures];
    for (int j = 0; j < kTileFeatures; ++j) w[j] = _mm256_loadu_ps(panel[j] + k);
    for (int i = 0; i < kMt; ++i) {
      const __m256 x = _mm256_loadu_ps(x_rows[i] + k);
      for (int j = 0; j < kTileFeatures; ++j) acc[i][j] = _mm256_fmadd_ps(w[j], x, acc[i][j]);
    }
  }
  for (int i = 0; i < kMt; ++i) {
    for (int j = 0; j < kTileFeatures; ++j) out_rows[i][j] = hsum(acc[i][j]) + (bias ? bias[j] : 0.0f);
  }
}

struct Avx2Kernels {
  LSERVE_AVX2 static void dequantize(DType dtype, const uint8_t* weight_row, float* out, int64_t in_features) {
    const int64_t num_blocks = in_features / kQuantBlock;
    switch (dtype) {
      case DType::kQ8_0: dequantize_avx2<DType::kQ8_0>(weight_row, out, num_blocks); return;
      case DType::kQ4_0: dequantize_avx2<DType::kQ4_0>(weight_row, out, num_blocks); return;
      default: dequantize_avx2<DType::kQ4_1>(weight_row, out, num_blocks); return;
    }
  }
  template <int kMt>
  LSERVE_AVX2 static void tile(const float* const* panel, const float* const* x_rows, int64_t in_features,
                               const float* bias, float* const* out_rows) {
    tile_avx2<kMt>(panel, x_rows, in_features, bias, out_rows);
  }
  LSERVE_AVX2 static void row(DType dtype, const uint8_t* const* weight_rows, const float* x, int64_t in_features,
                              const float* bias, float* out, float*) {
    const int64_t num_blocks = in_features / kQuantBlock;
    switch (dtype) {
      case DType::kQ8_0: row_avx2<DType::kQ8_0>(weight_rows, x, num_blocks, bias, out); return;
      case DType::kQ4_0: row_avx2<DType::kQ4_0>(weight_rows, x, num_blocks, bias, out); return;
      default: row_avx2<DType::kQ4_1>(weight_rows, x, num_blocks, bias, out); return;
    }
  }
};
#endif  // LSERVE_CPU_X86

// ---- driver ----------------------------------------------------------------------------------

// A tile of num_tokens (1 to kTileTokens) rows: its instantiation runs the same per-accumulator
// sequence as every other height.
template <typename Kernels, int kMt = kTileTokens>
void run_tile(int num_tokens, const float* const* panel, const float* const* x_rows, int64_t in_features,
              const float* bias, float* const* out_rows) {
  if constexpr (kMt > 1) {
    if (num_tokens < kMt) {
      run_tile<Kernels, kMt - 1>(num_tokens, panel, x_rows, in_features, bias, out_rows);
      return;
    }
  }
  Kernels::template tile<kMt>(panel, x_rows, in_features, bias, out_rows);
}

// Same chunking as below, over groups of kRowFeatures features.
template <typename Kernels>
void gemv_quant(const CpuContext& context, const GemmArgs& args) {
  const DType dtype = args.weight.dtype;
  const int64_t in_features = args.input.size(1), out_features = args.weight.size(0);
  const size_t row_bytes = dtype_nbytes(dtype, in_features);
  const auto* weight = static_cast<const uint8_t*>(args.weight.data);
  const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;
  const float* x = row_ptr<const float>(args.input, 0);
  float* output = row_ptr<float>(args.output, 0);
  const int num_threads = context.pool->num_threads();
  constexpr int64_t kMinChunkMacs = 1 << 17;
  const int64_t num_groups = (out_features + kRowFeatures - 1) / kRowFeatures;
  const int64_t chunks_per_thread =
      std::clamp<int64_t>(out_features * in_features / (kMinChunkMacs * num_threads), 1, 8);
  const int64_t num_chunks = chunks_per_thread * num_threads;
  const int64_t grain = std::max<int64_t>(1, (num_groups + num_chunks - 1) / num_chunks);
  context.pool->parallel_for(0, num_groups, grain, [&](int64_t group_begin, int64_t group_end, int) {
    std::vector<float> scratch(static_cast<size_t>(in_features));  // the generic kernel's dequantised row
    for (int64_t group = group_begin; group < group_end; ++group) {
      const int64_t n0 = group * kRowFeatures;
      const int num_features = static_cast<int>(std::min<int64_t>(kRowFeatures, out_features - n0));
      const uint8_t* weight_rows[kRowFeatures];
      float group_bias[kRowFeatures];
      for (int j = 0; j < kRowFeatures; ++j) {  // a missing feature repeats the group's first
        const int64_t n = n0 + (j < num_features ? j : 0);
        weight_rows[j] = weight + n * row_bytes;
        group_bias[j] = bias ? bias[n] : 0.0f;
      }
      float out[kRowFeatures];
      Kernels::row(dtype, weight_rows, x, in_features, bias ? group_bias : nullptr, out, scratch.data());
      std::copy(out, out + num_features, output + n0);
    }
  });
}

template <typename Kernels>
void gemm_quant_with(const CpuContext& context, const GemmArgs& args) {
  const DType dtype = args.weight.dtype;
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  const size_t row_bytes = dtype_nbytes(dtype, in_features);
  const auto* weight = static_cast<const uint8_t*>(args.weight.data);  // (out_features, num_blocks) blocks
  const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;  // (out_features,)
  const int num_threads = context.pool->num_threads();
  if (num_tokens == 1) {
    gemv_quant<Kernels>(context, args);
    return;
  }

  // Tasks: groups of kTileFeatures features in equal chunks, 1 to 8 per thread, each of at least
  // kMinChunkMacs multiply-adds (waking a worker costs tens of microseconds on a busy host); equal
  // chunks keep a 2-core decode GEMV of 576 features from running 3 chunks on 2 threads.
  constexpr int64_t kMinChunkMacs = 1 << 17;
  const int64_t num_groups = (out_features + kTileFeatures - 1) / kTileFeatures;
  const int64_t group_macs = std::max<int64_t>(1, num_tokens * kTileFeatures * in_features);
  const int64_t chunks_per_thread = std::clamp<int64_t>(num_groups * group_macs / (kMinChunkMacs * num_threads), 1, 8);
  const int64_t num_chunks = chunks_per_thread * num_threads;
  const int64_t grain = std::max<int64_t>(1, (num_groups + num_chunks - 1) / num_chunks);
  context.pool->parallel_for(0, num_groups, grain, [&](int64_t group_begin, int64_t group_end, int) {
    AlignedBuffer<float> panel_buffer(static_cast<size_t>(kTileFeatures * in_features));
    float scratch[kTileTokens][kTileFeatures];  // outputs of a leftover group's missing features
    for (int64_t m_block = 0; m_block < num_tokens; m_block += kTokenBlock) {
      const int64_t m_block_end = std::min(num_tokens, m_block + kTokenBlock);
      for (int64_t group = group_begin; group < group_end; ++group) {
        const int64_t n0 = group * kTileFeatures;
        const int num_features = static_cast<int>(std::min<int64_t>(kTileFeatures, out_features - n0));
        const float* panel[kTileFeatures];
        for (int j = 0; j < kTileFeatures; ++j) {
          panel[j] = panel_buffer.data() + j * in_features;
          // a missing feature repeats the group's first; its outputs go to scratch
          const int64_t n = n0 + (j < num_features ? j : 0);
          Kernels::dequantize(dtype, weight + n * row_bytes, panel_buffer.data() + j * in_features, in_features);
        }
        float group_bias[kTileFeatures];
        for (int j = 0; j < kTileFeatures; ++j) group_bias[j] = bias ? bias[n0 + (j < num_features ? j : 0)] : 0.0f;
        for (int64_t m0 = m_block; m0 < m_block_end; m0 += kTileTokens) {
          const int num_tile_tokens = static_cast<int>(std::min<int64_t>(kTileTokens, m_block_end - m0));
          const float* x_rows[kTileTokens];
          float* out_rows[kTileTokens];
          for (int i = 0; i < num_tile_tokens; ++i) {
            x_rows[i] = row_ptr<const float>(args.input, m0 + i);
            out_rows[i] = num_features == kTileFeatures ? row_ptr<float>(args.output, m0 + i) + n0 : scratch[i];
          }
          run_tile<Kernels>(num_tile_tokens, panel, x_rows, in_features, bias ? group_bias : nullptr, out_rows);
          if (num_features != kTileFeatures) {
            for (int i = 0; i < num_tile_tokens; ++i) {
              std::copy(scratch[i], scratch[i] + num_features, row_ptr<float>(args.output, m0 + i) + n0);
            }
          }
        }
      }
    }
  });
}

template <typename Kernels>
void gemm_quant_dispatch(const CpuContext& context, const GemmArgs& args) {
  switch (args.weight.dtype) {
    case DType::kQ8_0:
    case DType::kQ4_0:
    case DType::kQ4_1: gemm_quant_with<Kernels>(context, args); return;
    default: LSERVE_THROW("gemm_quant: ", dtype_name(args.weight.dtype), " is not a block format");
  }
}

}  // namespace

void gemm_quant(const CpuContext& context, const GemmArgs& args) {
#ifdef LSERVE_CPU_X86
  if (context.has_avx2_fma) {
    gemm_quant_dispatch<Avx2Kernels>(context, args);
    return;
  }
#endif
  gemm_quant_dispatch<GenericKernels>(context, args);
}

}  // namespace lserve::cpu
