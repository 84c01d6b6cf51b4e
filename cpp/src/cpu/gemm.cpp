// CPU gemm: output (num_tokens, out_features) = input (num_tokens, in_features) @ weight^T + bias,
// fp32 accumulation whatever the weight dtype (bf16/f16 converted to fp32 per tile, or in registers
// on the AVX2 decode path). Two paths:
//  * decode (num_tokens <= 8): memory bound, so the weight is streamed exactly once, in tiles of
//    kDecodeRows output features x kDecodeKc inputs; tiles are spread over the pool.
//  * blocked (BLIS layout): the input is packed once into kMr-row panels, each task packs a
//    (kKc x nc) block of the weight into kNr-column panels and runs a kMr x kNr register tile.
// Every kernel has an AVX2+FMA build chosen at run time and a portable one. Reference:
// torch.nn.functional.linear. Floor: 2 * num_tokens * in_features * out_features FLOPs and
// out_features * in_features * dtype_size bytes of weight; on one AVX2 core at 2 GHz, 2 FMA
// ports x 8 lanes x 2 = 64 GFLOP/s. Measured 2026-11-22, 16-core Xeon (device host), 1 thread:
// blocked 512x2048x2048 ~50 GFLOP/s; decode 1x4096x4096 ~23 GB/s of weight (f32 and bf16).
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "aligned_buffer.h"
#include "convert.h"
#include "cpu_backend.h"
#include "vec.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LSERVE_CPU_X86 1
#endif

namespace lserve::cpu {

namespace {

// Register tile of the blocked path: kMr x kNr fp32 accumulators = 6 x 2 ymm registers, plus 2
// for the weight row and 1 for the broadcast input: 15 of AVX2's 16.
constexpr int kMr = 6;
constexpr int kNr = 16;
// K block: an input micro-panel (kMr x kKc x 4 B = 6 KiB) stays in L1 across the nc / kNr
// microkernel calls, and a packed weight block (kKc x kMaxNc x 4 B = 256 KiB) stays in L2.
constexpr int64_t kKc = 256;
constexpr int64_t kMaxNc = 256;
// Decode path: up to kDecodeMaxTokens tokens reuse each weight tile from L1
// (kDecodeRows x kDecodeKc x 4 B = 16 KiB of the 32 KiB L1d) while the weight itself is read
// once from memory. Sums stay in kLanes-wide partial sums until the tile is done.
constexpr int64_t kDecodeMaxTokens = 8;
constexpr int kDecodeRows = 4;
constexpr int64_t kDecodeKc = 1024;
constexpr int kDecodeLanes = kDecodeRows * kLanes;  // floats of partial sums per token

// ---- portable kernels ----------------------------------------------------------------------

// Writes (accumulate: adds) the valid mr x nr corner of a kMr x kNr tile into c.
LSERVE_CPU_INLINE void store_tile(const float* tile, float* c, int64_t ldc, bool accumulate, int mr, int nr) {
  for (int i = 0; i < mr; ++i) {
    float* c_row = c + i * ldc;
    const float* tile_row = tile + i * kNr;
    if (accumulate) {
      for (int j = 0; j < nr; ++j) c_row[j] += tile_row[j];
    } else {
      for (int j = 0; j < nr; ++j) c_row[j] = tile_row[j];
    }
  }
}

struct GenericKernels {
  // c (mr x nr of kMr x kNr, row stride ldc) (+)= a (kc, kMr) . b (kc, kNr), both packed.
  static void microkernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, bool accumulate,
                          int mr, int nr) {
    float tile[kMr * kNr] = {};
    for (int64_t k = 0; k < kc; ++k) {
      for (int i = 0; i < kMr; ++i) {
        const float a_ik = a[k * kMr + i];
        for (int j = 0; j < kNr; ++j) tile[i * kNr + j] += a_ik * b[k * kNr + j];
      }
    }
    store_tile(tile, c, ldc, accumulate, mr, nr);
  }

