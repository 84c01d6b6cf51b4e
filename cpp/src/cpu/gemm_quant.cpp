// CPU GEMM with block-format weights (Q8_0, Q4_0, Q4_1; lserve/tensor.h): output (num_tokens,
// out_features) = input (num_tokens, in_features) f32 @ dequant(weight)^T (+ bias), the weight read
// as stored. Each input row is first quantised to ActBlocks (8-bit, 32 items, one fp32 scale; see
// quant.h); then per (token, output feature, block) an integer dot product of 32 int8 x {u4, s8}
// pairs (_mm256_maddubs_epi16 + _mm256_madd_epi16) is scaled by d_w * d_x and accumulated in fp32,
// plus m_w * s_x for the minimum (Q4_0 is Q4_1 with m = -8 d). This is how ggml multiplies these
// formats (ggml-cpu vec_dot_q4_1_q8_1); the code here is our own.
//
// Batch invariance: every (token, feature) result is computed by the same sequence of operations
// on its own accumulator, whatever the tile it falls in, the number of tokens, or the thread that
// runs it: tiles only share loads. So row i of an M-row call equals the 1-row call on row i bit for
// bit (tests/ops/test_gemm_quant.py checks it).
//
// Floor (decode, 1 token): the weight bytes, 20 B per 32 Q4_1 items: SmolLM2-135M's 30 layers are
// 66 MB and its Q8_0 lm_head 30 MB per token; at the ~10-20 GB/s of a 2-core VM that is 5-10 ms.
// Compute per (token, feature, block): 5 vector ops (maddubs, madd, cvt, fma, add) and two scalar
// products on the 2 FMA ports.
#include <algorithm>
#include <cmath>

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

// Register tile: kTileTokens x kTileFeatures accumulators (8 ymm), the features' unpacked weight
// blocks (2), the token's block and temporaries: at most AVX2's 16 (see tile_avx2).
constexpr int kTileTokens = 4;
constexpr int kTileFeatures = 2;
// Tokens per pass over a thread's features: their ActBlocks (64 x in_features x 40/32 B, 120 KiB
// at 1536 inputs) stay in L2 while the features' weights stream past.
constexpr int64_t kTokenBlock = 64;

// ---- activation quantisation ----------------------------------------------------------------

void quantize_row_generic(const float* x, ActBlock* out, int64_t num_blocks) {
  for (int64_t b = 0; b < num_blocks; ++b, x += kQuantBlock) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int q = static_cast<int>(std::nearbyint(x[i] * inverse));  // round half to even
      out[b].qs[i] = static_cast<int8_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

// ---- portable kernel -------------------------------------------------------------------------

template <DType kWeight>
float dot_generic(const uint8_t* weight_row, const ActBlock* x, int64_t num_blocks) {
  float acc = 0.0f, acc_min = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    int isum = 0;
    float d, m = 0.0f;
    if constexpr (kWeight == DType::kQ8_0) {
      const auto* block = reinterpret_cast<const BlockQ8_0*>(weight_row) + b;
      d = half_to_float(block->d);
      for (int i = 0; i < 32; ++i) isum += block->qs[i] * x[b].qs[i];
    } else {
      const uint8_t* qs;
      if constexpr (kWeight == DType::kQ4_0) {
        const auto* block = reinterpret_cast<const BlockQ4_0*>(weight_row) + b;
        d = half_to_float(block->d);
        m = -8.0f * d;
        qs = block->qs;
      } else {
        const auto* block = reinterpret_cast<const BlockQ4_1*>(weight_row) + b;
        d = half_to_float(block->d);
        m = half_to_float(block->m);
        qs = block->qs;
      }
      for (int i = 0; i < 16; ++i) isum += (qs[i] & 0x0f) * x[b].qs[i] + (qs[i] >> 4) * x[b].qs[i + 16];
    }
    acc += (d * x[b].d) * static_cast<float>(isum);
    acc_min += m * x[b].s;
  }
  return acc + acc_min;
}

