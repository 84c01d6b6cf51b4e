// Paged causal GQA attention kernels: prefill (query chunks) and decode (split-KV + combine).
// Contract: cpp/include/lserve/ops/attention.h. Sequence s owns query rows [qo_indptr[s],
// qo_indptr[s+1]) and kv_lens[s] tokens in pages kv_page_indices[kv_page_indptr[s] ..]; query row i
// of a chunk of q_len rows sits at position kv_len - q_len + i. Dense and block-sparse attention are
// one kernel family: each (query tile, KV head) walks a list of KV tiles given by KvBlockSparsity,
// the contract's sparse policy (block_iterator.cuh). Plain C++: raw device pointers, strides in
// elements, no engine types.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace lserve::cuda {

enum class AttnDType : int32_t { kF16 = 0, kBF16 = 1 };

// Which KV tiles each (query tile, KV head) visits and which keys in them are visible:
// AttentionArgs' sparse policy (cpp/include/lserve/ops/attention.h), field for field, same names and
// meanings; the reference is cpp/src/cpu/attention.cpp. Everything null = dense causal.
// Tiles walked per (sequence s, KV head g), the first rule that applies:
//  1. selection: with a store, sequence s reads slot select_slot[s] (null: slot s). If the slot is
//     >= 0 ("dense" otherwise) and its selection_count[slot, g] is >= 0 ("no selection" otherwise),
//     g walks the stored positions (in the sequence's page list, ascending) that are < base =
//     select_base[s] (null: the page count), then every position in [base, ceil(kv_len / page_size)):
//     the pages made since the selection. Decode only (attention_prefill refuses a store).
//  2. window: window_local[s] > 0: the sink tiles and the local window; tiles wholly outside the
//     Lambda are skipped.
//  3. every causal tile ("dense" and "no selection" read every page, never nothing).
// Visible keys: k <= q, and for a windowed sequence (window_local[s] > 0) the Lambda mask, token-exact:
// k < window_sink[s] or q - k < window_local[s], in whatever tiles are walked (with rule 1 too).
// Device guards where the CPU reference raises (no host readback): a slot >= num_slots is taken as
// dense; a count above capacity reads capacity entries; base is clamped to [0, page count]; a
// negative stored position reads nothing. With stored positions not ascending (the contract broken)
// the pages read are unspecified but in bounds.
struct KvBlockSparsity {
  const int32_t* window_sink = nullptr;      // (num_seqs,) or null (with window_local)
  const int32_t* window_local = nullptr;     // (num_seqs,) or null; <= 0: no window for that sequence
  // With a stream ring the mainloops' page lookups (TMA and cp.async) compute pages (PageTable in
  // kernel_common.cuh) and kv_page_indptr / kv_page_indices are not read.
  const int32_t* stream_ring = nullptr;      // (num_seqs, 4) [sink_base, num_sink, ring_base, num_ring] or null
  const int32_t* selection = nullptr;        // (num_slots, num_kv_heads, capacity) or null (with selection_count)
  const int32_t* selection_count = nullptr;  // (num_slots, num_kv_heads) or null; < 0: no selection
  const int32_t* select_slot = nullptr;      // (num_seqs,) or null: slot s; < 0: dense (with select_base)
  const int32_t* select_base = nullptr;      // (num_seqs,) or null: base = the sequence's page count
  int32_t num_slots = 0;                     // selection.size(0); == num_seqs without select_slot
  int32_t capacity = 0;                      // selection.size(2)
  int32_t page_size = 0;                     // set by the launchers (= AttentionParams::page_size)

  bool has_window() const { return window_local != nullptr; }
  bool has_ring() const { return stream_ring != nullptr; }
  bool has_selection() const { return selection_count != nullptr; }
};

