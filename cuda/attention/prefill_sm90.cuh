// Prefill attention for Hopper (sm_90a): TMA loads, wgmma, warp specialisation.
// Work: a work tile is one query tile of 128 rows of one query head of one sequence; a CTA (3
// warpgroups) runs one or, on a persistent grid of one CTA per SM (small batches: see the launcher),
// a sequence of work tiles, longest first. Warpgroup 0 is the producer: one thread issues TMA copies of Q and of each K/V tile the block
// iterator yields (a tile of kBlockN tokens is one TMA box per page per 64 columns, straight out of
// the paged cache) into a kStages-deep ring guarded by mbarriers that runs on across work tiles, so
// the next tile's Q and first K/V load while the consumers write the previous tile's output.
// Warpgroups 1 and 2 each own 64 query rows: S = Q K^T (wgmma, both operands in shared memory),
// mask, online softmax, O += P V (wgmma, P from registers). The two consumers take turns issuing
// their GEMMs (named barriers), so one's softmax overlaps the other's GEMMs, and each issues S(j+1)
// before O += P(j) V(j) so its own softmax overlaps a GEMM (see the note on ptxas in the loop).
// Rows of V past kv_len in the last tile are zeroed in shared memory (the cache may hold NaN there).
// Floor (H100 SXM, d128, 32 q heads, causal 32K): 8.8 TFLOP at ~800 TFLOP/s dense bf16 -> 11 ms.
#pragma once

#include <algorithm>

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
  int32_t num_m_blocks;  // query tiles of the longest sequence
  int32_t num_work;      // num_m_blocks * num_qo_heads * num_seqs work tiles (some may be empty)
  int32_t m_major;       // work order: 0 per head (query tiles fastest), 1 query tile major (persistent)
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
    uint64_t q_full, q_empty;
    uint64_t k_full[kStages], k_empty[kStages];
    uint64_t v_full[kStages], v_empty[kStages];
    float softmax_anchor[kNConsumerWarpGroups];  // written, never read: see the consumer loop
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

