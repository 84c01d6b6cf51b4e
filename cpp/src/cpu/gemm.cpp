// CPU gemm: output (num_tokens, out_features) = input (num_tokens, in_features) @ weight^T + bias,
// fp32 accumulation whatever the weight dtype (bf16/f16 converted to fp32 in registers on the AVX2
// path, per tile otherwise).
// Batch invariant: every output element is one dot product summed in one fixed order whatever the
// number of tokens, the token's place in the batch or the thread count: kLanes partial sums
// (lane l takes k = l mod kLanes, FMA-chained in k order, carried across kDecodeKc blocks), a k
// tail folded in lane k mod kLanes, then lanes 0..kLanes-1 added in order, then the bias. So a
// request's logits do not depend on what it is batched with (docs/ARCHITECTURE.md, Reproducibility).
// One driver for decode and prefill: tasks of kDecodeRows-feature tiles; within a task, tokens go in
// blocks of kTokenBlock (their input rows stay in L2 while kTilesPerPass tiles reuse them) and
// groups of kGroupTokens (a tile's weights, kDecodeRows x kDecodeKc, stay in L1 across the groups).
// Decode (num_tokens <= kGroupTokens) streams the weight exactly once. Every kernel has an AVX2+FMA
// build chosen at run time and a portable one. Reference: torch.nn.functional.linear. Floor:
// 2 * num_tokens * in_features * out_features FLOPs and out_features * in_features * dtype_size
// bytes of weight; on one AVX2 core at 2 GHz, 2 FMA ports x 8 lanes x 2 = 64 GFLOP/s. The former
// BLIS-style prefill path (6 x 16 register tile over output features) summed each element in kKc
// chunks, an order that differed from the decode path's, so a row's result depended on the batch;
// its cost against this path is in docs/PERFORMANCE.md (2026-12-05).
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

// A kernel call: up to kGroupTokens tokens against kDecodeRows weight rows, over at most kDecodeKc
// inputs (kDecodeRows x kDecodeKc x 4 B = 16 KiB of the 32 KiB L1d). Sums stay in kLanes-wide
// partial sums, (token, row, lane), until every k block is done.
constexpr int64_t kGroupTokens = 8;
constexpr int kDecodeRows = 4;
constexpr int64_t kDecodeKc = 1024;
constexpr int kDecodeLanes = kDecodeRows * kLanes;  // floats of partial sums per token
// Prefill blocking: a token block's input rows (kTokenBlock x kDecodeKc x 4 B = 256 KiB) stay in L2
// while the kTilesPerPass tiles of a pass read them; their partial sums take kTilesPerPass x
// kTokenBlock x kDecodeLanes x 4 B = 64 KiB per thread.
constexpr int64_t kTokenBlock = 64;
constexpr int64_t kTilesPerPass = 8;

// ---- portable kernels ----------------------------------------------------------------------

struct GenericKernels {
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

// kMg tokens against kDecodeRows weight rows; kU accumulators per pair (kU > 1 would change the
// summation order; the callers use 1). kMg = 2 keeps 8 FMA chains in flight (FMA latency 4 x 2
// ports). lanes as in decode_block.
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
  template <typename T>
  LSERVE_AVX2 static void decode_block(int64_t num_tokens, const float* const* x, const T* const* w, int64_t kc,
                                       float* lanes, float* /*scratch*/) {
    // kU = 1 for every group size: a token's sums must not depend on whether it shares the call.
    // Three tokens a call: 12 accumulators + 3 inputs + 1 weight fill AVX2's 16 registers, 7 loads per
    // 12 FMAs (two tokens: 6 per 8).
    int64_t m = 0;
    for (; m + 3 <= num_tokens; m += 3) decode_rows_avx2<3, 1>(x + m, w, kc, lanes + m * kDecodeLanes);
    if (m + 2 <= num_tokens) {
      decode_rows_avx2<2, 1>(x + m, w, kc, lanes + m * kDecodeLanes);
      m += 2;
    }
    if (m < num_tokens) decode_rows_avx2<1, 1>(x + m, w, kc, lanes + m * kDecodeLanes);
  }
};
#endif  // LSERVE_CPU_X86

// ---- drivers -------------------------------------------------------------------------------

