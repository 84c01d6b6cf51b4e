// CPU GEMM with block-format weights (Q8_0, Q4_0, Q4_1; lserve/tensor.h): output (num_tokens,
// out_features) = input (num_tokens, in_features) f32 @ dequant(weight)^T (+ bias), the weight read
// as stored or packed (below). Each input row is first quantised to ActBlocks (8-bit, 32 items, one fp32 scale d_x
// and s_x = d_x * sum(q); quant.h), as ggml does for these formats; then per (token, output
// feature, weight block) an exact integer dot product of 32 {u4, s8} x s8 pairs is scaled in fp32:
//   acc = fma(float(isum), d_w * d_x, acc);  acc = fma(m_w, s_x, acc)   (Q4_1; Q4_0 is m_w = -8 d_w,
//   Q8_0 has no minimum term), and finally out = acc + bias.
// AVX2 layout: eight features at once, one fp32 lane each. One maddubs multiplies 4 items of all 8
// features (register g, lane j = dword g of row j's item bytes) with the token's 4 matching
// activation bytes (broadcast); 8 maddubs (int16 sums <= 8 * 2 * 15 * 127 = 30480, no overflow) and
// one madd give the 8 block sums, and the 8 scales come in as one f16 vector. Weights arrive in that
// order one of two ways (GemmArgs::weight_layout): packed at load time (WeightLayout::kInterleaved8,
// Backend::pack_gemm_weight: per group of 8 rows and block, the 8 d, the 8 m (Q4_1), then the item
// dwords already in register order: a block is 5 or 6 plain loads and 2 conversions), or as stored
// (kRows: a block's 16 nibble bytes of 8 rows transposed in registers, ~20 vector ops). Either way
// the loaded block is reused by up to kTileTokens tokens. The technique is ggml's (quantise
// activations, maddubs dot products, weights repacked at load); the code is ours.
// AVX-512 (F+BW+VL; vpdpbusd with VNNI) does the same on 16 features per zmm register (see its
// section); packed, one register is two groups' 256-bit halves. The CpuContext's level picks the
// kernel (lserve/cpu_isa.h, LSERVE_CPU_ISA); the portable kernel unpacks a packed group's rows.
//
// Batch invariance: each (token, feature) result is the same sequence of operations on its own
// lane (integer sums are exact; the fp32 steps above run in block order), whatever the tile, the
// number of tokens or the thread. So row i of an M-row call equals the 1-row call on row i bit for
// bit, and the portable kernel (std::fma) gives the same bits as the AVX2 and AVX-512 ones
// (tests/ops/test_gemm_quant.py and test_cpu_isa.py check both).
//
// Floor (decode, 1 token): the weight bytes, 20 B per 32 Q4_1 items: SmolLM2-135M's 30 layers are
// 66 MB and its Q8_0 lm_head 30 MB per token. Compute per 8 features x 1 block x 1 token (Q4): the
// block's weights, shared by the tile's tokens (packed: 6 loads, 2 f16 conversions, 12 ops to split
// the nibbles; as stored about 20 more to transpose), and 24 per token (8 broadcasts, 8 maddubs,
// 7 adds, madd, convert, scale, 2 FMAs): per 32 MACs 5.5 ops packed and 8 as stored at M = 1, 3.6
// and 4.2 at M = 4, where the former fp32-activation kernel (weights dequantised to fp32 in
// registers) spent ~20. Measured 2026-12-05 on the 2-core EPYC VM (M = 1, 3072 x 576 Q4_1, L3-resident
// in the loop): 107 us as stored, 67 us packed.
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

// Each Kernels struct below sets its tile: kGroupFeatures features per task unit (one fp32 lane
// each) and up to kTileTokens tokens sharing one transposed weight block.
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
// kBytes, kItems: a block as stored (kItems: offset of its item bytes, after d and m). Packed
// (WeightLayout::kInterleaved8): kPackedItems, the offset of the item bytes in a group's block.
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
template <DType kWeight>
constexpr int64_t kPackedItems = kPackRows * BlockLayout<kWeight>::kItems;

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