// Work tile w (one query tile of one head of one sequence) in launch order. Per head, longest query
// tiles first (m fastest), or (m_major) longest first over all heads and sequences.
struct WorkTile {
  int m_block, qo_head_idx, seq_idx;
};
__device__ __forceinline__ WorkTile work_tile(const Sm90PrefillParams& params, int w) {
  const int num_m = params.num_m_blocks, heads = params.p.num_qo_heads;
  WorkTile t;
  if (params.m_major) {
    const int per_m = heads * params.p.num_seqs;
    t.m_block = num_m - 1 - w / per_m;
    t.qo_head_idx = (w % per_m) % heads;
    t.seq_idx = (w % per_m) / heads;
  } else {
    t.m_block = num_m - 1 - w % num_m;
    t.qo_head_idx = (w / num_m) % heads;
    t.seq_idx = (w / num_m) / heads;
  }
  return t;
}
// The k-th work tile of this CTA: rounds of gridDim.x tiles, walked forwards and backwards in turn
// so that every CTA gets a long and a short tile from each pair of rounds.
__device__ __forceinline__ int work_index(int k) {
  return k * gridDim.x + ((k & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
}

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
  const int tid = threadIdx.x;
  const int warp_group = tid / 128;
  const int group_size = p.num_qo_heads / p.num_kv_heads;

  // Per work tile: where its queries are, which KV tiles it walks.
  struct Tile {
    int qo_head_idx, seq_idx, kv_head_idx, q_begin, m0, num_rows, kv_len, q_pos0;
  };
  auto tile_at = [&](int w, Tile& t) {
    const WorkTile wt = work_tile(params, w);
    t.qo_head_idx = wt.qo_head_idx;
    t.seq_idx = wt.seq_idx;
    t.kv_head_idx = wt.qo_head_idx / group_size;
    t.q_begin = p.qo_indptr[wt.seq_idx];
    const int q_len = p.qo_indptr[wt.seq_idx + 1] - t.q_begin;
    t.m0 = wt.m_block * kBlockM;
    if (t.m0 >= q_len) return false;
    t.kv_len = p.kv_lens[wt.seq_idx];
    t.num_rows = min(kBlockM, q_len - t.m0);
    t.q_pos0 = t.kv_len - q_len + t.m0;
    return true;
  };
  auto blocks_of = [&](const Tile& t) {
    return Blocks(p.sparsity, p.num_kv_heads, t.seq_idx, t.kv_head_idx, t.q_pos0, t.q_pos0 + t.num_rows - 1, t.kv_len);
  };

  if (tid == 0) {
    TxBarrier::init(&storage.q_full, 1);
    ClusterBarrier::init(&storage.q_empty, Traits::kNConsumerWarpGroups);
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
    // Producer: per work tile, Q (once the consumers are done with the previous one), then K(i), V(i)
    // for each KV tile, last tile first; the K/V ring runs on across work tiles.
    constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
    constexpr uint32_t kTileBytes = kBlockN * kHeadDim * sizeof(Element);
    const int rows_per_box = params.rows_per_box;
    const int boxes_per_tile = kBlockN / rows_per_box;
    int it = 0, q_count = 0;
    for (int k = 0;; ++k) {
      const int w = work_index(k);
      if (w >= params.num_work) break;
      Tile t;
      if (!tile_at(w, t)) continue;
      const Blocks blocks = blocks_of(t);
      const int num_tiles = blocks.num_tiles();
      ClusterBarrier::wait(&storage.q_empty, (q_count & 1) ^ 1);
      TxBarrier::arrive_and_expect_tx(&storage.q_full, kQBytes);
      CUTE_UNROLL
      for (int c = 0; c < kChunks; ++c) {
        sm90::tma_load_3d(&params.tma_q, &storage.q_full, storage.q.data() + c * kColsPerBox * kBlockM,
                          c * kColsPerBox, t.qo_head_idx, t.q_begin + t.m0);
      }
      ++q_count;
      const PageTable page_table = PageTable::of(p, t.seq_idx);
      const int last_page = (t.kv_len - 1) / p.page_size;
      auto load_tile = [&](const CUtensorMap* map, uint64_t* bar, Element* tile, int tile_start) {
        TxBarrier::arrive_and_expect_tx(bar, kTileBytes);
        for (int b = 0; b < boxes_per_tile; ++b) {
          const int pos = tile_start + b * rows_per_box;
          const int page_idx = min(pos / p.page_size, last_page);  // boxes past the sequence: any real page
          const int page = page_table.page(page_idx);
          const int in_page = pos % p.page_size;
          CUTE_UNROLL
          for (int c = 0; c < kChunks; ++c) {
            sm90::tma_load_4d(map, bar, tile + c * kColsPerBox * kBlockN + b * rows_per_box * kColsPerBox,
                              c * kColsPerBox, t.kv_head_idx, in_page, page);
          }
        }
      };
      for (int j = 0; j < num_tiles; ++j, ++it) {
        const int stage = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        const int tile_start = blocks.tile_start(num_tiles - 1 - j);
        ClusterBarrier::wait(&storage.k_empty[stage], phase ^ 1);
        load_tile(&params.tma_k, &storage.k_full[stage], storage.k.data() + stage * kBlockN * kHeadDim, tile_start);
        ClusterBarrier::wait(&storage.v_empty[stage], phase ^ 1);
        load_tile(&params.tma_v, &storage.v_full[stage], storage.v.data() + stage * kBlockN * kHeadDim, tile_start);
      }
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
  Tensor o_rc = make_tensor(tOrO.data(), acc_layout_rowcol(tOrO.layout()));
  constexpr int kRowsPerThread = decltype(size<0>(o_rc))::value;
  Tensor row_max = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  Tensor row_sum = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  Tensor correction = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor s_rc = make_tensor(tSrS.data(), acc_layout_rowcol(tSrS.layout()));
  Tensor tOrP = make_tensor<Element>(acc_layout_to_a_sm90(tSrS.layout()));
  Tensor tScS = thr_mma_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOcO = thr_mma_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  const float scale_log2 = p.sm_scale * kLog2e;
  auto release = [&](uint64_t* bar) {
    if (wg_tid == 0) ClusterBarrier::arrive(bar);
  };

  // The two warpgroups take turns issuing their GEMMs (every S = Q K^T issue point, across work tiles):
  // warpgroup w waits on barrier Turn0 + w and then signals the other's.
  if (wg == 1) sm90::named_barrier_arrive(256, sm90::kBarrierTurn0);  // warpgroup 0 issues first
  int it = 0, q_count = 0;  // KV tiles consumed and work tiles done by this CTA (stages and phases)
  for (int k = 0;; ++k) {
    const int w = work_index(k);
    if (w >= params.num_work) break;
    Tile t;
    if (!tile_at(w, t)) continue;
    const Blocks blocks = blocks_of(t);
    const int num_tiles = blocks.num_tiles();
    const int kv_len = t.kv_len, q_pos0 = t.q_pos0;
    auto stage_of = [&](int j) { return (it + j) % kStages; };
    auto phase_of = [&](int j) { return uint32_t((it + j) / kStages) & 1; };

    auto mask_scores = [&](int i) {
      const int tile_start = blocks.tile_start(i);
      CUTE_UNROLL
      for (int e = 0; e < size(tSrS); ++e) {
        const int key = tile_start + get<1>(tScS(e));
        if (key >= kv_len || !blocks.visible(q_pos0 + get<0>(tScS(e)), key)) tSrS(e) = -INFINITY;
      }
    };
    // V rows past kv_len (only in the last KV tile, walked first) may hold anything; P is 0 there
    // but 0 * NaN is not.
    auto zero_v_tail = [&]() {
      const int valid = kv_len - blocks.tile_start(num_tiles - 1);
      if (valid >= kBlockN) return;
      const int stage = stage_of(0);
      TxBarrier::wait(&storage.v_full[stage], phase_of(0));
      for (int idx = wg_tid; idx < (kBlockN - valid) * (kHeadDim / 8); idx += 128) {
        const int r = valid + idx / (kHeadDim / 8), c = idx % (kHeadDim / 8);
        *reinterpret_cast<uint4*>(&sV(r, c * 8, stage)) = make_uint4(0, 0, 0, 0);
      }
      cutlass::arch::fence_view_async_shared();
      sm90::named_barrier_sync(128, sm90::kBarrierWarpGroup0 + wg);
    };

    clear(tOrO);
    fill(row_max, -INFINITY);
    fill(row_sum, 0.f);
    TxBarrier::wait(&storage.q_full, q_count & 1);

    // KV tile j = 0 (the last one).
    TxBarrier::wait(&storage.k_full[stage_of(0)], phase_of(0));
    sm90::named_barrier_sync(256, sm90::kBarrierTurn0 + wg);
    sm90::gemm<true, -1>(tiled_mma_qk, tSrQ, tSrK(_, _, _, stage_of(0)), tSrS);
    sm90::named_barrier_arrive(256, sm90::kBarrierTurn0 + 1 - wg);
    warpgroup_wait<0>();
    release(&storage.k_empty[stage_of(0)]);
    if (blocks.needs_mask(num_tiles - 1)) mask_scores(num_tiles - 1);
    softmax_update<4>(s_rc, row_max, row_sum, correction, scale_log2);
    convert_into(tSrS, tOrP);

    // One step per KV tile after the first: issue S(j) = Q K(j)^T, rescale O by tile j-1's factor
    // while it runs, issue O += P(j-1) V(j-1), then the softmax of S(j) while that runs. Masked steps
    // (the diagonal and window-edge tiles) and unmasked ones are separate straight-line bodies.
    auto step = [&](auto mask_tag, int j) {
      constexpr bool kMask = decltype(mask_tag)::value;
      const int stage = stage_of(j), prev_stage = stage_of(j - 1);
      TxBarrier::wait(&storage.k_full[stage], phase_of(j));
      sm90::named_barrier_sync(256, sm90::kBarrierTurn0 + wg);
      sm90::gemm<true, -1>(tiled_mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
      rescale_rows(o_rc, correction);
      TxBarrier::wait(&storage.v_full[prev_stage], phase_of(j - 1));
      sm90::gemm<false, -1>(tiled_mma_pv, tOrP, tOrV(_, _, _, prev_stage), tOrO);
      sm90::named_barrier_arrive(256, sm90::kBarrierTurn0 + 1 - wg);
      warpgroup_wait<1>();
      release(&storage.k_empty[stage]);
      if constexpr (kMask) mask_scores(num_tiles - 1 - j);
      softmax_update<4>(s_rc, row_max, row_sum, correction, scale_log2);
      // ptxas hoists the wait for P V above the softmax, which does not depend on it, and so
      // serialises the two; a shared-memory store of a value the whole softmax feeds keeps the
      // softmax in front of the wait (the wait is ordered after earlier memory operations).
      if (wg_tid == 0) {
        float anchor = 0.f;
        CUTE_UNROLL
        for (int r = 0; r < kRowsPerThread; ++r) anchor += row_sum(r);
        *reinterpret_cast<volatile float*>(&storage.softmax_anchor[wg]) = anchor;
      }
      warpgroup_wait<0>();
      release(&storage.v_empty[prev_stage]);
      convert_into(tSrS, tOrP);
    };
    zero_v_tail();
    for (int j = 1; j < num_tiles; ++j) {
      if (blocks.needs_mask(num_tiles - 1 - j)) {
        step(cute::true_type{}, j);
      } else {
        step(cute::false_type{}, j);
      }
    }
    {
      const int last = num_tiles - 1;
      TxBarrier::wait(&storage.v_full[stage_of(last)], phase_of(last));
      rescale_rows(o_rc, correction);
      sm90::gemm<false, 0>(tiled_mma_pv, tOrP, tOrV(_, _, _, stage_of(last)), tOrO);
      release(&storage.v_empty[stage_of(last)]);
    }
    release(&storage.q_empty);  // every S = Q K^T of this tile is done: the producer may load the next Q
    it += num_tiles;
    ++q_count;

    // Epilogue: O / row_sum -> shared (this warpgroup's 64 rows) -> 16-byte rows to global. It runs
    // while the producer loads the next tile's Q and first K/V. sO is reused by the next tile only
    // after that tile's first wgmma, which every thread of the warpgroup joins.
    normalize_rows<4>(o_rc, row_sum);
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
    Element* o_ptr = static_cast<Element*>(p.o) + int64_t(t.qo_head_idx) * p.o_stride_head + chunk * 8;
    CUTE_UNROLL
    for (int r = wg * 64 + wg_tid / kOChunks; r < wg * 64 + 64; r += kORowsPerPass) {
      if (r < t.num_rows) {
        *reinterpret_cast<uint4*>(o_ptr + int64_t(t.q_begin + t.m0 + r) * p.o_stride_token) =
            *reinterpret_cast<const uint4*>(&sO(r, chunk * 8));
      }
    }
  }
  // Balance the turn-taking barrier: warpgroup 1 arrived once more than warpgroup 0 waited.
  if (wg == 0) sm90::named_barrier_sync(256, sm90::kBarrierTurn0);
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
  params.num_m_blocks = (p.max_q_len + Traits::kBlockM - 1) / Traits::kBlockM;
  params.num_work = params.num_m_blocks * p.num_qo_heads * p.num_seqs;
  // Up to kPersistentMaxWaves waves of work tiles, a persistent grid (one CTA per SM, tiles in query
  // tile major order, rounds walked back and forth) overlaps each tile's start with the previous
  // one's end; past that, one CTA per tile in head-major order balances and caches better (the
  // hardware hands the next tile to whichever SM frees first). H200, 32 q / 8 KV heads, d128, one
  // causal sequence (TFLOP/s, one CTA per tile vs persistent): 2K 309 vs 385, 8K 572 vs 601,
  // 16K 570 vs 555, 32K 579 vs 553 (2026-12-03).
  constexpr int kPersistentMaxWaves = 20;
  int device = 0, num_sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const bool persistent = params.num_work <= int64_t(kPersistentMaxWaves) * num_sms;
  params.m_major = persistent ? 1 : 0;
  const int grid = persistent ? std::min(params.num_work, num_sms) : params.num_work;
  kernel<<<grid, Traits::kNThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

// head_dim x block iterator dispatch for one dtype (instantiated in instantiations/).
template <class Element>
cudaError_t prefill_sm90_run(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    constexpr int kBlockN = Sm90PrefillTraits<Element, kHeadDim>::kBlockN;
    if (!p.sparsity.has_window()) {
      return launch_prefill_sm90<Element, kHeadDim, DenseCausalBlocks<kBlockN>>(p, stream);
    }
    return launch_prefill_sm90<Element, kHeadDim, SparseBlocks<kBlockN, false>>(p, stream);
  });
}

}  // namespace lserve::cuda