  // lanes[m][j][l] += sum over k = l (mod kLanes) of x[m][k] * w[j][k], for every token m and
  // weight row j < kDecodeRows, k < kc. scratch: (kDecodeRows, kDecodeKc) for converted rows.
  template <typename T>
  static void decode_block(int64_t num_tokens, const float* const* x, const T* const* w_in, int64_t kc,
                           float* lanes, float* scratch) {
    const float* w[kDecodeRows];
    for (int j = 0; j < kDecodeRows; ++j) {
      if constexpr (std::is_same_v<T, float>) {
        w[j] = w_in[j];
      } else {
        load_row(w_in[j], scratch + j * kDecodeKc, kc);
        w[j] = scratch + j * kDecodeKc;
      }
    }
    for (int64_t m = 0; m < num_tokens; ++m) {
      for (int j = 0; j < kDecodeRows; ++j) {
        float* acc = lanes + m * kDecodeLanes + j * kLanes;
        int64_t k = 0;
        for (; k + kLanes <= kc; k += kLanes) {
          for (int l = 0; l < kLanes; ++l) acc[l] += x[m][k + l] * w[j][k + l];
        }
        for (; k < kc; ++k) acc[k % kLanes] += x[m][k] * w[j][k];
      }
    }
  }

  template <typename T>
  static void convert_row(const T* src, float* dst, int64_t count) {
    load_row(src, dst, count);
  }
};

// ---- AVX2 + FMA kernels --------------------------------------------------------------------

#ifdef LSERVE_CPU_X86
#define LSERVE_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 consecutive weights as fp32: bf16 is a 16-bit shift, f16 goes through F16C. Converting in
// registers keeps the bytes read from memory at the weight's own size.
template <typename T>
LSERVE_AVX2 inline __attribute__((always_inline)) __m256 load8_as_float(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(src);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
}

// kMg tokens against kDecodeRows weight rows; kU independent accumulators per pair so that at
// least 8 FMA chains are in flight (FMA latency 4 x 2 ports). lanes as in decode_block.
template <int kMg, int kU, typename T>
LSERVE_AVX2 inline __attribute__((always_inline)) void decode_rows_avx2(const float* const* x, const T* const* w,
                                                                         int64_t kc, float* lanes) {
  __m256 acc[kMg][kDecodeRows][kU];
  for (int m = 0; m < kMg; ++m) {
    for (int j = 0; j < kDecodeRows; ++j) {
      acc[m][j][0] = _mm256_loadu_ps(lanes + m * kDecodeLanes + j * kLanes);
      for (int u = 1; u < kU; ++u) acc[m][j][u] = _mm256_setzero_ps();
    }
  }
  int64_t k = 0;
  for (; k + 8 * kU <= kc; k += 8 * kU) {
    for (int u = 0; u < kU; ++u) {
      __m256 xv[kMg];
      for (int m = 0; m < kMg; ++m) xv[m] = _mm256_loadu_ps(x[m] + k + 8 * u);
      for (int j = 0; j < kDecodeRows; ++j) {
        const __m256 wv = load8_as_float(w[j] + k + 8 * u);
        for (int m = 0; m < kMg; ++m) acc[m][j][u] = _mm256_fmadd_ps(xv[m], wv, acc[m][j][u]);
      }
    }
  }
  for (int m = 0; m < kMg; ++m) {
    for (int j = 0; j < kDecodeRows; ++j) {
      __m256 sum = acc[m][j][0];
      for (int u = 1; u < kU; ++u) sum = _mm256_add_ps(sum, acc[m][j][u]);
      float* out = lanes + m * kDecodeLanes + j * kLanes;
      _mm256_storeu_ps(out, sum);
      for (int64_t kk = k; kk < kc; ++kk) out[kk % kLanes] += x[m][kk] * to_float(w[j][kk]);
    }
  }
}

struct Avx2Kernels {
  LSERVE_AVX2 static void microkernel(int64_t kc, const float* a, const float* b, float* c, int64_t ldc,
                                      bool accumulate, int mr, int nr) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; ++k) {
      const __m256 b0 = _mm256_load_ps(b + k * kNr);
      const __m256 b1 = _mm256_load_ps(b + k * kNr + 8);
      const float* a_k = a + k * kMr;
      __m256 a_i = _mm256_broadcast_ss(a_k + 0);
      c00 = _mm256_fmadd_ps(a_i, b0, c00);
      c01 = _mm256_fmadd_ps(a_i, b1, c01);
      a_i = _mm256_broadcast_ss(a_k + 1);
      c10 = _mm256_fmadd_ps(a_i, b0, c10);
      c11 = _mm256_fmadd_ps(a_i, b1, c11);
      a_i = _mm256_broadcast_ss(a_k + 2);
      c20 = _mm256_fmadd_ps(a_i, b0, c20);
      c21 = _mm256_fmadd_ps(a_i, b1, c21);
      a_i = _mm256_broadcast_ss(a_k + 3);
      c30 = _mm256_fmadd_ps(a_i, b0, c30);
      c31 = _mm256_fmadd_ps(a_i, b1, c31);
      a_i = _mm256_broadcast_ss(a_k + 4);
      c40 = _mm256_fmadd_ps(a_i, b0, c40);
      c41 = _mm256_fmadd_ps(a_i, b1, c41);
      a_i = _mm256_broadcast_ss(a_k + 5);
      c50 = _mm256_fmadd_ps(a_i, b0, c50);
      c51 = _mm256_fmadd_ps(a_i, b1, c51);
    }
    if (mr == kMr && nr == kNr) {
      const __m256 rows[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
      for (int i = 0; i < kMr; ++i) {
        float* c_row = c + i * ldc;
        __m256 lo = rows[i][0], hi = rows[i][1];
        if (accumulate) {
          lo = _mm256_add_ps(lo, _mm256_loadu_ps(c_row));
          hi = _mm256_add_ps(hi, _mm256_loadu_ps(c_row + 8));
        }
        _mm256_storeu_ps(c_row, lo);
        _mm256_storeu_ps(c_row + 8, hi);
      }
      return;
    }
    alignas(32) float tile[kMr * kNr];
    _mm256_store_ps(tile + 0 * kNr, c00), _mm256_store_ps(tile + 0 * kNr + 8, c01);
    _mm256_store_ps(tile + 1 * kNr, c10), _mm256_store_ps(tile + 1 * kNr + 8, c11);
    _mm256_store_ps(tile + 2 * kNr, c20), _mm256_store_ps(tile + 2 * kNr + 8, c21);
    _mm256_store_ps(tile + 3 * kNr, c30), _mm256_store_ps(tile + 3 * kNr + 8, c31);
    _mm256_store_ps(tile + 4 * kNr, c40), _mm256_store_ps(tile + 4 * kNr + 8, c41);
    _mm256_store_ps(tile + 5 * kNr, c50), _mm256_store_ps(tile + 5 * kNr + 8, c51);
    store_tile(tile, c, ldc, accumulate, mr, nr);
  }