template <typename Kernels, typename T>
void gemm_tiles(const CpuContext& context, const GemmArgs& args, const T* weight) {
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;  // (out_features,)
  const int num_threads = context.pool->num_threads();
  const int64_t num_tiles = (out_features + kDecodeRows - 1) / kDecodeRows;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  const int64_t block_tokens = std::min(num_tokens, kTokenBlock);
  const int64_t lanes_per_thread = kTilesPerPass * block_tokens * kDecodeLanes;
  // Per thread: the pass's partial sums, and (kDecodeRows, kDecodeKc) fp32 rows for kernels that
  // convert through memory.
  AlignedBuffer<float> lanes_buffer(num_threads * lanes_per_thread);
  AlignedBuffer<float> scratch(kConvert ? num_threads * kDecodeRows * kDecodeKc : 0);
  // About 8 chunks per thread, each of at least kMinChunkMacs multiply-adds: waking a worker
  // costs tens of microseconds on a busy host.
  constexpr int64_t kMinChunkMacs = 1 << 17;
  const int64_t tile_macs = std::max<int64_t>(1, num_tokens * kDecodeRows * in_features);
  const int64_t grain = std::max({int64_t{1}, num_tiles / (8 * num_threads), kMinChunkMacs / tile_macs});

  context.pool->parallel_for(0, num_tiles, grain, [&](int64_t tile_begin, int64_t tile_end, int thread_idx) {
    float* weight_tile = scratch.data() + (kConvert ? thread_idx * kDecodeRows * kDecodeKc : 0);
    float* lanes = lanes_buffer.data() + thread_idx * lanes_per_thread;  // (tiles, tokens, kDecodeRows, kLanes)
    for (int64_t pass_begin = tile_begin; pass_begin < tile_end; pass_begin += kTilesPerPass) {
      const int64_t pass_end = std::min(tile_end, pass_begin + kTilesPerPass);
      for (int64_t m0 = 0; m0 < num_tokens; m0 += kTokenBlock) {
        const int64_t mb = std::min(kTokenBlock, num_tokens - m0);
        std::fill(lanes, lanes + (pass_end - pass_begin) * mb * kDecodeLanes, 0.0f);
        const float* x[kTokenBlock];
        for (int64_t k0 = 0; k0 < in_features; k0 += kDecodeKc) {
          const int64_t kc = std::min(kDecodeKc, in_features - k0);
          for (int64_t m = 0; m < mb; ++m) x[m] = row_ptr<const float>(args.input, m0 + m) + k0;
          for (int64_t tile = pass_begin; tile < pass_end; ++tile) {
            const int64_t n0 = tile * kDecodeRows;
            const int num_valid = static_cast<int>(std::min<int64_t>(kDecodeRows, out_features - n0));
            const T* w[kDecodeRows];  // fringe rows repeat the last valid row; their sums are dropped
            for (int j = 0; j < kDecodeRows; ++j) w[j] = weight + (n0 + std::min(j, num_valid - 1)) * in_features + k0;
            float* tile_lanes = lanes + (tile - pass_begin) * mb * kDecodeLanes;
            for (int64_t g = 0; g < mb; g += kGroupTokens) {
              Kernels::decode_block(std::min(kGroupTokens, mb - g), x + g, w, kc, tile_lanes + g * kDecodeLanes,
                                    weight_tile);
            }
          }
        }
        for (int64_t tile = pass_begin; tile < pass_end; ++tile) {
          const int64_t n0 = tile * kDecodeRows;
          const int num_valid = static_cast<int>(std::min<int64_t>(kDecodeRows, out_features - n0));
          const float* tile_lanes = lanes + (tile - pass_begin) * mb * kDecodeLanes;
          for (int64_t m = 0; m < mb; ++m) {
            float* output = row_ptr<float>(args.output, m0 + m) + n0;
            for (int j = 0; j < num_valid; ++j) {
              const float* acc = tile_lanes + m * kDecodeLanes + j * kLanes;
              float sum = 0.0f;
              for (int l = 0; l < kLanes; ++l) sum += acc[l];
              output[j] = sum + (bias ? bias[n0 + j] : 0.0f);
            }
          }
        }
      }
    }
  });
}

template <typename Kernels>
void gemm_with(const CpuContext& context, const GemmArgs& args) {
  dispatch_float(args.weight.dtype, args.weight.data, [&](const auto* weight) {  // (out_features, in_features)
    gemm_tiles<Kernels>(context, args, weight);
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
  if (context.has_avx2_fma()) {
    gemm_with<Avx2Kernels>(context, args);
    return;
  }
#endif
  gemm_with<GenericKernels>(context, args);
}

}  // namespace lserve::cpu
