// Public launchers: argument checks, the choice between the Hopper and the mma.sync prefill
// kernels, decode split heuristic and workspace, and the dtype dispatch to the per-dtype entry points.
#include <algorithm>

#include "dispatch.cuh"
#include "launchers.h"
#include "tensor_map.h"

namespace lserve::cuda {

namespace {

bool common_args_ok(const AttentionParams& p) {
  if (p.num_kv_heads <= 0 || p.num_qo_heads % p.num_kv_heads != 0 || p.page_size <= 0) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  return true;
}

// The pairings and sizes of AttentionArgs::validate that the host can check without reading device
// memory; the per-sequence values are guarded on the device (KvBlockSparsity).
bool sparsity_ok(const AttentionParams& p) {
  const KvBlockSparsity& sp = p.sparsity;
  if ((sp.window_sink != nullptr) != (sp.window_local != nullptr)) return false;
  if (sp.selection != nullptr && sp.selection_count == nullptr) return false;
  // selection and selection_count come together; a store of capacity 0 may have no pointer.
  if (sp.selection == nullptr && sp.selection_count != nullptr && sp.capacity != 0) return false;
  if ((sp.select_slot != nullptr) != (sp.select_base != nullptr)) return false;
  if (sp.select_slot != nullptr && !sp.has_selection()) return false;
  if (sp.has_selection()) {
    if (sp.num_slots < 0 || sp.capacity < 0) return false;
    if (sp.select_slot == nullptr && sp.num_slots != p.num_seqs) return false;  // one row per sequence
  }
  return true;
}

// The launchers' copy of the params: the block iterator's page arithmetic takes the page size
// from the sparsity params, so callers never set it twice.
AttentionParams with_iterator_fields(const AttentionParams& p) {
  AttentionParams q = p;
  q.sparsity.page_size = p.page_size;
  return q;
}

// The TMA boxes need 16-byte aligned rows and pages that tile a 128-token KV tile in 8-row steps.
bool prefill_sm90_supported(const AttentionParams& p) {
  const bool page_ok = p.page_size % 8 == 0 && (128 % p.page_size == 0 || p.page_size % 128 == 0);
  const bool aligned = reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0 && p.q_stride_head % 8 == 0 &&
                       p.q_stride_token % 8 == 0 && p.kv_stride_head % 8 == 0 && p.kv_stride_token % 8 == 0 &&
                       p.kv_stride_page % 8 == 0;
  return page_ok && aligned && p.num_pages > 0 && tensor_map_encoder() != nullptr;
}

}  // namespace

cudaError_t attention_prefill(const AttentionParams& params, cudaStream_t stream, PrefillImpl impl) {
  if (params.num_seqs == 0) return cudaSuccess;
  if (!common_args_ok(params) || !sparsity_ok(params) || params.max_q_len <= 0) return cudaErrorInvalidValue;
  if (params.sparsity.has_selection()) return cudaErrorInvalidValue;  // decode only
  const AttentionParams p = with_iterator_fields(params);
  bool hopper = false;
  if (impl != PrefillImpl::kSm80) {
    int device = 0, major = 0, minor = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err != cudaSuccess) return err;
#ifdef LSERVE_ATTENTION_NO_SM90
    hopper = false;  // built without an sm_90a target
#else
    hopper = major == 9 && minor == 0 && prefill_sm90_supported(p);
#endif
    if (impl == PrefillImpl::kSm90 && !hopper) return cudaErrorNotSupported;
  }
  return dispatch_dtype(p.dtype, [&](auto element) {
    using Element = decltype(element);
#ifdef LSERVE_ATTENTION_NO_SM90
    return prefill_sm80_run<Element>(p, stream);
#else
    return hopper ? prefill_sm90_run<Element>(p, stream) : prefill_sm80_run<Element>(p, stream);
#endif
  });
}

int decode_max_group_rows() { return 16; }

int decode_num_splits(const AttentionParams& p, int num_sms) {
  // Two CTAs fit an SM (d128: ~100 KB of shared memory, 214 registers x 128 threads each). Fill one
  // wave and no more: on the H100, B=1 32K/128K (8 KV heads) ran at 2.43/2.91 TB/s with 33 splits
  // (264 CTAs), 1.97/2.70 with 66 and 2.04/2.34 with 16 (2026-11-22). Keep >= 256 tokens per split.
  const int64_t ctas = int64_t(std::max(p.num_seqs, 1)) * std::max(p.num_kv_heads, 1);
  const int64_t one_wave = 2 * int64_t(num_sms) / ctas;
  const int64_t max_useful = (int64_t(p.max_kv_len) + 255) / 256;
  return int(std::max<int64_t>(1, std::min<int64_t>({one_wave, max_useful, 256})));
}

size_t decode_workspace_bytes(const AttentionParams& p, int num_splits) {
  if (num_splits <= 1) return 0;
  const size_t rows = size_t(num_splits) * p.num_tokens * p.num_qo_heads;
  const size_t o_bytes = (rows * p.head_dim * sizeof(float) + 15) / 16 * 16;
  return o_bytes + rows * sizeof(float);
}

cudaError_t attention_decode(const AttentionParams& params, int num_splits, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (params.num_seqs == 0) return cudaSuccess;
  if (!common_args_ok(params) || !sparsity_ok(params) || num_splits < 1 || num_splits > 256) {
    return cudaErrorInvalidValue;
  }
  if (params.max_q_len * (params.num_qo_heads / params.num_kv_heads) > decode_max_group_rows()) {
    return cudaErrorInvalidValue;
  }
  const AttentionParams p = with_iterator_fields(params);
  float* partial_o = nullptr;
  float* partial_lse = nullptr;
  if (num_splits > 1) {
    if (workspace == nullptr || workspace_bytes < decode_workspace_bytes(p, num_splits)) return cudaErrorInvalidValue;
    const size_t rows = size_t(num_splits) * p.num_tokens * p.num_qo_heads;
    partial_o = static_cast<float*>(workspace);
    partial_lse = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                           (rows * p.head_dim * sizeof(float) + 15) / 16 * 16);
  }
  return dispatch_dtype(p.dtype, [&](auto element) {
    using Element = decltype(element);
    return decode_run<Element>(p, num_splits, partial_o, partial_lse, stream);
  });
}

}  // namespace lserve::cuda
