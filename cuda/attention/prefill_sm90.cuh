// Prefill attention for Hopper (sm_90a): TMA loads, wgmma, warp specialisation.
// Work mapping: one CTA per (query tile of 128 rows, query head, sequence), 3 warpgroups. Warpgroup 0
// is the producer: one thread issues TMA copies of Q and of each K/V tile the block iterator yields
// (a tile of kBlockN tokens is one TMA box per page per 64 columns, straight out of the paged cache)
// into a kStages-deep ring guarded by mbarriers. Warpgroups 1 and 2 each own 64 query rows: S = Q K^T
// (wgmma, both operands in shared memory), mask, online softmax, O += P V (wgmma, P from registers).
// The two consumers take turns issuing their GEMMs (named barriers), so one's softmax overlaps the
// other's GEMMs, and each issues S(j+1) before O += P(j) V(j) so its own softmax overlaps a GEMM.
// Rows of V past kv_len in the last tile are zeroed in shared memory (the cache may hold NaN there).
// Floor (H100 SXM, d128, 32 q heads, causal 32K): 8.8 TFLOP at ~800 TFLOP/s dense bf16 -> 11 ms.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <cuda.h>

#include "block_iterator.cuh"
#include "dispatch.cuh"
#include "kernel_common.cuh"
#include "tensor_map.h"

namespace lserve::cuda {

struct Sm90PrefillParams {
  AttentionParams p;
  CUtensorMap tma_q;  // (head_dim, num_qo_heads, num_tokens), box (64, 1, kBlockM)
  CUtensorMap tma_k;  // (head_dim, num_kv_heads, page_size, num_pages), box (64, 1, rows_per_box, 1)
  CUtensorMap tma_v;  // same as tma_k
  int32_t rows_per_box;  // min(page_size, kBlockN)
};

template <class Element_, int kHeadDim_>
struct Sm90PrefillTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  // 128 x 128 tiles, 2 stages: Q 32 KB + K 64 KB + V 64 KB + O 32 KB = 192 KB of the 227 KB an SM
  // gives one CTA (d128); two consumer warpgroups of 64 rows each keep S and O in 128 registers.
  static constexpr int kBlockM = 128, kBlockN = 128, kStages = 2;
  static constexpr int kNConsumerWarpGroups = 2, kNThreads = 128 * (1 + kNConsumerWarpGroups);
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128*40 + 256*232 <= 64K
  static constexpr int kColsPerBox = 64;                        // 128-byte swizzle span
  using TileShapeQK = cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>, cute::Int<kHeadDim>>;
  using TileShapePV = cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kBlockN>>;
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kNConsumerWarpGroups>, cute::_1, cute::_1>>;
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, TileShapeQK>(), AtomLayout{}));
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, TileShapePV, cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayout{}));
  // K-major 128-byte swizzle: 64-column chunks of all rows one after another, which is where a TMA
  // box (64 columns x rows) with SWIZZLE_128B lands them.
  using SmemLayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                   cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<Element>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // V in the same bytes as K's layout, seen as (head_dim, kBlockN, stage) MN-major for O = P V.
  using SmemLayoutVt = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_MN_SW128_Atom<Element>{},
      cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{}, cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using SmemLayoutO = decltype(cute::tile_to_shape(
      cute::composition(cute::Swizzle<3, 3, 3>{},
                        cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}),
      cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> v;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutO>, 1024> o;
    uint64_t q_full;
    uint64_t k_full[kStages], k_empty[kStages];
    uint64_t v_full[kStages], v_empty[kStages];
  };
};

namespace sm90 {

__device__ __forceinline__ void named_barrier_sync(int num_threads, int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int num_threads, int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}
// Named barrier ids (0 is __syncthreads): the consumers' turn-taking, then one per consumer warpgroup.
constexpr int kBarrierTurn0 = 1, kBarrierWarpGroup0 = 3;

__device__ __forceinline__ void tma_load_3d(const CUtensorMap* map, uint64_t* bar, void* smem, int c0, int c1, int c2) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(s),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(b), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(const CUtensorMap* map, uint64_t* bar, void* smem, int c0, int c1, int c2,
                                            int c3) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(s),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(b), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// acc (+)= A B^T on one warpgroup; kWait >= 0 waits until at most kWait wgmma batches are pending.
template <bool kZeroInit, int kWait, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void gemm(TiledMma& tiled_mma, TA& tCrA, const TB& tCrB, TC& tCrC) {
  using namespace cute;
  constexpr bool kARegs = !is_base_of<GMMA::DescriptorIterator, typename TiledMma::FrgTypeA>::value;
  if constexpr (kARegs) warpgroup_fence_operand(tCrA);
  warpgroup_fence_operand(tCrC);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    cute::gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), tCrC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(tCrC);
  if constexpr (kARegs) warpgroup_fence_operand(tCrA);
}

}  // namespace sm90