// Row `row` (< kPackRows) of a packed group (WeightLayout::kInterleaved8) back in the stored layout.
template <DType kWeight>
void unpack_row(const uint8_t* group, int row, int64_t num_blocks, uint8_t* out) {
  using Layout = BlockLayout<kWeight>;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* src = group + b * kPackRows * Layout::kBytes;
    uint8_t* dst = out + b * Layout::kBytes;
    for (int64_t half = 0; half < Layout::kItems / 2; ++half) {  // d, then Q4_1's m
      std::memcpy(dst + 2 * half, src + half * 2 * kPackRows + 2 * row, 2);
    }
    for (int64_t dword = 0; dword < (Layout::kBytes - Layout::kItems) / 4; ++dword) {
      std::memcpy(dst + Layout::kItems + 4 * dword, src + kPackedItems<kWeight> + dword * 4 * kPackRows + 4 * row, 4);
    }
  }
}

struct GenericKernels {
  static constexpr int kGroupFeatures = 8;
  static constexpr int kTileTokens = 4;
  static void quantize_row(const float* x, ActBlock* out, int64_t num_blocks) {
    quantize_row_generic(x, out, num_blocks);
  }
  // kPacked: weight_rows[0] is the packed group, whose rows are first put back in the stored layout.
  template <DType kWeight, bool kPacked>
  static void tile(int num_tokens, const uint8_t* const* weight_rows, const ActBlock* const* x_rows,
                   int64_t num_blocks, const float* bias, const Prefetch&, float (*out)[kGroupFeatures]) {
    thread_local std::vector<uint8_t> unpacked;
    const uint8_t* rows[kGroupFeatures];
    if constexpr (kPacked) {
      const int64_t row_bytes = num_blocks * BlockLayout<kWeight>::kBytes;
      unpacked.resize(static_cast<size_t>(kGroupFeatures * row_bytes));
      for (int j = 0; j < kGroupFeatures; ++j) {
        unpack_row<kWeight>(weight_rows[0], j, num_blocks, unpacked.data() + j * row_bytes);
        rows[j] = unpacked.data() + j * row_bytes;
      }
    } else {
      std::copy(weight_rows, weight_rows + kGroupFeatures, rows);
    }
    for (int i = 0; i < num_tokens; ++i) {
      for (int j = 0; j < kGroupFeatures; ++j) {
        out[i][j] = dot_generic<kWeight>(rows[j], x_rows[i], num_blocks, bias ? bias[j] : 0.0f);
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

// Block b of the tile's 8 features: d, Q4_1's m (`second`; unused by the other formats) and the
// item dwords transposed as transpose_rows gives them (4 registers, Q8_0 8). Stored rows are
// transposed in registers (kPacked false: weight_rows are the 8 rows); a packed group
// (kPacked: weight_rows[0]) already holds them in that order: plain loads.
template <DType kWeight, bool kPacked>
LSERVE_AVX2_INLINE void load_block(const uint8_t* const* weight_rows, int64_t b, __m256& d, __m256& second,
                                   __m256i* items) {
  using Layout = BlockLayout<kWeight>;
  constexpr int kItemRegisters = (Layout::kBytes - Layout::kItems) / 4;  // item dwords
  if constexpr (kPacked) {
    const uint8_t* group = weight_rows[0] + b * kPackRows * Layout::kBytes;
    d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    if constexpr (kWeight == DType::kQ4_1) {
      second = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + 2 * kPackRows)));
    } else {
      second = d;  // unused
    }
    for (int k = 0; k < kItemRegisters; ++k) {
      items[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kPackedItems<kWeight> + 32 * k));
    }
  } else {
    const uint8_t* block[8];
    for (int j = 0; j < 8; ++j) block[j] = weight_rows[j] + b * Layout::kBytes;
    load_scales(block, d, second);
    for (int k = 0; k < kItemRegisters; k += 4) transpose_rows(block, Layout::kItems + 4 * k, items + k);
  }
}

LSERVE_AVX2_INLINE __m256i broadcast4(const int8_t* src) {
  int32_t value;
  std::memcpy(&value, src, sizeof(value));
  return _mm256_set1_epi32(value);
}

