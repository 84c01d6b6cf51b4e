// Device helpers shared by the attention kernels: element types, 16-byte cp.async with zero fill,
// fragment layout views for mma.sync/wgmma accumulators, quad reductions, and the paged-KV row
// address (page table lookup). Header-only; no engine types.
#pragma once

#include <cstdint>
#include <cfloat>

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "attention_kernels.h"

namespace lserve::cuda {

template <AttnDType kDType> struct ElementOf;
template <> struct ElementOf<AttnDType::kBF16> { using type = cute::bfloat16_t; };
template <> struct ElementOf<AttnDType::kF16> { using type = cute::half_t; };

constexpr float kLog2e = 1.4426950408889634f;

// 16-byte global -> shared copy; when !pred the 16 bytes are zero-filled and src is not read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// A sequence's pages: its page list, or with a stream ring (ops/attention.h) the arithmetic
// sink_base + i below num_sink, ring_base + (i - num_sink) % num_ring after (no table that grows).
struct PageTable {
  const int32_t* table;  // the page list, or null with a ring
  int sink_base, num_sink, ring_base, num_ring;

  __device__ __forceinline__ static PageTable of(const AttentionParams& p, int seq_idx) {
    if (p.sparsity.stream_ring == nullptr) return PageTable{p.kv_page_indices + p.kv_page_indptr[seq_idx], 0, 0, 0, 1};
    const int32_t* ring = p.sparsity.stream_ring + 4 * seq_idx;
    return PageTable{nullptr, __ldg(ring), __ldg(ring + 1), __ldg(ring + 2), max(__ldg(ring + 3), 1)};
  }
  __device__ __forceinline__ int page(int page_idx) const {
    if (table != nullptr) return __ldg(table + page_idx);
    return page_idx < num_sink ? sink_base + page_idx : ring_base + (page_idx - num_sink) % num_ring;
  }
};

// Element offset of KV row `pos` of KV head `kv_head_idx` through the sequence's pages.
__device__ __forceinline__ int64_t kv_row_offset(const PageTable& pages, int pos, int page_size,
                                                 int64_t stride_page, int64_t stride_token,
                                                 int64_t head_offset) {
  const int page_idx = pos / page_size;
  const int in_page = pos - page_idx * page_size;
  return int64_t(pages.page(page_idx)) * stride_page + int64_t(in_page) * stride_token + head_offset;
}

template <int kWidth>
__device__ __forceinline__ float group_allreduce_max(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}
template <int kWidth>
__device__ __forceinline__ float group_allreduce_sum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// mma.sync m16n8 (SM80) accumulators have mode 0 = (2 columns, 2 row halves); wgmma (SM90) ones
// (2 columns, 2 row halves, N / 8 column groups). View ((...), MMA_M, MMA_N) as (rows, columns).
template <class Layout>
__host__ __device__ constexpr auto acc_layout_rowcol(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank(acc))::value == 3);
  if constexpr (decltype(rank<0>(acc))::value == 2) {
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
  } else {
    static_assert(decltype(rank<0>(acc))::value == 3);
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                       make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
  }
}

// SM80: two m16n8 accumulator tiles side by side form one m16n8k16 A fragment (same thread
// ownership, 16-bit elements): ((2, 2), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, MMA_N / 2).
template <class Layout>
__host__ __device__ constexpr auto acc_layout_to_a_sm80(Layout acc) {
  using namespace cute;
  static_assert(decltype(size<0>(acc))::value == 4);
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (.., .., (2, N/2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Online softmax over one tile of scores (rows x columns view): updates the row max and sum, turns
// the scores into unnormalised probabilities and returns in `correction` the factor the running O
// must be scaled by. kQuad threads share a row.
template <int kQuad, class TS, class TM, class TL, class TC>
__device__ __forceinline__ void softmax_update(TS& s, TM& row_max, TL& row_sum, TC& correction, float scale_log2) {
  using namespace cute;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    float mx = row_max(r);
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) mx = fmaxf(mx, s(r, c));
    mx = group_allreduce_max<kQuad>(mx);
    const float m_scaled = (mx == -INFINITY ? 0.f : mx) * scale_log2;
    correction(r) = fast_exp2(row_max(r) * scale_log2 - m_scaled);  // 0 while row_max is -inf
    row_max(r) = mx;
    float sum = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) {
      const float e = fast_exp2(s(r, c) * scale_log2 - m_scaled);
      s(r, c) = e;
      sum += e;
    }
    row_sum(r) = row_sum(r) * correction(r) + sum;
  }
}

