// Decode attention: few query rows per (sequence, KV head) over a long paged KV, split over the KV
// length, on mma.sync tensor cores (sm_80 and later).
// Work mapping: one CTA per (split, KV head, sequence). The query rows of all heads of the GQA
// group (q_len * group <= 16, packed row r = query (r / group), head (r % group)) form one 16-row
// M tile, so each K/V page is read once per group. A kStages-deep cp.async pipeline gathers 64-token
// K/V tiles from the page table; warp w owns rows [16w, 16w+16) of each tile and keeps its own online
// softmax state; the 4 warps merge through shared memory at the end. With num_splits > 1 each CTA
// writes fp32 partial O and its log-sum-exp, and decode_combine_kernel merges the splits.
// Floor (d128 bf16, 8 KV heads, 128K tokens, B=1): K+V = 512 MiB; at 2.98 TB/s (measured D2D) 180 us.
#pragma once

#include <cute/tensor.hpp>

#include "block_iterator.cuh"
#include "dispatch.cuh"
#include "kernel_common.cuh"

namespace lserve::cuda {

template <class Element_, int kHeadDim_, int kStages_>
struct DecodeTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kStages = kStages_;
  static constexpr int kNWarps = 4, kNThreads = 128;
  static constexpr int kRows = 16;                    // packed query rows (one mma M tile)
  static constexpr int kWarpN = 16;                   // KV rows per warp per tile
  static constexpr int kBlockN = kWarpN * kNWarps;    // KV rows per tile
  static constexpr int kSlabs = kNWarps * kStages;    // (kWarpN, head_dim) slabs in K and V each
  using MmaOp = std::conditional_t<std::is_same_v<Element, cute::bfloat16_t>,
                                   cute::SM80_16x8x16_F32BF16BF16F32_TN, cute::SM80_16x8x16_F32F16F16F32_TN>;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaOp>, cute::Layout<cute::Shape<cute::_1, cute::_1, cute::_1>>,
                                  cute::Tile<cute::_16, cute::_16, cute::_16>>;  // one warp
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kHeadDim>>{}));
  // (kWarpN, head_dim, slab): slab = stage * kNWarps + warp.
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      SmemLayoutAtom{}, cute::Shape<cute::Int<kWarpN>, cute::Int<kHeadDim>, cute::Int<kSlabs>>{}));
  // (head_dim, kWarpN, slab) view of V: the B operand of O = P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::Layout<cute::Shape<cute::Int<kHeadDim>, cute::Int<kWarpN>, cute::Int<kSlabs>>,
                                   cute::Stride<cute::Int<kWarpN>, cute::_1, cute::Int<kWarpN * kHeadDim>>>{}));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));
  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;
  static constexpr int kMergeStride = kHeadDim + 4;  // floats per row of the merge buffer

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 128> q;   // (kRows, head_dim)
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 128> k;  // stages; then the merge buffer
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 128> v;
    float warp_max[kNWarps][kRows];
    float warp_sum[kNWarps][kRows];
    float row_scale[kNWarps][kRows];  // exp2(warp max - row max) / row sum
    float row_lse[kRows];
  };
  static_assert(sizeof(float) * kNWarps * kRows * kMergeStride <= 2 * sizeof(Element) * cute::cosize_v<SmemLayoutKV>,
                "the merge buffer reuses the K and V stages");
};