// kMt tokens x 8 features; out[i] = the 8 results of token i.
template <DType kWeight, bool kPacked, int kMt>
LSERVE_AVX2_INLINE void tile_avx2(const uint8_t* const* weight_rows, const ActBlock* const* x_rows, int64_t num_blocks,
                                  const float* bias, const Prefetch& prefetch, float (*out)[8]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kMt];
  for (int i = 0; i < kMt; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    for (int64_t line = b * prefetch.lines_per_block; line < (b + 1) * prefetch.lines_per_block; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(prefetch.next + line * kCacheLine), _MM_HINT_T0);
    }
    __m256 d, second;
    if constexpr (kWeight == DType::kQ8_0) {
      __m256i w[8];  // w[t] lane j: items 4t..4t+3 of row j, signed
      load_block<kWeight, kPacked>(weight_rows, b, d, second, w);
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
      __m256i g[4], low[4], high[4];  // low[g]: items 4g..4g+3, high[g]: items 16 + 4g..
      load_block<kWeight, kPacked>(weight_rows, b, d, second, g);
      const __m256 m = kWeight == DType::kQ4_0 ? _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)) : second;
      const __m256i mask = _mm256_set1_epi8(0x0f);
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
  static constexpr int kGroupFeatures = 8;
  // kTileTokens accumulators plus the 8 unpacked nibble registers, 2 scale vectors and temporaries
  // fill AVX2's 16 registers.
  static constexpr int kTileTokens = 4;
  LSERVE_AVX2 static void quantize_row(const float* x, ActBlock* out, int64_t num_blocks) {
    quantize_row_avx2(x, out, num_blocks);
  }
  template <DType kWeight, bool kPacked>
  LSERVE_AVX2 static void tile(int num_tokens, const uint8_t* const* weight_rows, const ActBlock* const* x_rows,
                               int64_t num_blocks, const float* bias, const Prefetch& prefetch,
                               float (*out)[kGroupFeatures]) {
    static_assert(kTileTokens == 4, "the switch below lists the tile heights");
    switch (num_tokens) {
      case 4: tile_avx2<kWeight, kPacked, 4>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      case 3: tile_avx2<kWeight, kPacked, 3>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      case 2: tile_avx2<kWeight, kPacked, 2>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      default: tile_avx2<kWeight, kPacked, 1>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
    }
  }
};
// ---- AVX-512 kernels -------------------------------------------------------------------------

// The AVX2 kernel at twice the width: 16 features, one fp32 lane each, so every (token, feature)
// runs the same sequence as in the portable kernel and the bits stay the same. The weights'
// 4-byte groups are transposed as in transpose_rows, 4 rows per register (one per 128-bit lane).
// Block sums: VNNI's vpdpbusd adds 4 unsigned x signed byte products to a dword lane without int16
// steps; without VNNI, maddubs + madd as in AVX2. Q8_0 has no unsigned side: with VNNI the
// activations are offset to x + 128 (x ^ 0x80 as a byte, 1..255) and 128 * sum(w) is subtracted
// (computed once per block for all of the tile's tokens); without VNNI, |w| times x carrying w's
// sign (masked negation: AVX-512 has no vpsignb).
// Register budget (32 zmm): 8 weight registers, d, m, kTileTokens fp32 accumulators and per token
// two integer chains plus broadcasts.
// GCC 12's AVX-512 intrinsics pass a self-initialised "undefined" vector as the unused merge source,
// which -Wmaybe-uninitialized reports at every inlined use (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define LSERVE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define LSERVE_AVX512_INLINE LSERVE_AVX512 inline __attribute__((always_inline))

constexpr int kAvx512Features = 16;

// acc + per dword lane the 4 products of u's unsigned bytes and s's signed bytes (vpdpbusd; exact,
// no saturation). Inline assembly rather than _mm512_dpbusd_epi32: GCC does not inline that
// intrinsic into a function compiled without avx512vnni, and one tile template serves both AVX-512
// kernels; only the VNNI one, which runs where the CPU has VNNI, instantiates this.
LSERVE_AVX512_INLINE __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// 16 bytes at each of 4 addresses, one per 128-bit lane.
LSERVE_AVX512_INLINE __m512i load_rows4(const uint8_t* r0, const uint8_t* r1, const uint8_t* r2, const uint8_t* r3) {
  __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1)), 1);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r2)), 2);
  return _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r3)), 3);
}