struct GenericKernels {
  static void quantize_row(const float* x, ActBlock* out, int64_t num_blocks) {
    quantize_row_generic(x, out, num_blocks);
  }
  template <DType kWeight>
  static void tile(int num_tokens, int num_features, const uint8_t* const* weight_rows, const ActBlock* const* x_rows,
                   int64_t num_blocks, const float* bias, float* const* out_rows) {
    for (int i = 0; i < num_tokens; ++i) {
      for (int j = 0; j < num_features; ++j) {
        out_rows[i][j] = dot_generic<kWeight>(weight_rows[j], x_rows[i], num_blocks) + (bias ? bias[j] : 0.0f);
      }
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

// The same values as quantize_row_generic: max|x| and the products x / d are computed alike, and
// _mm256_cvtps_epi32 rounds half to even as nearbyint does in the default rounding mode.
LSERVE_AVX2 void quantize_row_avx2(const float* x, ActBlock* out, int64_t num_blocks) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < num_blocks; ++b, x += kQuantBlock) {
    __m256 v[4];
    __m256 amax8 = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(x + 8 * k);
      amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign_bit, v[k]));
    }
    __m128 amax4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    amax4 = _mm_max_ps(amax4, _mm_movehl_ps(amax4, amax4));
    amax4 = _mm_max_ss(amax4, _mm_movehdup_ps(amax4));
    const float d = _mm_cvtss_f32(amax4) / 127.0f;
    const __m256 inverse = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inverse));
    const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4e));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xb1));
    // packs interleave the 128-bit lanes: 4-byte groups come out as q0[0:4] q1[0:4] q2[0:4] q3[0:4]
    // q0[4:8] ...; the permutation restores item order.
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].qs), _mm256_permutevar8x32_epi32(packed, order));
    out[b].d = d;
    out[b].s = d * static_cast<float>(_mm_cvtsi128_si32(sum4));
  }
}

// One weight block, unpacked: items as bytes (unsigned nibbles for Q4_x, signed for Q8_0), scale
// and minimum as floats.
struct UnpackedBlock {
  __m256i items;
  float scale;
  float minimum;
};

template <DType kWeight>
LSERVE_AVX2_INLINE UnpackedBlock unpack_block(const uint8_t* weight_row, int64_t b) {
  UnpackedBlock out;
  if constexpr (kWeight == DType::kQ8_0) {
    const auto* block = reinterpret_cast<const BlockQ8_0*>(weight_row) + b;
    out.items = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block->qs));
    out.scale = _cvtsh_ss(block->d);
    out.minimum = 0.0f;
  } else {
    const uint8_t* qs;
    if constexpr (kWeight == DType::kQ4_0) {
      const auto* block = reinterpret_cast<const BlockQ4_0*>(weight_row) + b;
      out.scale = _cvtsh_ss(block->d);
      out.minimum = -8.0f * out.scale;
      qs = block->qs;
    } else {
      const auto* block = reinterpret_cast<const BlockQ4_1*>(weight_row) + b;
      out.scale = _cvtsh_ss(block->d);
      out.minimum = _cvtsh_ss(block->m);
      qs = block->qs;
    }
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1);
    out.items = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));  // low nibbles: items 0-15, high: 16-31
  }
  return out;
}

// sum over the 32 items of w * x, as 8 int32 lanes of 4 items each.
template <DType kWeight>
LSERVE_AVX2_INLINE __m256i block_dot(__m256i weight_items, __m256i x_items) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i pairs;
  if constexpr (kWeight == DType::kQ8_0) {
    // maddubs takes unsigned x signed bytes: |w| times x carrying w's sign. |w| <= 128 and
    // |x| <= 127, so a pair sums to at most 32512 and the int16 never saturates.
    pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(weight_items, weight_items), _mm256_sign_epi8(x_items, weight_items));
  } else {
    pairs = _mm256_maddubs_epi16(weight_items, x_items);  // nibbles <= 15: pairs <= 3810
  }
  return _mm256_madd_epi16(pairs, ones);
}

// Per (token i, feature j) and block: t = (d_w d_x) * dot + m_w * s_x / 8 in each of the 8 lanes
// (so the final lane sum adds m_w * s_x once; / 8 is exact), then acc += t: one add on the
// accumulator's dependency chain per block, so even a 1 x 2 tile keeps the FMA ports busy.
// Registers of the 4 x 2 tile: 8 accumulators, 2 weight blocks, 1 token block, temporaries.
template <DType kWeight, int kMt, int kNt>
LSERVE_AVX2_INLINE void tile_avx2(const uint8_t* const* weight_rows, const ActBlock* const* x_rows, int64_t num_blocks,
                                  const float* bias, float* const* out_rows) {
  __m256 acc[kMt][kNt];
  for (int i = 0; i < kMt; ++i) {
    for (int j = 0; j < kNt; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < num_blocks; ++b) {
    UnpackedBlock w[kNt];
    for (int j = 0; j < kNt; ++j) w[j] = unpack_block<kWeight>(weight_rows[j], b);
    for (int i = 0; i < kMt; ++i) {
      const ActBlock& xb = x_rows[i][b];
      const __m256i x_items = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.qs));
      const float x_sum_eighth = xb.s * 0.125f;
      for (int j = 0; j < kNt; ++j) {
        const __m256 dot = _mm256_cvtepi32_ps(block_dot<kWeight>(w[j].items, x_items));
        const __m256 scale = _mm256_set1_ps(w[j].scale * xb.d);
        __m256 term;
        if constexpr (kWeight == DType::kQ8_0) {
          term = _mm256_mul_ps(scale, dot);
        } else {
          term = _mm256_fmadd_ps(scale, dot, _mm256_set1_ps(w[j].minimum * x_sum_eighth));
        }
        acc[i][j] = _mm256_add_ps(acc[i][j], term);
      }
    }
  }
  for (int i = 0; i < kMt; ++i) {
    for (int j = 0; j < kNt; ++j) out_rows[i][j] = hsum(acc[i][j]) + (bias ? bias[j] : 0.0f);
  }
}