template <class Traits, class Blocks>
__global__ void __launch_bounds__(Traits::kNThreads, 2)
    decode_kernel(const AttentionParams p, const int num_splits, float* __restrict__ partial_o,
                  float* __restrict__ partial_lse) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim, kStages = Traits::kStages, kRows = Traits::kRows;
  constexpr int kWarpN = Traits::kWarpN, kBlockN = Traits::kBlockN, kNWarps = Traits::kNWarps;
  constexpr int kNThreads = Traits::kNThreads;
  extern __shared__ __align__(128) char smem_raw[];
  auto& storage = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int split_idx = blockIdx.x, kv_head_idx = blockIdx.y, seq_idx = blockIdx.z;
  const int q_begin = p.qo_indptr[seq_idx];
  const int q_len = p.qo_indptr[seq_idx + 1] - q_begin;
  const int kv_len = p.kv_lens[seq_idx];
  const int group = p.num_qo_heads / p.num_kv_heads;
  const int num_rows = min(kRows, q_len * group);
  const int q_pos_base = kv_len - q_len;  // position of the chunk's query 0
  const Blocks blocks(p.sparsity, p.num_kv_heads, seq_idx, kv_head_idx, q_pos_base, kv_len - 1, kv_len);
  const int num_tiles = blocks.num_tiles();
  const int tiles_per_split = (num_tiles + num_splits - 1) / num_splits;
  const int tile_begin = split_idx * tiles_per_split;
  const int num_my_tiles = max(min(num_tiles, tile_begin + tiles_per_split) - tile_begin, 0);
  const PageTable page_table = PageTable::of(p, seq_idx);
  const Element* k_cache = static_cast<const Element*>(p.k_cache);
  const Element* v_cache = static_cast<const Element*>(p.v_cache);
  const int tid = threadIdx.x, warp_idx = tid / 32, lane = tid % 32;

  Tensor sQ = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQ{});    // (kRows, D)
  Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutKV{});   // (kWarpN, D, slab)
  Tensor sV = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutKV{});   // (kWarpN, D, slab)
  Tensor sVt = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVt{});  // (D, kWarpN, slab)
  Tensor sVtNoSwizzle = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVtNoSwizzle{});

  // Global -> shared: thread tid moves 16-byte chunk tid % kChunks of rows tid / kChunks + j * kRowsPerPass.
  constexpr int kChunks = kHeadDim / 8, kRowsPerPass = kNThreads / kChunks;
  static_assert(kRows % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0);
  const int chunk = tid % kChunks, row_base = tid / kChunks;
  CUTE_UNROLL
  for (int j = 0; j < kRows / kRowsPerPass; ++j) {
    const int r = row_base + j * kRowsPerPass;
    const bool valid = r < num_rows;
    const int qi = r / group, head = kv_head_idx * group + (r - qi * group);
    const Element* src = static_cast<const Element*>(p.q) + chunk * 8;
    if (valid) src += int64_t(q_begin + qi) * p.q_stride_token + int64_t(head) * p.q_stride_head;
    cp_async_16(&sQ(r, chunk * 8), src, valid);
  }
  const int64_t head_offset = int64_t(kv_head_idx) * p.kv_stride_head + chunk * 8;
  auto load_tile = [&](int i, int stage) {
    CUTE_UNROLL
    for (int j = 0; j < kBlockN / kRowsPerPass; ++j) {
      const int r = row_base + j * kRowsPerPass;
      const int pos = blocks.kv_pos(i, r);
      const int64_t offset =
          pos < 0 ? 0 : kv_row_offset(page_table, pos, p.page_size, p.kv_stride_page, p.kv_stride_token, head_offset);
      const int slab = stage * kNWarps + r / kWarpN;
      cp_async_16(&sK(r % kWarpN, chunk * 8, slab), k_cache + offset, pos >= 0);
      cp_async_16(&sV(r % kWarpN, chunk * 8, slab), v_cache + offset, pos >= 0);
    }
  };

  CUTE_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_my_tiles) load_tile(tile_begin + s, s);
    cp_async_commit();  // group s (group 0 also holds Q)
  }

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(lane);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);                       // (MMA, 1, D / 16)
  Tensor tSrK = thr_mma.partition_fragment_B(sK(_, _, 0));              // (MMA, MMA_N, D / 16)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle(_, _, 0));   // (MMA, MMA_D, 1)
  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_q = smem_copy_q.get_thread_slice(lane);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_k = smem_copy_k.get_thread_slice(lane);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto smem_thr_copy_v = smem_copy_v.get_thread_slice(lane);
  Tensor tSsQ = smem_thr_copy_q.partition_S(sQ);
  Tensor tSsK = smem_thr_copy_k.partition_S(sK);    // (CPY, CPY_N, CPY_K, slab)
  Tensor tOsVt = smem_thr_copy_v.partition_S(sVt);  // (CPY, CPY_D, CPY_K, slab)
  Tensor tSrQ_view = smem_thr_copy_q.retile_D(tSrQ);
  Tensor tSrK_view = smem_thr_copy_k.retile_D(tSrK);
  Tensor tOrVt_view = smem_thr_copy_v.retile_D(tOrVt);

  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kRows>, Int<kHeadDim>>{});  // (MMA, 1, MMA_D)
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), acc_layout_rowcol(acc_o.layout()));  // (2 rows, columns)
  constexpr int kRowsPerThread = decltype(size<0>(o_rc))::value;
  Tensor row_max = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  Tensor row_sum = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  fill(row_max, -INFINITY);
  fill(row_sum, 0.f);
  Tensor cS = make_identity_tensor(Shape<Int<kRows>, Int<kWarpN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_layout_rowcol(tScS.layout()));  // (2 rows, columns) -> (m, n)
  int q_pos[kRowsPerThread];  // query position of each row this thread holds
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) q_pos[r] = q_pos_base + get<0>(tScS_rc(r, 0)) / group;
  const float scale_log2 = p.sm_scale * kLog2e;

  for (int t = 0; t < num_my_tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t landed; every warp is done with the stage refilled below
    if (t + kStages - 1 < num_my_tiles) load_tile(tile_begin + t + kStages - 1, (t + kStages - 1) % kStages);
    cp_async_commit();
    if (t == 0) copy(smem_copy_q, tSsQ, tSrQ_view);
    const int i = tile_begin + t;
    const int slab = (t % kStages) * kNWarps + warp_idx;

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kRows>, Int<kWarpN>>{});  // (MMA, 1, MMA_N)
    clear(acc_s);
    copy(smem_copy_k, tSsK(_, _, _, slab), tSrK_view);
    gemm(tiled_mma, tSrQ, tSrK, acc_s);
    Tensor s_rc = make_tensor(acc_s.data(), acc_layout_rowcol(acc_s.layout()));
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s_rc); ++c) {
      const int k = blocks.kv_pos(i, warp_idx * kWarpN + get<1>(tScS_rc(0, c)));
      CUTE_UNROLL
      for (int r = 0; r < kRowsPerThread; ++r) {
        if (k < 0 || !blocks.visible(q_pos[r], k)) s_rc(r, c) = -INFINITY;
      }
    }
    online_softmax_step<4>(s_rc, o_rc, row_max, row_sum, scale_log2);
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_layout_to_a_sm80(rP.layout()));
    copy(smem_copy_v, tOsVt(_, _, _, slab), tOrVt_view);
    gemm(tiled_mma, tOrP, tOrVt, acc_o);
  }

  // Merge the 4 warps: row max and sum through shared memory, then O rescaled and summed.
  cp_async_wait<0>();
  CUTE_UNROLL
  for (int r = 0; r < kRowsPerThread; ++r) {
    const float sum = group_allreduce_sum<4>(row_sum(r));
    if (lane % 4 == 0) {
      storage.warp_max[warp_idx][get<0>(tScS_rc(r, 0))] = row_max(r);
      storage.warp_sum[warp_idx][get<0>(tScS_rc(r, 0))] = sum;
    }
  }
  __syncthreads();  // also: every warp is done with the K/V stages, which become the merge buffer
  if (tid < kRows) {
    float mx = -INFINITY;
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) mx = fmaxf(mx, storage.warp_max[w][tid]);
    const float m_scaled = (mx == -INFINITY ? 0.f : mx) * scale_log2;
    float total = 0.f;
    float weight[kNWarps];
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) {
      weight[w] = exp2f(storage.warp_max[w][tid] * scale_log2 - m_scaled);
      total += storage.warp_sum[w][tid] * weight[w];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) storage.row_scale[w][tid] = weight[w] * inv;
    // natural-log LSE of the scaled scores: (m * scale_log2 + log2(total)) / log2(e)
    storage.row_lse[tid] = total > 0.f ? (m_scaled + log2f(total)) / kLog2e : -INFINITY;
  }
  __syncthreads();
  float* merge = reinterpret_cast<float*>(storage.k.data());  // (kNWarps, kRows, kMergeStride)
  constexpr int kMergeStride = Traits::kMergeStride;
  Tensor cO = make_identity_tensor(Shape<Int<kRows>, Int<kHeadDim>>{});
  Tensor tOcO = thr_mma.partition_C(cO);
  CUTE_UNROLL
  for (int e = 0; e < size(acc_o); ++e) {
    const int m = get<0>(tOcO(e)), d = get<1>(tOcO(e));
    merge[(warp_idx * kRows + m) * kMergeStride + d] = acc_o(e) * storage.row_scale[warp_idx][m];
  }
  __syncthreads();
  CUTE_UNROLL
  for (int j = 0; j < kRows / kRowsPerPass; ++j) {
    const int r = row_base + j * kRowsPerPass;
    if (r >= num_rows) continue;
    float out[8];
    CUTE_UNROLL
    for (int x = 0; x < 8; ++x) out[x] = 0.f;
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) {
      const float4* src = reinterpret_cast<const float4*>(merge + (w * kRows + r) * kMergeStride + chunk * 8);
      const float4 a = src[0], b = src[1];
      out[0] += a.x; out[1] += a.y; out[2] += a.z; out[3] += a.w;
      out[4] += b.x; out[5] += b.y; out[6] += b.z; out[7] += b.w;
    }
    const int qi = r / group, head = kv_head_idx * group + (r - qi * group), token = q_begin + qi;
    if (num_splits == 1) {
      cutlass::Array<Element, 8> packed;
      CUTE_UNROLL
      for (int x = 0; x < 8; ++x) packed[x] = Element(out[x]);
      Element* dst = static_cast<Element*>(p.o) + int64_t(token) * p.o_stride_token + int64_t(head) * p.o_stride_head +
                     chunk * 8;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&packed);
    } else {
      const int64_t row = (int64_t(split_idx) * p.num_tokens + token) * p.num_qo_heads + head;
      float4* dst = reinterpret_cast<float4*>(partial_o + row * kHeadDim + chunk * 8);
      dst[0] = make_float4(out[0], out[1], out[2], out[3]);
      dst[1] = make_float4(out[4], out[5], out[6], out[7]);
      if (chunk == 0) partial_lse[row] = storage.row_lse[r];
    }
  }
}