  template <typename T>
  LSERVE_AVX2 static void decode_block(int64_t num_tokens, const float* const* x, const T* const* w, int64_t kc,
                                       float* lanes, float* /*scratch*/) {
    int64_t m = 0;
    for (; m + 2 <= num_tokens; m += 2) decode_rows_avx2<2, 1>(x + m, w, kc, lanes + m * kDecodeLanes);
    if (m < num_tokens) decode_rows_avx2<1, 2>(x + m, w, kc, lanes + m * kDecodeLanes);
  }

  template <typename T>
  LSERVE_AVX2 static void convert_row(const T* src, float* dst, int64_t count) {
    int64_t i = 0;
    if constexpr (std::is_same_v<T, bf16_t>) {
      for (; i + 8 <= count; i += 8) {
        const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(wide));
      }
    } else if constexpr (std::is_same_v<T, f16_t>) {
      for (; i + 8 <= count; i += 8) {
        const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(bits));
      }
    }
    load_row(src + i, dst + i, count - i);
  }
};
#endif  // LSERVE_CPU_X86

// ---- drivers -------------------------------------------------------------------------------

template <typename Kernels, typename T>
void gemm_decode(const CpuContext& context, const GemmArgs& args, const T* weight) {
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;  // (out_features,)
  const int num_threads = context.pool->num_threads();
  const int64_t num_tiles = (out_features + kDecodeRows - 1) / kDecodeRows;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  // Per-thread (kDecodeRows, kDecodeKc) fp32 rows for kernels that convert through memory.
  AlignedBuffer<float> scratch(kConvert ? num_threads * kDecodeRows * kDecodeKc : 0);
  // About 8 chunks per thread, each of at least kMinChunkMacs multiply-adds: waking a worker
  // costs tens of microseconds on a busy host.
  constexpr int64_t kMinChunkMacs = 1 << 17;
  const int64_t tile_macs = std::max<int64_t>(1, num_tokens * kDecodeRows * in_features);
  const int64_t grain = std::max({int64_t{1}, num_tiles / (8 * num_threads), kMinChunkMacs / tile_macs});

  context.pool->parallel_for(0, num_tiles, grain, [&](int64_t tile_begin, int64_t tile_end, int thread_idx) {
    float* weight_tile = scratch.data() + (kConvert ? thread_idx * kDecodeRows * kDecodeKc : 0);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t n0 = tile * kDecodeRows;
      const int num_valid = static_cast<int>(std::min<int64_t>(kDecodeRows, out_features - n0));
      alignas(64) float lanes[kDecodeMaxTokens * kDecodeLanes] = {};  // (num_tokens, kDecodeRows, kLanes)
      for (int64_t k0 = 0; k0 < in_features; k0 += kDecodeKc) {
        const int64_t kc = std::min(kDecodeKc, in_features - k0);
        const T* w[kDecodeRows];  // fringe rows repeat the last valid row; their sums are dropped
        for (int j = 0; j < kDecodeRows; ++j) w[j] = weight + (n0 + std::min(j, num_valid - 1)) * in_features + k0;
        const float* x[kDecodeMaxTokens];
        for (int64_t m = 0; m < num_tokens; ++m) x[m] = row_ptr<const float>(args.input, m) + k0;
        Kernels::decode_block(num_tokens, x, w, kc, lanes, weight_tile);
      }
      for (int64_t m = 0; m < num_tokens; ++m) {
        float* output = row_ptr<float>(args.output, m) + n0;
        for (int j = 0; j < num_valid; ++j) {
          const float* acc = lanes + m * kDecodeLanes + j * kLanes;
          float sum = 0.0f;
          for (int l = 0; l < kLanes; ++l) sum += acc[l];
          output[j] = sum + (bias ? bias[n0 + j] : 0.0f);
        }
      }
    }
  });
}