// 16 bytes at offset `offset` of block b of the 16 rows, transposed: register g, lane j = dword g
// of row j (the unpacks work per 128-bit lane; lane L of a[p] holds row p + 4L).
LSERVE_AVX512_INLINE void transpose_rows16(const uint8_t* const* block, int64_t offset, __m512i g[4]) {
  __m512i a[4];
  for (int p = 0; p < 4; ++p) {
    a[p] = load_rows4(block[p] + offset, block[p + 4] + offset, block[p + 8] + offset, block[p + 12] + offset);
  }
  const __m512i lo01 = _mm512_unpacklo_epi32(a[0], a[1]), lo23 = _mm512_unpacklo_epi32(a[2], a[3]);
  const __m512i hi01 = _mm512_unpackhi_epi32(a[0], a[1]), hi23 = _mm512_unpackhi_epi32(a[2], a[3]);
  g[0] = _mm512_unpacklo_epi64(lo01, lo23);
  g[1] = _mm512_unpackhi_epi64(lo01, lo23);
  g[2] = _mm512_unpacklo_epi64(hi01, hi23);
  g[3] = _mm512_unpackhi_epi64(hi01, hi23);
}

// The blocks' first dwords (f16 d, then Q4_1's f16 m or item bytes) of the 16 rows: d and the
// second half as 16 floats each.
LSERVE_AVX512_INLINE void load_scales16(const uint8_t* const* block, __m512& d, __m512& second) {
  __m512i a[4];
  for (int p = 0; p < 4; ++p) a[p] = load_rows4(block[p], block[p + 4], block[p + 8], block[p + 12]);
  const __m512i dwords =  // lane j: dword 0 of row j
      _mm512_unpacklo_epi64(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpacklo_epi32(a[2], a[3]));
  d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dwords));
  second = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dwords, 16)));
}

// 8 + 8 f16 -> 16 floats.
LSERVE_AVX512_INLINE __m512 halves16(const uint8_t* low, const uint8_t* high) {
  const __m128i low_half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(low));
  const __m128i high_half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(high));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(low_half), high_half, 1));
}

// load_block at 16 features: stored rows transposed (weight_rows: the 16 rows), or two packed
// groups (weight_rows[0], [1]: features 0-7 and 8-15), each 256-bit half as the AVX2 kernel loads it.
template <DType kWeight, bool kPacked>
LSERVE_AVX512_INLINE void load_block16(const uint8_t* const* weight_rows, int64_t b, __m512& d, __m512& second,
                                       __m512i* items) {
  using Layout = BlockLayout<kWeight>;
  constexpr int kItemRegisters = (Layout::kBytes - Layout::kItems) / 4;  // item dwords
  if constexpr (kPacked) {
    const uint8_t* low = weight_rows[0] + b * kPackRows * Layout::kBytes;
    const uint8_t* high = weight_rows[1] + b * kPackRows * Layout::kBytes;
    d = halves16(low, high);
    second = kWeight == DType::kQ4_1 ? halves16(low + 2 * kPackRows, high + 2 * kPackRows) : d;  // d: unused
    for (int k = 0; k < kItemRegisters; ++k) {
      const int64_t offset = kPackedItems<kWeight> + 32 * k;
      const __m256i low_items = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + offset));
      const __m256i high_items = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + offset));
      items[k] = _mm512_inserti64x4(_mm512_castsi256_si512(low_items), high_items, 1);
    }
  } else {
    const uint8_t* block[kAvx512Features];
    for (int j = 0; j < kAvx512Features; ++j) block[j] = weight_rows[j] + b * Layout::kBytes;
    load_scales16(block, d, second);
    for (int k = 0; k < kItemRegisters; k += 4) transpose_rows16(block, Layout::kItems + 4 * k, items + k);
  }
}