struct Avx2Kernels {
  LSERVE_AVX2 static void quantize_row(const float* x, ActBlock* out, int64_t num_blocks) {
    quantize_row_avx2(x, out, num_blocks);
  }
  // Dispatches a (num_tokens <= kTileTokens) x (num_features <= kTileFeatures) tile to its
  // instantiation; every one runs the same per-element sequence.
  template <DType kWeight>
  LSERVE_AVX2 static void tile(int num_tokens, int num_features, const uint8_t* const* weight_rows,
                               const ActBlock* const* x_rows, int64_t num_blocks, const float* bias,
                               float* const* out_rows) {
    static_assert(kTileTokens == 4 && kTileFeatures == 2, "the switch below lists the tile shapes");
    switch (num_tokens * 2 + num_features - 1) {  // (tokens, features) as one case label
      case 4 * 2 + 1: tile_avx2<kWeight, 4, 2>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
      case 3 * 2 + 1: tile_avx2<kWeight, 3, 2>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
      case 2 * 2 + 1: tile_avx2<kWeight, 2, 2>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
      case 1 * 2 + 1: tile_avx2<kWeight, 1, 2>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
      case 4 * 2: tile_avx2<kWeight, 4, 1>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
      case 3 * 2: tile_avx2<kWeight, 3, 1>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
      case 2 * 2: tile_avx2<kWeight, 2, 1>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
      default: tile_avx2<kWeight, 1, 1>(weight_rows, x_rows, num_blocks, bias, out_rows); return;
    }
  }
};
#endif  // LSERVE_CPU_X86

// ---- driver ----------------------------------------------------------------------------------

template <typename Kernels, DType kWeight>
void gemm_quant_with(const CpuContext& context, const GemmArgs& args) {
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  const int64_t num_blocks = in_features / kQuantBlock;
  const size_t row_bytes = dtype_nbytes(kWeight, in_features);
  const auto* weight = static_cast<const uint8_t*>(args.weight.data);  // (out_features, num_blocks) blocks
  const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;  // (out_features,)
  const int num_threads = context.pool->num_threads();

  AlignedBuffer<ActBlock> activations(static_cast<size_t>(num_tokens * num_blocks));  // (num_tokens, num_blocks)
  context.pool->parallel_for(0, num_tokens, std::max<int64_t>(1, 8192 / in_features), [&](int64_t begin,
                                                                                         int64_t end, int) {
    for (int64_t m = begin; m < end; ++m) {
      Kernels::quantize_row(row_ptr<const float>(args.input, m), activations.data() + m * num_blocks, num_blocks);
    }
  });

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
    for (int64_t m_block = 0; m_block < num_tokens; m_block += kTokenBlock) {
      const int64_t m_block_end = std::min(num_tokens, m_block + kTokenBlock);
      for (int64_t group = group_begin; group < group_end; ++group) {
        const int64_t n0 = group * kTileFeatures;
        const int num_features = static_cast<int>(std::min<int64_t>(kTileFeatures, out_features - n0));
        const uint8_t* weight_rows[kTileFeatures];
        for (int j = 0; j < num_features; ++j) weight_rows[j] = weight + (n0 + j) * row_bytes;
        for (int64_t m0 = m_block; m0 < m_block_end; m0 += kTileTokens) {
          const int num_tile_tokens = static_cast<int>(std::min<int64_t>(kTileTokens, m_block_end - m0));
          const ActBlock* x_rows[kTileTokens];
          float* out_rows[kTileTokens];
          for (int i = 0; i < num_tile_tokens; ++i) {
            x_rows[i] = activations.data() + (m0 + i) * num_blocks;
            out_rows[i] = row_ptr<float>(args.output, m0 + i) + n0;
          }
          Kernels::template tile<kWeight>(num_tile_tokens, num_features, weight_rows, x_rows, num_blocks,
                                          bias ? bias + n0 : nullptr, out_rows);
        }
      }
    }
  });
}

template <typename Kernels>
void gemm_quant_dispatch(const CpuContext& context, const GemmArgs& args) {
  switch (args.weight.dtype) {
    case DType::kQ8_0: gemm_quant_with<Kernels, DType::kQ8_0>(context, args); return;
    case DType::kQ4_0: gemm_quant_with<Kernels, DType::kQ4_0>(context, args); return;
    case DType::kQ4_1: gemm_quant_with<Kernels, DType::kQ4_1>(context, args); return;
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
