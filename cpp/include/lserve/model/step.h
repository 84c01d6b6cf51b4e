// One forward step's metadata: the host batch the engine plans (ForwardBatch, with the page
// selector's SparsePlan), its one packing into a device block of fixed layout (StepLayout: every
// array at the capacity set at start-up, so eager steps and CUDA-graph replays share one block
// and one packing), and the device views a forward pass runs on (StepTensors).
#pragma once

#include <cstdint>
#include <vector>

#include "lserve/kv/page_selector.h"
#include "lserve/packed_upload.h"

namespace lserve {

// One step's batch, host-side metadata (copied to the device in one copy).
struct ForwardBatch {
  std::vector<int32_t> token_ids;        // (num_tokens,)
  std::vector<int32_t> positions;        // (num_tokens,)
  std::vector<int64_t> slot_mapping;     // (num_tokens,)
  std::vector<int32_t> qo_indptr;        // (num_seqs + 1,)
  std::vector<int32_t> kv_page_indptr;   // (num_seqs + 1,)
  std::vector<int32_t> kv_page_indices;  // (kv_page_indptr.back(),) the page lists, shared by every layer
  std::vector<int32_t> kv_lens;          // (num_seqs,)
  std::vector<int32_t> logits_rows;      // (num_logits,) rows whose logits are returned
  SparsePlan sparse;                     // sparse attention only (PageSelector::plan_chunk)

  int64_t num_tokens() const { return static_cast<int64_t>(token_ids.size()); }
  int64_t num_seqs() const { return static_cast<int64_t>(kv_lens.size()); }
  void clear();
};

// Device views of one forward pass: metadata (into the step's block) and activations.
struct StepTensors {
  TensorView token_ids, positions, slot_mapping, qo_indptr, kv_page_indptr, kv_page_indices, kv_lens, logits_rows;
  TensorView residual, normed, qkv, attn_out, proj_out, gate_up, act, selected, logits;
  // Sparse attention (SparsePlan, same names).
  TensorView stream_slot_mapping, stream_mirror_mapping, stream_ring, window_sink, window_local, select_mode,
      select_slot, select_base;
};

// The fixed layout of a step's metadata block: each array at its capacity, in StepArray order.
struct StepLayout {
  int64_t max_tokens = 0, max_seqs = 0, max_pages = 0;
  bool sparse = false;

  // Packs `batch` (which must fit the capacities) in this layout.
  PackedUpload pack(const ForwardBatch& batch) const;
  // The metadata views of a block packed for `batch`, sized to it; with full_capacity the page list
  // spans its whole reservation (graphs, whose page lists change between replays).
  void views(const PackedUpload& packed, const Tensor& block, StepTensors* t, bool full_capacity_pages = false) const;
  // Bytes of the block (every reservation).
  int64_t num_bytes() const;
};

}  // namespace lserve