template <class Traits, class Blocks>
__global__ void __launch_bounds__(Traits::kNThreads, 1) prefill_sm90_kernel(const __grid_constant__ Sm90PrefillParams params) {
  using namespace cute;
  using Element = typename Traits::Element;
  using ClusterBarrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages, kColsPerBox = Traits::kColsPerBox;
  constexpr int kChunks = kHeadDim / kColsPerBox;
  const AttentionParams& p = params.p;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& storage = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest query tiles first
  const int qo_head_idx = blockIdx.y, seq_idx = blockIdx.z;
  const int q_begin = p.qo_indptr[seq_idx];
  const int q_len = p.qo_indptr[seq_idx + 1] - q_begin;
  const int m0 = m_block * kBlockM;
  if (m0 >= q_len) return;
  const int kv_len = p.kv_lens[seq_idx];
  const int kv_head_idx = qo_head_idx / (p.num_qo_heads / p.num_kv_heads);
  const int num_rows = min(kBlockM, q_len - m0);
  const int q_pos0 = kv_len - q_len + m0;
  const Blocks blocks(p.sparsity, p.num_kv_heads, seq_idx, kv_head_idx, q_pos0, q_pos0 + num_rows - 1, kv_len);
  const int num_tiles = blocks.num_tiles();
  const int tid = threadIdx.x;
  const int warp_group = tid / 128;

  if (tid == 0) {
    TxBarrier::init(&storage.q_full, 1);
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      TxBarrier::init(&storage.k_full[s], 1);
      TxBarrier::init(&storage.v_full[s], 1);
      ClusterBarrier::init(&storage.k_empty[s], Traits::kNConsumerWarpGroups);
      ClusterBarrier::init(&storage.v_empty[s], Traits::kNConsumerWarpGroups);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (tid != 0) return;
    // Producer: Q once, then K(i), V(i) for each tile, last tile first.
    constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
    constexpr uint32_t kTileBytes = kBlockN * kHeadDim * sizeof(Element);
    TxBarrier::arrive_and_expect_tx(&storage.q_full, kQBytes);
    CUTE_UNROLL
    for (int c = 0; c < kChunks; ++c) {
      sm90::tma_load_3d(&params.tma_q, &storage.q_full, storage.q.data() + c * kColsPerBox * kBlockM, c * kColsPerBox,
                        qo_head_idx, q_begin + m0);
    }
    const int32_t* page_table = p.kv_page_indices + p.kv_page_indptr[seq_idx];
    const int last_page = (kv_len - 1) / p.page_size;
    const int rows_per_box = params.rows_per_box;
    const int boxes_per_tile = kBlockN / rows_per_box;
    auto load_tile = [&](const CUtensorMap* map, uint64_t* bar, Element* tile, int tile_start) {
      TxBarrier::arrive_and_expect_tx(bar, kTileBytes);
      for (int b = 0; b < boxes_per_tile; ++b) {
        const int pos = tile_start + b * rows_per_box;
        const int page_idx = min(pos / p.page_size, last_page);  // boxes past the sequence: any real page
        const int page = __ldg(page_table + page_idx);
        const int in_page = pos % p.page_size;
        CUTE_UNROLL
        for (int c = 0; c < kChunks; ++c) {
          sm90::tma_load_4d(map, bar, tile + c * kColsPerBox * kBlockN + b * rows_per_box * kColsPerBox, c * kColsPerBox,
                            kv_head_idx, in_page, page);
        }
      }
    };
    for (int j = 0; j < num_tiles; ++j) {
      const int stage = j % kStages;
      const uint32_t phase = (j / kStages) & 1;
      const int tile_start = blocks.tile_start(num_tiles - 1 - j);
      ClusterBarrier::wait(&storage.k_empty[stage], phase ^ 1);
      load_tile(&params.tma_k, &storage.k_full[stage], storage.k.data() + stage * kBlockN * kHeadDim, tile_start);
      ClusterBarrier::wait(&storage.v_empty[stage], phase ^ 1);
      load_tile(&params.tma_v, &storage.v_full[stage], storage.v.data() + stage * kBlockN * kHeadDim, tile_start);
    }
    return;
  }

  // ---- consumers ----
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int wg = warp_group - 1;          // 0 or 1: rows [64 wg, 64 wg + 64) of the tile
  const int ctid = tid - 128;             // 0..255
  const int wg_tid = ctid % 128;
  Tensor sQ = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQ{});    // (kBlockM, D)
  Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutK{});    // (kBlockN, D, stage)
  Tensor sV = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutK{});    // (kBlockN, D, stage)
  Tensor sVt = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVt{});  // (D, kBlockN, stage)
  Tensor sO = make_tensor(make_smem_ptr(storage.o.data()), typename Traits::SmemLayoutO{});    // (kBlockM, D)

  typename Traits::TiledMmaQK tiled_mma_qk;
  typename Traits::TiledMmaPV tiled_mma_pv;
  auto wg_mma_qk = tiled_mma_qk.get_slice(wg * 128);
  auto wg_mma_pv = tiled_mma_pv.get_slice(wg * 128);
  auto thr_mma_qk = tiled_mma_qk.get_thread_slice(ctid);
  auto thr_mma_pv = tiled_mma_pv.get_thread_slice(ctid);
  Tensor tSrQ = wg_mma_qk.partition_fragment_A(sQ);   // (MMA, MMA_M, MMA_K) descriptors
  Tensor tSrK = wg_mma_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = wg_mma_pv.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N, stage)
  Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // this thread's O
  clear(tOrO);
  Tensor o_rc = make_tensor(tOrO.data(), acc_layout_rowcol(tOrO.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(o_rc))::value;
  Tensor row_max = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  Tensor row_sum = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  Tensor correction = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  fill(row_max, -INFINITY);
  fill(row_sum, 0.f);
  Tensor tScS = thr_mma_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  const float scale_log2 = p.sm_scale * kLog2e;

  auto mask_scores = [&](auto& tSrS, int i) {
    if (!blocks.needs_mask(i)) return;
    const int tile_start = blocks.tile_start(i);
    CUTE_UNROLL
    for (int e = 0; e < size(tSrS); ++e) {
      const int k = tile_start + get<1>(tScS(e));
      if (k >= kv_len || !blocks.visible(q_pos0 + get<0>(tScS(e)), k)) tSrS(e) = -INFINITY;
    }
  };
  // V rows past kv_len (only in the last tile) may hold anything; P is 0 there but 0 * NaN is not.
  auto zero_v_tail = [&](int stage, int i) {
    const int valid = kv_len - blocks.tile_start(i);
    if (valid >= kBlockN) return;
    for (int idx = wg_tid; idx < (kBlockN - valid) * (kHeadDim / 8); idx += 128) {
      const int r = valid + idx / (kHeadDim / 8), c = idx % (kHeadDim / 8);
      *reinterpret_cast<uint4*>(&sV(r, c * 8, stage)) = make_uint4(0, 0, 0, 0);
    }
    cutlass::arch::fence_view_async_shared();
    sm90::named_barrier_sync(128, sm90::kBarrierWarpGroup0 + wg);
  };
  auto release = [&](uint64_t* bar) {
    if (wg_tid == 0) ClusterBarrier::arrive(bar);
  };

  if (wg == 1) sm90::named_barrier_arrive(256, sm90::kBarrierTurn0);  // warpgroup 0 issues first
  TxBarrier::wait(&storage.q_full, 0);

  // Tile j = 0 (the last KV tile).
  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  TxBarrier::wait(&storage.k_full[0], 0);
  sm90::gemm<true, 0>(tiled_mma_qk, tSrQ, tSrK(_, _, _, 0), tSrS);
  release(&storage.k_empty[0]);
  mask_scores(tSrS, num_tiles - 1);
  Tensor s_rc = make_tensor(tSrS.data(), acc_layout_rowcol(tSrS.layout()));
  softmax_update<4>(s_rc, row_max, row_sum, correction, scale_log2);
  Tensor tOrP = make_tensor<Element>(acc_layout_to_a_sm90(tSrS.layout()));
  {
    Tensor converted = convert_fragment<Element>(tSrS);
    copy(converted, make_tensor(tOrP.data(), tSrS.layout()));
  }

  for (int j = 1; j < num_tiles; ++j) {
    const int i = num_tiles - 1 - j;
    const int stage = j % kStages, prev_stage = (j - 1) % kStages;
    const uint32_t phase = (j / kStages) & 1, prev_phase = ((j - 1) / kStages) & 1;
    TxBarrier::wait(&storage.k_full[stage], phase);
    sm90::named_barrier_sync(256, sm90::kBarrierTurn0 + wg);
    sm90::gemm<true, -1>(tiled_mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
    TxBarrier::wait(&storage.v_full[prev_stage], prev_phase);
    if (j == 1) zero_v_tail(prev_stage, i + 1);
    sm90::gemm<false, -1>(tiled_mma_pv, tOrP, tOrV(_, _, _, prev_stage), tOrO);
    sm90::named_barrier_arrive(256, sm90::kBarrierTurn0 + 1 - wg);
    warpgroup_wait<1>();
    release(&storage.k_empty[stage]);
    mask_scores(tSrS, i);
    softmax_update<4>(s_rc, row_max, row_sum, correction, scale_log2);
    warpgroup_wait<0>();
    release(&storage.v_empty[prev_stage]);
    rescale_rows(o_rc, correction);
    Tensor converted = convert_fragment<Element>(tSrS);
    copy(converted, make_tensor(tOrP.data(), tSrS.layout()));
  }
  {
    const int last = num_tiles - 1;
    const int stage = last % kStages;
    TxBarrier::wait(&storage.v_full[stage], (last / kStages) & 1);
    if (last == 0) zero_v_tail(stage, num_tiles - 1);
    sm90::gemm<false, 0>(tiled_mma_pv, tOrP, tOrV(_, _, _, stage), tOrO);
    release(&storage.v_empty[stage]);
  }
  // Balance the turn-taking barrier: warpgroup 1 arrived once more than warpgroup 0 waited.
  if (wg == 0) sm90::named_barrier_sync(256, sm90::kBarrierTurn0);

  // Epilogue: O / row_sum -> shared (this warpgroup's 64 rows) -> 16-byte rows to global.
  normalize_rows<4>(o_rc, row_sum);
  Tensor tOcO = thr_mma_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  CUTE_UNROLL
  for (int e = 0; e < size(tOrO); e += 2) {
    cutlass::Array<Element, 2> pair;
    pair[0] = Element(tOrO(e));
    pair[1] = Element(tOrO(e + 1));
    *reinterpret_cast<cutlass::Array<Element, 2>*>(&sO(get<0>(tOcO(e)), get<1>(tOcO(e)))) = pair;
  }
  sm90::named_barrier_sync(128, sm90::kBarrierWarpGroup0 + wg);
  constexpr int kOChunks = kHeadDim / 8, kORowsPerPass = 128 / kOChunks;
  const int chunk = wg_tid % kOChunks;
  Element* o_ptr = static_cast<Element*>(p.o) + int64_t(qo_head_idx) * p.o_stride_head + chunk * 8;
  CUTE_UNROLL
  for (int r = wg * 64 + wg_tid / kOChunks; r < wg * 64 + 64; r += kORowsPerPass) {
    if (r < num_rows) {
      *reinterpret_cast<uint4*>(o_ptr + int64_t(q_begin + m0 + r) * p.o_stride_token) =
          *reinterpret_cast<const uint4*>(&sO(r, chunk * 8));
    }
  }
}

template <class Element, int kHeadDim, class Blocks>
cudaError_t launch_prefill_sm90(const AttentionParams& p, cudaStream_t stream) {
  using Traits = Sm90PrefillTraits<Element, kHeadDim>;
  static_assert(Blocks::contiguous, "TMA tiles are runs of kBlockN tokens");
  Sm90PrefillParams params;
  params.p = p;
  params.rows_per_box = p.page_size < Traits::kBlockN ? p.page_size : Traits::kBlockN;
  const uint32_t cols = Traits::kColsPerBox;
  if (!encode_tensor_map<3>(&params.tma_q, p.dtype, p.q,
                     {uint64_t(kHeadDim), uint64_t(p.num_qo_heads), uint64_t(p.num_tokens)},
                     {p.q_stride_head, p.q_stride_token}, {cols, 1u, uint32_t(Traits::kBlockM)}) ||
      !encode_tensor_map<4>(&params.tma_k, p.dtype, p.k_cache,
                     {uint64_t(kHeadDim), uint64_t(p.num_kv_heads), uint64_t(p.page_size), uint64_t(p.num_pages)},
                     {p.kv_stride_head, p.kv_stride_token, p.kv_stride_page},
                     {cols, 1u, uint32_t(params.rows_per_box), 1u}) ||
      !encode_tensor_map<4>(&params.tma_v, p.dtype, p.v_cache,
                     {uint64_t(kHeadDim), uint64_t(p.num_kv_heads), uint64_t(p.page_size), uint64_t(p.num_pages)},
                     {p.kv_stride_head, p.kv_stride_token, p.kv_stride_page},
                     {cols, 1u, uint32_t(params.rows_per_box), 1u})) {
    return cudaErrorInvalidValue;
  }
  const int smem_bytes = int(sizeof(typename Traits::SharedStorage));
  auto kernel = prefill_sm90_kernel<Traits, Blocks>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.max_q_len + Traits::kBlockM - 1) / Traits::kBlockM, p.num_qo_heads, p.num_seqs);
  kernel<<<grid, Traits::kNThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

// head_dim x block iterator dispatch for one dtype (instantiated in instantiations/).
template <class Element>
cudaError_t prefill_sm90_run(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    constexpr int kBlockN = Sm90PrefillTraits<Element, kHeadDim>::kBlockN;
    if (p.sparsity.streaming_heads == nullptr) {
      return launch_prefill_sm90<Element, kHeadDim, DenseCausalBlocks<kBlockN>>(p, stream);
    }
    return launch_prefill_sm90<Element, kHeadDim, SparseBlocks<kBlockN, false>>(p, stream);
  });
}

}  // namespace lserve::cuda