// Packs rows [n0, n0 + num_cols) x columns [k0, k0 + kc) of weight (out_features, in_features)
// into ceil(num_cols / kNr) panels of (kc, kNr) fp32, zero-padded past num_cols.
template <typename Kernels, typename T>
void pack_weight_block(const T* weight, int64_t in_features, int64_t n0, int64_t num_cols, int64_t k0, int64_t kc,
                       float* row, float* packed) {
  for (int64_t panel = 0; panel * kNr < num_cols; ++panel) {
    float* dst = packed + panel * kc * kNr;  // (kc, kNr)
    for (int j = 0; j < kNr; ++j) {
      const int64_t col = panel * kNr + j;
      if (col < num_cols) {
        Kernels::convert_row(weight + (n0 + col) * in_features + k0, row, kc);
        for (int64_t k = 0; k < kc; ++k) dst[k * kNr + j] = row[k];
      } else {
        for (int64_t k = 0; k < kc; ++k) dst[k * kNr + j] = 0.0f;
      }
    }
  }
}

template <typename Kernels, typename T>
void gemm_blocked(const CpuContext& context, const GemmArgs& args, const T* weight) {
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  const int64_t ldc = args.output.stride(0);
  const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;  // (out_features,)
  const int num_threads = context.pool->num_threads();

  // Input panels: panel p = rows [p * kMr, p * kMr + kMr), stored (in_features, kMr), zero-padded.
  const int64_t num_panels = (num_tokens + kMr - 1) / kMr;
  AlignedBuffer<float> packed_input(num_panels * kMr * in_features);
  context.pool->parallel_for(0, num_panels, std::max<int64_t>(1, 16384 / in_features), [&](int64_t begin,
                                                                                          int64_t end, int) {
    for (int64_t panel = begin; panel < end; ++panel) {
      float* dst = packed_input.data() + panel * kMr * in_features;
      for (int i = 0; i < kMr; ++i) {
        const int64_t m = panel * kMr + i;
        const float* src = m < num_tokens ? row_ptr<const float>(args.input, m) : nullptr;
        for (int64_t k = 0; k < in_features; ++k) dst[k * kMr + i] = src ? src[k] : 0.0f;
      }
    }
  });

  // Tasks: column blocks of nc outputs (about 3 per thread), split along the tokens as well when
  // there are too few blocks to keep every thread busy.
  const int64_t target_nc = (out_features + 3 * num_threads - 1) / (3 * num_threads);
  const int64_t nc = std::clamp<int64_t>((target_nc + kNr - 1) / kNr * kNr, kNr, kMaxNc);
  const int64_t num_col_blocks = (out_features + nc - 1) / nc;
  int64_t num_row_parts = 1;
  if (num_col_blocks < 2 * num_threads) {
    num_row_parts = std::min<int64_t>(num_panels, (2 * num_threads + num_col_blocks - 1) / num_col_blocks);
  }
  const int64_t panels_per_part = (num_panels + num_row_parts - 1) / num_row_parts;
  num_row_parts = (num_panels + panels_per_part - 1) / panels_per_part;

  AlignedBuffer<float> packed_weight(num_threads * kKc * nc);  // per thread: (nc / kNr) x (kKc, kNr)
  AlignedBuffer<float> row_scratch(num_threads * kKc);          // per thread: one converted row
  context.pool->parallel_for(0, num_col_blocks * num_row_parts, 1, [&](int64_t task_begin, int64_t task_end,
                                                                       int thread_idx) {
    float* packed = packed_weight.data() + thread_idx * kKc * nc;
    float* row = row_scratch.data() + thread_idx * kKc;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t n0 = (task / num_row_parts) * nc;
      const int64_t num_cols = std::min(nc, out_features - n0);
      const int64_t panel_begin = (task % num_row_parts) * panels_per_part;
      const int64_t panel_end = std::min(num_panels, panel_begin + panels_per_part);
      for (int64_t k0 = 0; k0 < in_features; k0 += kKc) {
        const int64_t kc = std::min(kKc, in_features - k0);
        pack_weight_block<Kernels>(weight, in_features, n0, num_cols, k0, kc, row, packed);
        for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
          const float* a = packed_input.data() + panel * kMr * in_features + k0 * kMr;  // (kc, kMr)
          const int mr = static_cast<int>(std::min<int64_t>(kMr, num_tokens - panel * kMr));
          float* c_panel = row_ptr<float>(args.output, panel * kMr) + n0;
          for (int64_t col = 0; col < num_cols; col += kNr) {
            const int nr = static_cast<int>(std::min<int64_t>(kNr, num_cols - col));
            Kernels::microkernel(kc, a, packed + col * kc, c_panel + col, ldc, k0 > 0, mr, nr);
          }
        }
      }
      if (bias) {
        for (int64_t m = panel_begin * kMr; m < std::min(num_tokens, panel_end * kMr); ++m) {
          float* output = row_ptr<float>(args.output, m) + n0;
          for (int64_t j = 0; j < num_cols; ++j) output[j] += bias[n0 + j];
        }
      }
    }
  });
}

template <typename Kernels>
void gemm_with(const CpuContext& context, const GemmArgs& args) {
  dispatch_float(args.weight.dtype, args.weight.data, [&](const auto* weight) {  // (out_features, in_features)
    if (args.input.size(0) <= kDecodeMaxTokens) {
      gemm_decode<Kernels>(context, args, weight);
    } else {
      gemm_blocked<Kernels>(context, args, weight);
    }
  });
}

}  // namespace

void gemm(const CpuContext& context, const GemmArgs& args) {
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  if (num_tokens == 0 || out_features == 0) return;
  if (in_features == 0) {  // empty sum: output = bias (or 0)
    const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;
    for (int64_t m = 0; m < num_tokens; ++m) {
      float* output = row_ptr<float>(args.output, m);
      for (int64_t j = 0; j < out_features; ++j) output[j] = bias ? bias[j] : 0.0f;
    }
    return;
  }
  if (dtype_is_block(args.weight.dtype)) {
    gemm_quant(context, args);
    return;
  }
#ifdef LSERVE_CPU_X86
  if (context.has_avx2_fma) {
    gemm_with<Avx2Kernels>(context, args);
    return;
  }
#endif
  gemm_with<GenericKernels>(context, args);
}

}  // namespace lserve::cpu