struct AttentionParams {
  AttnDType dtype = AttnDType::kBF16;
  int32_t head_dim = 128;                     // 64 or 128
  int32_t num_qo_heads = 0;
  int32_t num_kv_heads = 0;                   // divides num_qo_heads
  int32_t page_size = 0;                      // tokens per page
  int32_t num_pages = 0;                      // pages in k_cache / v_cache (TMA bounds)
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;                     // qo_indptr[num_seqs], known on the host
  int32_t max_q_len = 0;                      // >= every chunk's q_len (grid size; host-known)
  int32_t max_kv_len = 0;                     // >= every kv_len (split heuristics; host-known)

  const void* q = nullptr;                    // (num_tokens, num_qo_heads, head_dim)
  int64_t q_stride_token = 0, q_stride_head = 0;
  void* o = nullptr;                          // (num_tokens, num_qo_heads, head_dim), q's dtype
  int64_t o_stride_token = 0, o_stride_head = 0;
  const void* k_cache = nullptr;              // (num_pages, page_size, num_kv_heads, head_dim)
  const void* v_cache = nullptr;              // same shape and strides as k_cache
  int64_t kv_stride_page = 0, kv_stride_token = 0, kv_stride_head = 0;  // last dim contiguous

  const int32_t* qo_indptr = nullptr;         // (num_seqs + 1,)
  const int32_t* kv_page_indptr = nullptr;    // (num_seqs + 1,)
  const int32_t* kv_page_indices = nullptr;   // (kv_page_indptr[num_seqs],)
  const int32_t* kv_lens = nullptr;           // (num_seqs,), q_len <= kv_len

  float sm_scale = 0.f;                       // usually 1 / sqrt(head_dim)
  KvBlockSparsity sparsity;
};

// Fills a contiguous-layout AttentionParams' strides (q/o rows contiguous, caches contiguous).
inline void set_contiguous_strides(AttentionParams& p) {
  p.q_stride_head = p.head_dim;
  p.q_stride_token = int64_t(p.num_qo_heads) * p.head_dim;
  p.o_stride_head = p.head_dim;
  p.o_stride_token = int64_t(p.num_qo_heads) * p.head_dim;
  p.kv_stride_head = p.head_dim;
  p.kv_stride_token = int64_t(p.num_kv_heads) * p.head_dim;
  p.kv_stride_page = int64_t(p.page_size) * p.num_kv_heads * p.head_dim;
}

// ---- prefill ----------------------------------------------------------------------------------
// Any chunk lengths (q_len >= 1). Dense or windowed sequences; no selection store (decode only).
// Hopper (sm_90a build, device cc 9.0): wgmma + TMA warp-specialised kernel when page_size is a
// multiple of 8 that divides 128 or is a multiple of 128 and strides are 16-byte aligned; otherwise
// the mma.sync kernel. `impl` forces one: 0 = auto, 1 = mma.sync (SM80 path), 2 = Hopper.
enum class PrefillImpl : int32_t { kAuto = 0, kSm80 = 1, kSm90 = 2 };
cudaError_t attention_prefill(const AttentionParams& params, cudaStream_t stream,
                              PrefillImpl impl = PrefillImpl::kAuto);

// ---- decode -----------------------------------------------------------------------------------
// Small chunks: q_len * (num_qo_heads / num_kv_heads) <= 16 rows per (sequence, KV head); the query
// heads of a GQA group share each KV page read. With num_splits > 1 (at most 256) each (sequence,
// KV head) is split over the KV length into num_splits parts whose partial results a combine kernel
// merges; the workspace then holds decode_workspace_bytes(params, num_splits) bytes (16-byte aligned).
// Dense, windowed and selected sequences (every policy of KvBlockSparsity but the stream ring).
int decode_max_group_rows();  // 16
int decode_num_splits(const AttentionParams& params, int num_sms);  // a heuristic, >= 1
size_t decode_workspace_bytes(const AttentionParams& params, int num_splits);
cudaError_t attention_decode(const AttentionParams& params, int num_splits, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

}  // namespace lserve::cuda
