// StepLayout: the one packing of a step's metadata, shared by eager steps and graph replays.
#include "lserve/model/step.h"

namespace lserve {

namespace {

// Array order in the block. The page list goes last: copy_into sends the bytes up to the end of
// the last array's values, so the largest reservation costs nothing when it is mostly empty.
enum StepArray {
  kTokenIds, kPositions, kSlotMapping, kQoIndptr, kKvPageIndptr, kKvLens, kLogitsRows,
  kStreamSlots, kStreamMirror, kStreamRing, kWindowSink, kWindowLocal, kSelectMode, kSelectSlot, kSelectBase,
  kKvPageIndices,
};

}  // namespace

void ForwardBatch::clear() {
  token_ids.clear();
  positions.clear();
  slot_mapping.clear();
  qo_indptr.clear();
  kv_page_indptr.clear();
  kv_page_indices.clear();
  kv_lens.clear();
  logits_rows.clear();
  sparse.clear();
}

PackedUpload StepLayout::pack(const ForwardBatch& b) const {
  const int64_t num_tokens = b.num_tokens(), num_seqs = b.num_seqs();
  LSERVE_CHECK(num_tokens <= max_tokens && num_seqs <= max_seqs &&
                   static_cast<int64_t>(b.kv_page_indices.size()) <= max_pages,
               "step of ", num_tokens, " tokens, ", num_seqs, " sequences and ", b.kv_page_indices.size(),
               " pages exceeds the step capacity (", max_tokens, ", ", max_seqs, ", ", max_pages, ")");
  LSERVE_CHECK(b.positions.size() == b.token_ids.size() && b.slot_mapping.size() == b.token_ids.size() &&
                   b.qo_indptr.size() == b.kv_lens.size() + 1 && b.kv_page_indptr.size() == b.kv_lens.size() + 1,
               "forward batch metadata is inconsistent");
  const SparsePlan& sp = b.sparse;
  if (sparse) {
    LSERVE_CHECK(static_cast<int64_t>(sp.stream_slot_mapping.size()) == num_tokens &&
                     static_cast<int64_t>(sp.stream_mirror_mapping.size()) == num_tokens &&
                     static_cast<int64_t>(sp.stream_ring.size()) == 4 * num_seqs &&
                     static_cast<int64_t>(sp.window_sink.size()) == num_seqs &&
                     static_cast<int64_t>(sp.window_local.size()) == num_seqs &&
                     static_cast<int64_t>(sp.select_mode.size()) == num_seqs &&
                     static_cast<int64_t>(sp.select_slot.size()) == num_seqs &&
                     static_cast<int64_t>(sp.select_base.size()) == num_seqs,
                 "forward batch: the sparse plan does not match the batch");
  }
  PackedUpload pack;
  pack.add(b.token_ids, DType::kI32, max_tokens);
  pack.add(b.positions, DType::kI32, max_tokens);
  pack.add(b.slot_mapping, DType::kI64, max_tokens);
  pack.add(b.qo_indptr, DType::kI32, max_seqs + 1);
  pack.add(b.kv_page_indptr, DType::kI32, max_seqs + 1);
  pack.add(b.kv_lens, DType::kI32, max_seqs);
  pack.add(b.logits_rows, DType::kI32, max_seqs);
  const int64_t sparse_tokens = sparse ? max_tokens : 0, sparse_seqs = sparse ? max_seqs : 0;
  pack.add(sp.stream_slot_mapping, DType::kI64, sparse_tokens);
  pack.add(sp.stream_mirror_mapping, DType::kI64, sparse_tokens);
  pack.add(sp.stream_ring, DType::kI32, 4 * sparse_seqs);
  pack.add(sp.window_sink, DType::kI32, sparse_seqs);
  pack.add(sp.window_local, DType::kI32, sparse_seqs);
  pack.add(sp.select_mode, DType::kI32, sparse_seqs);
  pack.add(sp.select_slot, DType::kI32, sparse_seqs);
  pack.add(sp.select_base, DType::kI32, sparse_seqs);
  pack.add(b.kv_page_indices, DType::kI32, max_pages);
  return pack;
}

int64_t StepLayout::num_bytes() const {
  ForwardBatch empty;
  empty.qo_indptr.push_back(0);
  empty.kv_page_indptr.push_back(0);
  return pack(empty).num_bytes();
}

void StepLayout::views(const PackedUpload& packed, const Tensor& block, StepTensors* t, bool full_capacity_pages) const {
  t->token_ids = packed.view(kTokenIds, block);
  t->positions = packed.view(kPositions, block);
  t->slot_mapping = packed.view(kSlotMapping, block);
  t->qo_indptr = packed.view(kQoIndptr, block);
  t->kv_page_indptr = packed.view(kKvPageIndptr, block);
  t->kv_lens = packed.view(kKvLens, block);
  t->logits_rows = packed.view(kLogitsRows, block);
  t->kv_page_indices = packed.view(kKvPageIndices, block, full_capacity_pages);
  if (!sparse) return;
  t->stream_slot_mapping = packed.view(kStreamSlots, block);
  t->stream_mirror_mapping = packed.view(kStreamMirror, block);
  TensorView ring = packed.view(kStreamRing, block);
  t->stream_ring = TensorView(ring.data, DType::kI32, {ring.size(0) / 4, 4}, ring.device);
  t->window_sink = packed.view(kWindowSink, block);
  t->window_local = packed.view(kWindowLocal, block);
  t->select_mode = packed.view(kSelectMode, block);
  t->select_slot = packed.view(kSelectSlot, block);
  t->select_base = packed.view(kSelectBase, block);
}

}  // namespace lserve
