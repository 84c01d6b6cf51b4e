// CPU GEMM with block-format weights (Q8_0, Q4_0, Q4_1; lserve/tensor.h): output (num_tokens,
// out_features) = input (num_tokens, in_features) f32 @ dequant(weight)^T (+ bias), the weight read
// as stored. Each input row is first quantised to ActBlocks (8-bit, 32 items, one fp32 scale d_x
// and s_x = d_x * sum(q); quant.h), as ggml does for these formats; then per (token, output
// feature, weight block) an exact integer dot product of 32 {u4, s8} x s8 pairs is scaled in fp32:
//   acc = fma(float(isum), d_w * d_x, acc);  acc = fma(m_w, s_x, acc)   (Q4_1; Q4_0 is m_w = -8 d_w,
//   Q8_0 has no minimum term), and finally out = acc + bias.
// AVX2 layout: eight features at once, one fp32 lane each. A block's 16 nibble bytes of 8 rows are
// transposed in registers (dword g of row j -> lane j of register g), so one maddubs multiplies
// 4 items of all 8 features with the token's 4 matching activation bytes (broadcast); 8 maddubs
// (int16 sums <= 8 * 2 * 15 * 127 = 30480, no overflow) and one madd give the 8 block sums, and
// the 8 scales come in as one f16 vector. The transposed weights are reused by up to kTileTokens
// tokens. The technique is ggml's (quantise activations, maddubs dot products); the code is ours.
//
// Batch invariance: each (token, feature) result is the same sequence of operations on its own
// lane (integer sums are exact; the fp32 steps above run in block order), whatever the tile, the
// number of tokens or the thread. So row i of an M-row call equals the 1-row call on row i bit for
// bit, and the portable kernel (std::fma) gives the same bits as the AVX2 one
// (tests/ops/test_gemm_quant.py checks both).
//
// Floor (decode, 1 token): the weight bytes, 20 B per 32 Q4_1 items: SmolLM2-135M's 30 layers are
// 66 MB and its Q8_0 lm_head 30 MB per token. Compute per 8 features x 1 block x 1 token (Q4): about
// 20 vector ops to transpose and split the nibbles (shared by the tile's tokens) and 24 per token
// (8 broadcasts, 8 maddubs, 7 adds, madd, convert, scale, 2 FMAs), i.e. 3 to 5.5 ops per 32 MACs,
// where the former fp32-activation kernel (weights dequantised to fp32 in registers) spent ~20.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "convert.h"
#include "cpu_backend.h"
#include "quant.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LSERVE_CPU_X86 1
#endif

