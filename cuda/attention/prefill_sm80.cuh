// Prefill attention, mma.sync (SM80 tensor cores) with CuTe; runs on sm_80 and later.
// Work mapping: one CTA per (query tile of kBlockM rows, query head, sequence); 4 warps split the
// tile's rows (32 each). The CTA walks the KV tiles its block iterator yields, last first, gathering
// each kBlockN x head_dim K/V tile from the paged cache with 16-byte cp.async (one page-table lookup
// per row), S = Q K^T and O += P V on tensor cores with fp32 accumulation and an online softmax.
// Single K and V buffers: the V load overlaps Q K^T, the next K load overlaps softmax and P V.
// Floor (H100, d128 causal, 32K): 2*2*32*128*32K^2/2 FLOP = 8.8 TFLOP; mma.sync peaks near 660
// TFLOP/s on H100, so >= 13 ms; the Hopper kernel (prefill_sm90.cuh) is the fast path.
#pragma once

#include <cute/tensor.hpp>

#include "block_iterator.cuh"
#include "dispatch.cuh"
#include "kernel_common.cuh"

namespace lserve::cuda {

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct Sm80PrefillTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_, kNThreads = 32 * kNWarps;
  using MmaOp = std::conditional_t<std::is_same_v<Element, cute::bfloat16_t>,
                                   cute::SM80_16x8x16_F32BF16BF16F32_TN, cute::SM80_16x8x16_F32F16F16F32_TN>;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaOp>, cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;
  // 128-byte rows of 8 x 16-byte chunks, chunk index XOR row % 8: ldmatrix and cp.async conflict-free.
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V seen as (head_dim, kBlockN): the B operand of O = P V.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));
  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = cute::Copy_Atom<cute::DefaultCopy, Element>;

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 128> q;  // (kBlockM, head_dim), then O
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 128> k;  // (kBlockN, head_dim)
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutKV>, 128> v;  // (kBlockN, head_dim)
  };
};

// acc += A B^T over the K mode, A and B both read from shared memory one k-block ahead.
template <class Acc, class TrA, class TrB, class TsA, class TsB, class TiledMma, class CopyA, class CopyB,
          class ThrCopyA, class ThrCopyB>
__device__ __forceinline__ void gemm_ss_sm80(Acc& acc, TrA& tCrA, TrB& tCrB, const TsA& tCsA, const TsB& tCsB,
                                             TiledMma& tiled_mma, const CopyA& copy_a, const CopyB& copy_b,
                                             const ThrCopyA& thr_copy_a, const ThrCopyB& thr_copy_b) {
  using namespace cute;
  Tensor tCrA_view = thr_copy_a.retile_D(tCrA);
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
  copy(copy_a, tCsA(_, _, 0), tCrA_view(_, _, 0));
  copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) {
      copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
      copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    }
    gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers, B read from shared memory one k-block ahead.