LSERVE_AVX512_INLINE __m512i broadcast4_512(const int8_t* src) {
  int32_t value;
  std::memcpy(&value, src, sizeof(value));
  return _mm512_set1_epi32(value);
}

// kMt tokens x 16 features; out[i] = the 16 results of token i.
template <DType kWeight, bool kPacked, int kMt, bool kVnni>
LSERVE_AVX512_INLINE void tile_avx512(const uint8_t* const* weight_rows, const ActBlock* const* x_rows,
                                      int64_t num_blocks, const float* bias, const Prefetch& prefetch,
                                      float (*out)[kAvx512Features]) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi16(1);
  __m512 acc[kMt];
  for (int i = 0; i < kMt; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    for (int64_t line = b * prefetch.lines_per_block; line < (b + 1) * prefetch.lines_per_block; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(prefetch.next + line * kCacheLine), _MM_HINT_T0);
    }
    __m512 d, second;
    if constexpr (kWeight == DType::kQ8_0) {
      __m512i w[8];  // w[t] lane j: items 4t..4t+3 of row j, signed
      load_block16<kWeight, kPacked>(weight_rows, b, d, second, w);
      if constexpr (kVnni) {
        // sum (x + 128) w - 128 sum(w): |sums| < 2^20, exact in int32.
        const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
        __m512i offset_sum = zero;  // 128 * sum(w) per lane
        for (int t = 0; t < 8; ++t) offset_sum = dpbusd(offset_sum, offset, w[t]);
        const __m512i start = _mm512_sub_epi32(zero, offset_sum);
        for (int i = 0; i < kMt; ++i) {
          const ActBlock& xb = x_rows[i][b];
          __m512i even = start, odd = zero;  // two chains: vpdpbusd's latency
          for (int t = 0; t < 8; t += 2) {
            even = dpbusd(even, _mm512_xor_si512(broadcast4_512(xb.qs + 4 * t), offset), w[t]);
            odd = dpbusd(odd, _mm512_xor_si512(broadcast4_512(xb.qs + 4 * t + 4), offset), w[t + 1]);
          }
          const __m512i isum = _mm512_add_epi32(even, odd);
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(xb.d)), acc[i]);
        }
      } else {
        __m512i magnitude[8];
        __mmask64 negative[8];
        for (int t = 0; t < 8; ++t) {
          magnitude[t] = _mm512_abs_epi8(w[t]);  // -128 -> 0x80, i.e. 128 unsigned
          negative[t] = _mm512_movepi8_mask(w[t]);
        }
        for (int i = 0; i < kMt; ++i) {
          const ActBlock& xb = x_rows[i][b];
          __m512i isum = zero;
          for (int t = 0; t < 8; ++t) {
            // |w| <= 128 and |x| <= 127: a pair sums to at most 32512, widened before adding.
            const __m512i x4 = broadcast4_512(xb.qs + 4 * t);
            const __m512i signed_x = _mm512_mask_sub_epi8(x4, negative[t], zero, x4);
            isum = _mm512_add_epi32(isum, _mm512_madd_epi16(_mm512_maddubs_epi16(magnitude[t], signed_x), ones));
          }
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(xb.d)), acc[i]);
        }
      }
    } else {
      __m512i g[4], low[4], high[4];  // low[g]: items 4g..4g+3, high[g]: items 16 + 4g..
      load_block16<kWeight, kPacked>(weight_rows, b, d, second, g);
      const __m512 m = kWeight == DType::kQ4_0 ? _mm512_mul_ps(d, _mm512_set1_ps(-8.0f)) : second;
      const __m512i mask = _mm512_set1_epi8(0x0f);
      for (int k = 0; k < 4; ++k) {
        low[k] = _mm512_and_si512(g[k], mask);
        high[k] = _mm512_and_si512(_mm512_srli_epi16(g[k], 4), mask);
      }
      for (int i = 0; i < kMt; ++i) {
        const ActBlock& xb = x_rows[i][b];
        __m512i isum;
        if constexpr (kVnni) {
          __m512i low_sum = zero, high_sum = zero;  // two chains: vpdpbusd's latency
          for (int k = 0; k < 4; ++k) {
            low_sum = dpbusd(low_sum, low[k], broadcast4_512(xb.qs + 4 * k));
            high_sum = dpbusd(high_sum, high[k], broadcast4_512(xb.qs + 16 + 4 * k));
          }
          isum = _mm512_add_epi32(low_sum, high_sum);
        } else {  // int16 pairs: 8 * 2 * 15 * 127 = 30480 at most, as in AVX2
          __m512i pairs = _mm512_maddubs_epi16(low[0], broadcast4_512(xb.qs));
          for (int k = 1; k < 4; ++k) {
            pairs = _mm512_add_epi16(pairs, _mm512_maddubs_epi16(low[k], broadcast4_512(xb.qs + 4 * k)));
          }
          for (int k = 0; k < 4; ++k) {
            pairs = _mm512_add_epi16(pairs, _mm512_maddubs_epi16(high[k], broadcast4_512(xb.qs + 16 + 4 * k)));
          }
          isum = _mm512_madd_epi16(pairs, ones);
        }
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(xb.d)), acc[i]);
        acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xb.s), acc[i]);
      }
    }
  }
  const __m512 bias16 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int i = 0; i < kMt; ++i) _mm512_storeu_ps(out[i], _mm512_add_ps(acc[i], bias16));
}