namespace lserve::cpu {

namespace {

// Features per task unit: one fp32 lane each in the AVX2 kernel.
constexpr int kGroupFeatures = 8;
// Tokens sharing one transposed weight block: kTileTokens accumulators plus the 8 unpacked nibble
// registers, 2 scale vectors and temporaries fill AVX2's 16 registers.
constexpr int kTileTokens = 4;
// Tokens per pass over a chunk of features: their ActBlocks (64 x 48 x 40 B = 120 KiB at 1536
// inputs) stay in L2 while the features' weights stream past.
constexpr int64_t kTokenBlock = 64;

// Decode streams the weights from memory once; 8 rows read in step are 8 short streams, which the
// hardware prefetchers followed at ~55 % of the read bandwidth on the 2-core VM (6.3 vs 11.4 GB/s,
// 2026-12-05). So each block step also prefetches its share of the rows kPrefetchGroups groups
// ahead (8 consecutive rows are one contiguous range).
constexpr int64_t kCacheLine = 64;
constexpr int64_t kPrefetchGroups = 2;
struct Prefetch {
  const uint8_t* next = nullptr;  // first byte of the rows to prefetch
  int64_t lines_per_block = 0;    // cache lines to prefetch per block step
};

template <DType kWeight>
struct BlockLayout;
template <>
struct BlockLayout<DType::kQ8_0> {
  static constexpr int64_t kBytes = sizeof(BlockQ8_0);
  static constexpr int64_t kItems = offsetof(BlockQ8_0, qs);
  static constexpr bool kHasMin = false;
};
template <>
struct BlockLayout<DType::kQ4_0> {
  static constexpr int64_t kBytes = sizeof(BlockQ4_0);
  static constexpr int64_t kItems = offsetof(BlockQ4_0, qs);
  static constexpr bool kHasMin = true;  // m = -8 d
};
template <>
struct BlockLayout<DType::kQ4_1> {
  static constexpr int64_t kBytes = sizeof(BlockQ4_1);
  static constexpr int64_t kItems = offsetof(BlockQ4_1, qs);
  static constexpr bool kHasMin = true;
};

inline uint16_t load_u16(const uint8_t* src) {
  uint16_t value;
  std::memcpy(&value, src, sizeof(value));
  return value;
}

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

// The per-lane sequence of the AVX2 kernel (see the header), one (token, feature) at a time.
template <DType kWeight>
float dot_generic(const uint8_t* weight_row, const ActBlock* x, int64_t num_blocks, float bias) {
  using Layout = BlockLayout<kWeight>;
  float acc = 0.0f;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* block = weight_row + b * Layout::kBytes;
    const uint8_t* items = block + Layout::kItems;
    const float d = half_to_float(load_u16(block));
    int isum = 0;
    if constexpr (kWeight == DType::kQ8_0) {
      for (int i = 0; i < 32; ++i) isum += static_cast<int8_t>(items[i]) * x[b].qs[i];
    } else {
      for (int i = 0; i < 16; ++i) isum += (items[i] & 0x0f) * x[b].qs[i] + (items[i] >> 4) * x[b].qs[i + 16];
    }
    acc = std::fma(static_cast<float>(isum), d * x[b].d, acc);
    if constexpr (kWeight == DType::kQ4_0) acc = std::fma(-8.0f * d, x[b].s, acc);
    if constexpr (kWeight == DType::kQ4_1) acc = std::fma(half_to_float(load_u16(block + 2)), x[b].s, acc);
  }
  return acc + bias;
}

struct GenericKernels {
  static void quantize_row(const float* x, ActBlock* out, int64_t num_blocks) {
    quantize_row_generic(x, out, num_blocks);
  }
  template <DType kWeight>
  static void tile(int num_tokens, const uint8_t* const* weight_rows, const ActBlock* const* x_rows,
                   int64_t num_blocks, const float* bias, const Prefetch&, float (*out)[kGroupFeatures]) {
    for (int i = 0; i < num_tokens; ++i) {
      for (int j = 0; j < kGroupFeatures; ++j) {
        out[i][j] = dot_generic<kWeight>(weight_rows[j], x_rows[i], num_blocks, bias ? bias[j] : 0.0f);
      }
    }
  }
};

// ---- AVX2 kernels ----------------------------------------------------------------------------

#ifdef LSERVE_CPU_X86
#define LSERVE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LSERVE_AVX2_INLINE LSERVE_AVX2 inline __attribute__((always_inline))

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

// 16 bytes at offset `offset` of block b of the 8 rows, transposed: register g, lane j = dword g of
// row j (bytes 4g..4g+3).
LSERVE_AVX2_INLINE __m256i load_row_pair(const uint8_t* low_row, const uint8_t* high_row) {
  const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(low_row));
  const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(high_row));
  return _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
}

LSERVE_AVX2_INLINE void transpose_rows(const uint8_t* const* block, int64_t offset, __m256i g[4]) {
  __m256i a[4];  // a[j]: rows j | j + 4
  for (int j = 0; j < 4; ++j) a[j] = load_row_pair(block[j] + offset, block[j + 4] + offset);
  const __m256i a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const __m256i lo01 = _mm256_unpacklo_epi32(a0, a1), lo23 = _mm256_unpacklo_epi32(a2, a3);  // dwords 0, 1
  const __m256i hi01 = _mm256_unpackhi_epi32(a0, a1), hi23 = _mm256_unpackhi_epi32(a2, a3);  // dwords 2, 3
  g[0] = _mm256_unpacklo_epi64(lo01, lo23);
  g[1] = _mm256_unpackhi_epi64(lo01, lo23);
  g[2] = _mm256_unpacklo_epi64(hi01, hi23);
  g[3] = _mm256_unpackhi_epi64(hi01, hi23);
}