// Merges the splits of each (token, query head): one warp per pair. Lanes first turn the splits'
// LSEs into weights (shared memory), then each lane accumulates head_dim / 32 consecutive values
// over the splits, several splits' loads in flight. out = sum_s w_s o_s / sum_s w_s,
// w_s = exp(lse_s - max lse).
constexpr int kMaxDecodeSplits = 256;

template <class Element, int kHeadDim>
__global__ void __launch_bounds__(128)
    decode_combine_kernel(const AttentionParams p, const int num_splits, const float* __restrict__ partial_o,
                          const float* __restrict__ partial_lse) {
  constexpr int kPerLane = kHeadDim / 32;
  __shared__ float weights[4][kMaxDecodeSplits];
  const int pair = blockIdx.x * 4 + threadIdx.y;
  if (pair >= p.num_tokens * p.num_qo_heads) return;
  const int token = pair / p.num_qo_heads, head = pair - token * p.num_qo_heads;
  const int64_t split_stride = int64_t(p.num_tokens) * p.num_qo_heads;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < num_splits; s += 32) mx = fmaxf(mx, partial_lse[s * split_stride + pair]);
  mx = group_allreduce_max<32>(mx);
  float total = 0.f;
  for (int s = threadIdx.x; s < num_splits; s += 32) {
    const float lse = partial_lse[s * split_stride + pair];
    const float w = lse == -INFINITY ? 0.f : __expf(lse - mx);
    weights[threadIdx.y][s] = w;
    total += w;
  }
  total = group_allreduce_sum<32>(total);
  __syncwarp();
  float acc[kPerLane];
  CUTE_UNROLL
  for (int x = 0; x < kPerLane; ++x) acc[x] = 0.f;
  const float* src = partial_o + int64_t(pair) * kHeadDim + threadIdx.x * kPerLane;