// kVnni: vpdpbusd block sums; run only where the CPU has AVX512-VNNI (CpuIsa::kAvx512Vnni).
template <bool kVnni>
struct Avx512Kernels {
  static constexpr int kGroupFeatures = kAvx512Features;
  static constexpr int kTileTokens = 4;
  // The AVX2 quantiser: the activation blocks must be the same bits whichever kernel runs.
  LSERVE_AVX2 static void quantize_row(const float* x, ActBlock* out, int64_t num_blocks) {
    quantize_row_avx2(x, out, num_blocks);
  }
  template <DType kWeight, bool kPacked>
  LSERVE_AVX512 static void tile(int num_tokens, const uint8_t* const* weight_rows, const ActBlock* const* x_rows,
                                 int64_t num_blocks, const float* bias, const Prefetch& prefetch,
                                 float (*out)[kGroupFeatures]) {
    static_assert(kTileTokens == 4, "the switch below lists the tile heights");
    switch (num_tokens) {
      case 4: tile_avx512<kWeight, kPacked, 4, kVnni>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      case 3: tile_avx512<kWeight, kPacked, 3, kVnni>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      case 2: tile_avx512<kWeight, kPacked, 2, kVnni>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
      default: tile_avx512<kWeight, kPacked, 1, kVnni>(weight_rows, x_rows, num_blocks, bias, prefetch, out); return;
    }
  }
};
#pragma GCC diagnostic pop
#endif  // LSERVE_CPU_X86

// ---- driver ----------------------------------------------------------------------------------