template <class Acc, class TrA, class TrB, class TsB, class TiledMma, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_rs_sm80(Acc& acc, const TrA& tCrA, TrB& tCrB, const TsB& tCsB,
                                             TiledMma& tiled_mma, const CopyB& copy_b, const ThrCopyB& thr_copy_b) {
  using namespace cute;
  Tensor tCrB_view = thr_copy_b.retile_D(tCrB);
  copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    gemm(tiled_mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

template <class Traits, class Blocks>
__global__ void __launch_bounds__(Traits::kNThreads) prefill_sm80_kernel(const AttentionParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  extern __shared__ __align__(128) char smem_raw[];
  auto& storage = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  // Longest query tiles first: causal work grows with the tile index.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int qo_head_idx = blockIdx.y, seq_idx = blockIdx.z;
  const int q_begin = p.qo_indptr[seq_idx];
  const int q_len = p.qo_indptr[seq_idx + 1] - q_begin;
  const int m0 = m_block * kBlockM;
  if (m0 >= q_len) return;
  const int kv_len = p.kv_lens[seq_idx];
  const int kv_head_idx = qo_head_idx / (p.num_qo_heads / p.num_kv_heads);
  const int num_rows = min(kBlockM, q_len - m0);
  const int q_pos0 = kv_len - q_len + m0;  // position of the tile's row 0
  const Blocks blocks(p.sparsity, p.num_kv_heads, seq_idx, kv_head_idx, q_pos0, q_pos0 + num_rows - 1, kv_len);
  const int num_tiles = blocks.num_tiles();
  const PageTable page_table = PageTable::of(p, seq_idx);
  const Element* k_cache = static_cast<const Element*>(p.k_cache);
  const Element* v_cache = static_cast<const Element*>(p.v_cache);
  const int tid = threadIdx.x;

  Tensor sQ = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQ{});  // (kBlockM, D)
  Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutKV{});  // (kBlockN, D)
  Tensor sV = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutKV{});  // (kBlockN, D)
  Tensor sVt = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVt{});  // (D, kBlockN)
  Tensor sVtNoSwizzle = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVtNoSwizzle{});

  // Global -> shared: thread tid moves 16-byte chunk tid % kChunks of rows tid / kChunks + j * kRowsPerPass.
  constexpr int kChunks = kHeadDim / 8, kRowsPerPass = kNThreads / kChunks;
  constexpr int kKvRowsPerThread = kBlockN / kRowsPerPass;
  static_assert(kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0);
  const int chunk = tid % kChunks, row_base = tid / kChunks;
  {
    const Element* q_ptr = static_cast<const Element*>(p.q) + int64_t(qo_head_idx) * p.q_stride_head + chunk * 8;
    CUTE_UNROLL
    for (int j = 0; j < kBlockM / kRowsPerPass; ++j) {
      const int r = row_base + j * kRowsPerPass;
      const bool valid = r < num_rows;
      cp_async_16(&sQ(r, chunk * 8), valid ? q_ptr + int64_t(q_begin + m0 + r) * p.q_stride_token : q_ptr, valid);
    }
  }
  const int64_t head_offset = int64_t(kv_head_idx) * p.kv_stride_head + chunk * 8;
  // Rows of tile i of K or V; offsets are recomputed per load (page-table reads hit L1) so that no
  // 64-bit offsets stay live across the GEMMs.
  auto load_kv = [&](auto& sX, const Element* cache, int i) {
    CUTE_UNROLL
    for (int j = 0; j < kKvRowsPerThread; ++j) {
      const int r = row_base + j * kRowsPerPass;
      const int pos = blocks.kv_pos(i, r);
      const int64_t offset =
          pos < 0 ? 0 : kv_row_offset(page_table, pos, p.page_size, p.kv_stride_page, p.kv_stride_token, head_offset);
      cp_async_16(&sX(r, chunk * 8), cache + offset, pos >= 0);
    }
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);             // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_mma.partition_fragment_B(sK);             // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);  // (MMA, MMA_D, MMA_K)
  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_q = smem_copy_q.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_copy_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_k = smem_copy_k.get_thread_slice(tid);
  Tensor tSsK = smem_thr_copy_k.partition_S(sK);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto smem_thr_copy_v = smem_copy_v.get_thread_slice(tid);
  Tensor tOsVt = smem_thr_copy_v.partition_S(sVt);

  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), acc_layout_rowcol(acc_o.layout()));  // (rows, columns)
  constexpr int kRowsPerThread = decltype(size<0>(o_rc))::value;
  Tensor row_max = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  Tensor row_sum = make_tensor<float>(Shape<Int<kRowsPerThread>>{});
  fill(row_max, -INFINITY);
  fill(row_sum, 0.f);
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);  // (row, column) of each score this thread holds
  const float scale_log2 = p.sm_scale * kLog2e;

  if (num_tiles > 0) load_kv(sK, k_cache, num_tiles - 1);
  cp_async_commit();

  for (int i = num_tiles - 1; i >= 0; --i) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K(i) landed; every warp is done with V(i+1)
    load_kv(sV, v_cache, i);
    cp_async_commit();
    gemm_ss_sm80(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_copy_k, smem_thr_copy_q,
                 smem_thr_copy_k);
    if (blocks.needs_mask(i)) {
      CUTE_UNROLL
      for (int e = 0; e < size(acc_s); ++e) {
        const int k = blocks.kv_pos(i, get<1>(tScS(e)));
        if (k < 0 || !blocks.visible(q_pos0 + get<0>(tScS(e)), k)) acc_s(e) = -INFINITY;
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // V(i) landed; every warp is done with K(i)
    if (i > 0) {
      load_kv(sK, k_cache, i - 1);
      cp_async_commit();
    }
    Tensor s_rc = make_tensor(acc_s.data(), acc_layout_rowcol(acc_s.layout()));
    online_softmax_step<4>(s_rc, o_rc, row_max, row_sum, scale_log2);
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_layout_to_a_sm80(rP.layout()));
    gemm_rs_sm80(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_copy_v, smem_thr_copy_v);
  }

  // Epilogue: O / row_sum -> shared (the Q buffer) -> 16-byte rows to global.
  normalize_rows<4>(o_rc, row_sum);
  Tensor rO = convert_fragment<Element>(acc_o);
  __syncthreads();  // every warp is done reading sQ
  auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr_copy_o = smem_copy_o.get_thread_slice(tid);
  copy(smem_copy_o, smem_thr_copy_o.retile_S(rO), smem_thr_copy_o.partition_D(sQ));
  __syncthreads();
  Element* o_ptr = static_cast<Element*>(p.o) + int64_t(qo_head_idx) * p.o_stride_head + chunk * 8;
  CUTE_UNROLL
  for (int j = 0; j < kBlockM / kRowsPerPass; ++j) {
    const int r = row_base + j * kRowsPerPass;
    if (r < num_rows) {
      *reinterpret_cast<uint4*>(o_ptr + int64_t(q_begin + m0 + r) * p.o_stride_token) =
          *reinterpret_cast<const uint4*>(&sQ(r, chunk * 8));
    }
  }
}

template <class Element, int kHeadDim, class Blocks>
cudaError_t launch_prefill_sm80(const AttentionParams& p, cudaStream_t stream) {
  using Traits = Sm80PrefillTraits<Element, kHeadDim, 128, 64, 4>;
  const int smem_bytes = int(sizeof(typename Traits::SharedStorage));
  auto kernel = prefill_sm80_kernel<Traits, Blocks>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.max_q_len + Traits::kBlockM - 1) / Traits::kBlockM, p.num_qo_heads, p.num_seqs);
  kernel<<<grid, Traits::kNThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// head_dim x block iterator dispatch for one dtype (instantiated in instantiations/).
template <class Element>
cudaError_t prefill_sm80_run(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    constexpr int kBlockN = 64;
    if (!p.sparsity.has_window()) {
      return launch_prefill_sm80<Element, kHeadDim, DenseCausalBlocks<kBlockN>>(p, stream);
    }
    return launch_prefill_sm80<Element, kHeadDim, SparseBlocks<kBlockN, false>>(p, stream);
  });
}

}  // namespace lserve::cuda