#pragma unroll 8
  for (int s = 0; s < num_splits; ++s) {
    const float w = weights[threadIdx.y][s];
    if constexpr (kPerLane == 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + s * split_stride * kHeadDim);
      acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
    } else {
      const float2 v = *reinterpret_cast<const float2*>(src + s * split_stride * kHeadDim);
      acc[0] += w * v.x; acc[1] += w * v.y;
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  Element* dst = static_cast<Element*>(p.o) + int64_t(token) * p.o_stride_token + int64_t(head) * p.o_stride_head +
                 threadIdx.x * kPerLane;
  CUTE_UNROLL
  for (int x = 0; x < kPerLane; ++x) dst[x] = Element(acc[x] * inv);
}

template <class Element, int kHeadDim, class Blocks>
cudaError_t launch_decode(const AttentionParams& p, int num_splits, float* partial_o, float* partial_lse,
                          cudaStream_t stream) {
  using Traits = DecodeTraits<Element, kHeadDim, 3>;
  const int smem_bytes = int(sizeof(typename Traits::SharedStorage));
  auto kernel = decode_kernel<Traits, Blocks>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(num_splits, p.num_kv_heads, p.num_seqs), Traits::kNThreads, smem_bytes, stream>>>(
      p, num_splits, partial_o, partial_lse);
  err = cudaGetLastError();
  if (err != cudaSuccess || num_splits == 1) return err;
  const int num_pairs = p.num_tokens * p.num_qo_heads;
  decode_combine_kernel<Element, kHeadDim><<<(num_pairs + 3) / 4, dim3(32, 4), 0, stream>>>(
      p, num_splits, partial_o, partial_lse);
  return cudaGetLastError();
}

// head_dim x block iterator dispatch for one dtype (instantiated in instantiations/).
template <class Element>
cudaError_t decode_run(const AttentionParams& p, int num_splits, float* partial_o, float* partial_lse,
                       cudaStream_t stream) {
  const bool dense = !p.sparsity.has_window() && !p.sparsity.has_selection();
  return dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    constexpr int kBlockN = DecodeTraits<Element, kHeadDim, 3>::kBlockN;
    if (dense) {
      return launch_decode<Element, kHeadDim, DenseCausalBlocks<kBlockN>>(p, num_splits, partial_o, partial_lse, stream);
    }
    return launch_decode<Element, kHeadDim, SparseBlocks<kBlockN, true>>(p, num_splits, partial_o, partial_lse, stream);
  });
}

}  // namespace lserve::cuda