template <class TO, class TC>
__device__ __forceinline__ void rescale_rows(TO& o, const TC& correction) {
  using namespace cute;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(o); ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= correction(r);
  }
}

template <int kQuad, class TS, class TO, class TM, class TL>
__device__ __forceinline__ void online_softmax_step(TS& s, TO& o, TM& row_max, TL& row_sum, float scale_log2) {
  using namespace cute;
  Tensor correction = make_tensor<float>(Shape<Int<decltype(size<0>(s))::value>>{});
  softmax_update<kQuad>(s, row_max, row_sum, correction, scale_log2);
  rescale_rows(o, correction);
}

// Final normalisation: O /= row sum (summed over the kQuad threads of a row); empty rows give 0.
template <int kQuad, class TO, class TL>
__device__ __forceinline__ void normalize_rows(TO& o, const TL& row_sum) {
  using namespace cute;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(o); ++r) {
    const float sum = group_allreduce_sum<kQuad>(row_sum(r));
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv;
  }
}

// SM90: the wgmma accumulator of S (((2, 2, N / 8), MMA_M, MMA_N)) as the register A operand of
// the P V wgmma (((2, 2, 2), MMA_M, N / 16)): two adjacent 8-column groups form one k16 block.
template <class Layout>
__host__ __device__ constexpr auto acc_layout_to_a_sm90(Layout acc) {
  using namespace cute;
  static_assert(decltype(rank<0>(acc))::value == 3);
  auto l = logical_divide(get<0, 2>(acc), Shape<_2>{});  // ((2, N / 16))
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0, 0>(l)), get<1>(acc),
                     coalesce(make_layout(get<0, 1>(l), get<2>(acc))));
}

template <class To, class Engine, class Layout>
__device__ __forceinline__ auto convert_fragment(const cute::Tensor<Engine, Layout>& t) {
  using namespace cute;
  using From = typename Engine::value_type;
  constexpr int kN = decltype(size(t))::value;
  auto in = *reinterpret_cast<const cutlass::Array<From, kN>*>(t.data());
  cutlass::NumericArrayConverter<To, From, kN> convert;
  auto out = convert(in);
  Tensor result = make_tensor<To>(t.layout());
  *reinterpret_cast<cutlass::Array<To, kN>*>(result.data()) = out;
  return result;
}

// dst = src converted element by element, written as whole registers: both fragments hold the same
// number of elements in the same storage order (dst may have another layout over that storage).
// Copying element by element instead makes the compiler shuffle 16-bit halves between registers.
template <class EngineS, class LayoutS, class EngineD, class LayoutD>
__device__ __forceinline__ void convert_into(const cute::Tensor<EngineS, LayoutS>& src, cute::Tensor<EngineD, LayoutD>& dst) {
  using namespace cute;
  using From = typename EngineS::value_type;
  using To = typename EngineD::value_type;
  constexpr int kN = decltype(size(src))::value;
  static_assert(kN == decltype(size(dst))::value);
  cutlass::NumericArrayConverter<To, From, kN> convert;
  *reinterpret_cast<cutlass::Array<To, kN>*>(dst.data()) = convert(*reinterpret_cast<const cutlass::Array<From, kN>*>(src.data()));
}

}  // namespace lserve::cuda