// The block's first dword in the 8 rows (f16 d, then Q4_1's f16 m or item bytes), transposed as
// in transpose_rows: d and the second half as 8 floats each (one shuffle and one permute instead
// of 16 scalar inserts: ~12 % of a decode block step).
LSERVE_AVX2_INLINE void load_scales(const uint8_t* const* block, __m256& d, __m256& second) {
  __m256i a[4];
  for (int j = 0; j < 4; ++j) a[j] = load_row_pair(block[j], block[j + 4]);
  const __m256i dwords = _mm256_unpacklo_epi64(_mm256_unpacklo_epi32(a[0], a[1]), _mm256_unpacklo_epi32(a[2], a[3]));
  // per 128-bit lane: the low halves (d) of its 4 rows, then the high halves
  const __m256i split = _mm256_shuffle_epi8(
      dwords, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                               0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
  const __m256i halves = _mm256_permute4x64_epi64(split, 0xd8);  // d rows 0-3, 4-7 | second rows 0-3, 4-7
  d = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  second = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
}

LSERVE_AVX2_INLINE __m256i broadcast4(const int8_t* src) {
  int32_t value;
  std::memcpy(&value, src, sizeof(value));
  return _mm256_set1_epi32(value);
}

// kMt tokens x 8 features; out[i] = the 8 results of token i.
template <DType kWeight, int kMt>
LSERVE_AVX2_INLINE void tile_avx2(const uint8_t* const* weight_rows, const ActBlock* const* x_rows, int64_t num_blocks,
                                  const float* bias, const Prefetch& prefetch, float (*out)[kGroupFeatures]) {
  using Layout = BlockLayout<kWeight>;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kMt];
  for (int i = 0; i < kMt; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    for (int64_t line = b * prefetch.lines_per_block; line < (b + 1) * prefetch.lines_per_block; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(prefetch.next + line * kCacheLine), _MM_HINT_T0);
    }
    const uint8_t* block[kGroupFeatures];
    for (int j = 0; j < kGroupFeatures; ++j) block[j] = weight_rows[j] + b * Layout::kBytes;
    __m256 d, second;
    load_scales(block, d, second);
    if constexpr (kWeight == DType::kQ8_0) {
      __m256i w[8];  // w[t] lane j: items 4t..4t+3 of row j, signed
      transpose_rows(block, Layout::kItems, w);
      transpose_rows(block, Layout::kItems + 16, w + 4);
      __m256i magnitude[8];
      for (int t = 0; t < 8; ++t) magnitude[t] = _mm256_abs_epi8(w[t]);
      for (int i = 0; i < kMt; ++i) {
        const ActBlock& xb = x_rows[i][b];
        __m256i isum = _mm256_setzero_si256();
        for (int t = 0; t < 8; ++t) {
          // maddubs takes unsigned x signed bytes: |w| times x carrying w's sign. |w| <= 128 and
          // |x| <= 127: a pair sums to at most 32512, so int16 pairs are widened before adding.
          const __m256i pairs = _mm256_maddubs_epi16(magnitude[t], _mm256_sign_epi8(broadcast4(xb.qs + 4 * t), w[t]));
          isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, ones));
        }
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(xb.d)), acc[i]);
      }
    } else {
      const __m256 m = kWeight == DType::kQ4_0 ? _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)) : second;
      const __m256i mask = _mm256_set1_epi8(0x0f);
      __m256i g[4], low[4], high[4];  // low[g]: items 4g..4g+3, high[g]: items 16 + 4g..
      transpose_rows(block, Layout::kItems, g);
      for (int k = 0; k < 4; ++k) {
        low[k] = _mm256_and_si256(g[k], mask);
        high[k] = _mm256_and_si256(_mm256_srli_epi16(g[k], 4), mask);
      }
      for (int i = 0; i < kMt; ++i) {
        const ActBlock& xb = x_rows[i][b];
        __m256i pairs = _mm256_maddubs_epi16(low[0], broadcast4(xb.qs));
        for (int k = 1; k < 4; ++k) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(low[k], broadcast4(xb.qs + 4 * k)));
        for (int k = 0; k < 4; ++k) {
          pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(high[k], broadcast4(xb.qs + 16 + 4 * k)));
        }
        const __m256i isum = _mm256_madd_epi16(pairs, ones);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(xb.d)), acc[i]);
        acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(xb.s), acc[i]);
      }
    }
  }
  const __m256 bias8 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  for (int i = 0; i < kMt; ++i) _mm256_storeu_ps(out[i], _mm256_add_ps(acc[i], bias8));
}