template <typename Kernels, DType kWeight, bool kPacked>
void gemm_quant_with(const CpuContext& context, const GemmArgs& args) {
  constexpr int kGroupFeatures = Kernels::kGroupFeatures;
  constexpr int kTileTokens = Kernels::kTileTokens;
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  const int64_t num_blocks = in_features / kQuantBlock;
  const size_t row_bytes = dtype_nbytes(kWeight, in_features);
  // (out_features, num_blocks) blocks, or packed: (ceil(out_features / kPackRows), num_blocks, kPackRows) blocks
  const auto* weight = static_cast<const uint8_t*>(args.weight.data);
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
        if constexpr (kPacked) {  // the packed groups of kPackRows rows; a missing one repeats the first
          for (int h = 0; h < kGroupFeatures / kPackRows; ++h) {
            weight_rows[h] = weight + (n0 + (h * kPackRows < num_features ? h * kPackRows : 0)) * row_bytes;
          }
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
          Kernels::template tile<kWeight, kPacked>(num_tile_tokens, weight_rows, x_rows, num_blocks,
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

template <typename Kernels, bool kPacked>
void gemm_quant_dispatch(const CpuContext& context, const GemmArgs& args) {
  switch (args.weight.dtype) {
    case DType::kQ8_0: gemm_quant_with<Kernels, DType::kQ8_0, kPacked>(context, args); return;
    case DType::kQ4_0: gemm_quant_with<Kernels, DType::kQ4_0, kPacked>(context, args); return;
    case DType::kQ4_1: gemm_quant_with<Kernels, DType::kQ4_1, kPacked>(context, args); return;
    default: LSERVE_THROW("gemm_quant: ", dtype_name(args.weight.dtype), " is not a block format");
  }
}

template <typename Kernels>
void gemm_quant_layout(const CpuContext& context, const GemmArgs& args) {
  switch (args.weight_layout) {
    case WeightLayout::kRows: gemm_quant_dispatch<Kernels, false>(context, args); return;
    case WeightLayout::kInterleaved8: gemm_quant_dispatch<Kernels, true>(context, args); return;
  }
  LSERVE_THROW("gemm_quant: unknown weight layout");
}

template <DType kWeight>
void pack_with(const TensorView& weight, uint8_t* out) {
  using Layout = BlockLayout<kWeight>;
  const int64_t out_features = weight.size(0), num_blocks = weight.size(1) / kQuantBlock;
  const int64_t row_bytes = num_blocks * Layout::kBytes;
  const auto* rows = static_cast<const uint8_t*>(weight.data);
  const int64_t num_groups = (out_features + kPackRows - 1) / kPackRows;
  std::memset(out, 0, static_cast<size_t>(num_groups * kPackRows * row_bytes));  // a missing row is zeros
  for (int64_t group = 0; group < num_groups; ++group) {
    uint8_t* group_out = out + group * kPackRows * row_bytes;
    for (int64_t row = 0; row < std::min<int64_t>(kPackRows, out_features - group * kPackRows); ++row) {
      const uint8_t* src = rows + (group * kPackRows + row) * row_bytes;
      for (int64_t b = 0; b < num_blocks; ++b) {
        const uint8_t* block = src + b * Layout::kBytes;
        uint8_t* dst = group_out + b * kPackRows * Layout::kBytes;
        for (int64_t half = 0; half < Layout::kItems / 2; ++half) {
          std::memcpy(dst + half * 2 * kPackRows + 2 * row, block + 2 * half, 2);
        }
        for (int64_t dword = 0; dword < (Layout::kBytes - Layout::kItems) / 4; ++dword) {
          std::memcpy(dst + kPackedItems<kWeight> + dword * 4 * kPackRows + 4 * row, block + Layout::kItems + 4 * dword, 4);
        }
      }
    }
  }
}

}  // namespace

void gemm_quant(const CpuContext& context, const GemmArgs& args) {
#ifdef LSERVE_CPU_X86
  switch (context.isa) {
    case CpuIsa::kAvx512Vnni: gemm_quant_layout<Avx512Kernels<true>>(context, args); return;
    case CpuIsa::kAvx512: gemm_quant_layout<Avx512Kernels<false>>(context, args); return;
    case CpuIsa::kAvx2: gemm_quant_layout<Avx2Kernels>(context, args); return;
    case CpuIsa::kGeneric: break;
  }
#endif
  gemm_quant_layout<GenericKernels>(context, args);
}

size_t packed_weight_bytes(DType dtype, int64_t out_features, int64_t in_features) {
  LSERVE_CHECK(dtype_is_block(dtype), "pack: ", dtype_name(dtype), " is not a block format");
  return dtype_nbytes(dtype, (out_features + kPackRows - 1) / kPackRows * kPackRows * in_features);
}

void pack_quant_weight(const TensorView& weight, uint8_t* out) {
  switch (weight.dtype) {
    case DType::kQ8_0: pack_with<DType::kQ8_0>(weight, out); return;
    case DType::kQ4_0: pack_with<DType::kQ4_0>(weight, out); return;
    case DType::kQ4_1: pack_with<DType::kQ4_1>(weight, out); return;
    default: LSERVE_THROW("pack: ", dtype_name(weight.dtype), " is not a block format");
  }
}

}  // namespace lserve::cpu