struct Avx2Kernels {
  LSERVE_AVX2 static void quantize_row(const float* x, ActBlock* out, int64_t num_blocks) {
    quantize_row_avx2(x, out, num_blocks);
  }
  template <DType kWeight>
  LSERVE_AVX2 static void tile(int num_tokens, const uint8_t* const* weight_rows, const ActBlock* const* x_rows,
                               int64_t num_blocks, const float* bias, const Prefetch& prefetch,
                               float (*out)[kGroupFeatures]) {
    static_assert(kTileTokens == 4, "the switch below lists the tile heights");
    switch (num_tokens) {
      case 4: tile_avx2<kWeight, 4>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      case 3: tile_avx2<kWeight, 3>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      case 2: tile_avx2<kWeight, 2>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      default: tile_avx2<kWeight, 1>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
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

  // (num_tokens, num_blocks) activation blocks, in the calling thread's reusable buffer (no
  // allocation per decode step); small inputs are quantised here without waking the workers.
  thread_local std::vector<ActBlock> activation_buffer;
  if (activation_buffer.size() < static_cast<size_t>(num_tokens * num_blocks)) {
    activation_buffer.resize(static_cast<size_t>(num_tokens * num_blocks));
  }
  ActBlock* activations = activation_buffer.data();
  const auto quantize_rows = [&](int64_t begin, int64_t end, int) {
    for (int64_t m = begin; m < end; ++m) {
      Kernels::quantize_row(row_ptr<const float>(args.input, m), activations + m * num_blocks, num_blocks);
    }
  };
  constexpr int64_t kQuantizeInline = 1 << 15;  // items: ~10 us of work, below a worker's wake-up
  if (num_tokens * in_features <= kQuantizeInline) {
    quantize_rows(0, num_tokens, 0);
  } else {
    context.pool->parallel_for(0, num_tokens, std::max<int64_t>(1, kQuantizeInline / in_features), quantize_rows);
  }

  // Tasks: groups of kGroupFeatures features in equal chunks, 1 to 8 per thread, each of at least
  // kMinChunkMacs multiply-adds (waking a worker costs tens of microseconds on a busy host); equal
  // chunks keep a 2-core decode GEMV from running 3 chunks on 2 threads.
  constexpr int64_t kMinChunkMacs = 1 << 17;
  const int64_t num_groups = (out_features + kGroupFeatures - 1) / kGroupFeatures;
  const int64_t group_macs = std::max<int64_t>(1, num_tokens * kGroupFeatures * in_features);
  const int64_t chunks_per_thread = std::clamp<int64_t>(num_groups * group_macs / (kMinChunkMacs * num_threads), 1, 8);
  const int64_t num_chunks = chunks_per_thread * num_threads;
  const int64_t grain = std::max<int64_t>(1, (num_groups + num_chunks - 1) / num_chunks);
  context.pool->parallel_for(0, num_groups, grain, [&](int64_t group_begin, int64_t group_end, int) {
    for (int64_t m_block = 0; m_block < num_tokens; m_block += kTokenBlock) {
      const int64_t m_block_end = std::min(num_tokens, m_block + kTokenBlock);
      for (int64_t group = group_begin; group < group_end; ++group) {
        const int64_t n0 = group * kGroupFeatures;
        const int num_features = static_cast<int>(std::min<int64_t>(kGroupFeatures, out_features - n0));
        const uint8_t* weight_rows[kGroupFeatures];
        float group_bias[kGroupFeatures];
        for (int j = 0; j < kGroupFeatures; ++j) {  // a missing feature repeats the group's first
          const int64_t n = n0 + (j < num_features ? j : 0);
          weight_rows[j] = weight + n * row_bytes;
          group_bias[j] = bias ? bias[n] : 0.0f;
        }
        // Prefetch on a token block's first pass over the rows; the last groups have nothing ahead
        // (the rounded-up last line may pass the weight's end: prefetch hints do not fault).
        Prefetch prefetch;
        if (group + kPrefetchGroups < num_groups) {
          prefetch.next = weight + (group + kPrefetchGroups) * kGroupFeatures * row_bytes;
          const int64_t group_bytes = std::min<int64_t>(kGroupFeatures, out_features - (group + kPrefetchGroups) *
                                                                            kGroupFeatures) * row_bytes;
          prefetch.lines_per_block = (group_bytes + kCacheLine * num_blocks - 1) / (kCacheLine * num_blocks);
        }
        for (int64_t m0 = m_block; m0 < m_block_end; m0 += kTileTokens) {
          const int num_tile_tokens = static_cast<int>(std::min<int64_t>(kTileTokens, m_block_end - m0));
          const ActBlock* x_rows[kTileTokens];
          for (int i = 0; i < num_tile_tokens; ++i) x_rows[i] = activations + (m0 + i) * num_blocks;
          float out[kTileTokens][kGroupFeatures];
          Kernels::template tile<kWeight>(num_tile_tokens, weight_rows, x_rows, num_blocks,
                                          bias ? group_bias : nullptr, prefetch, out);
          prefetch.lines_per_block = 0;
          for (int i = 0; i < num_tile_tokens; ++i) {
            std::copy(out[i], out[i] + num_features, row_ptr<float>(args.output, m0 + i) + n0);
          }
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
