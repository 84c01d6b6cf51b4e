// DecodeGraphRunner: capture, buckets and replay of decode-step CUDA graphs (dense or sparse plans).
#include "lserve/model/decode_graphs.h"

namespace lserve {

DecodeGraphRunner::DecodeGraphRunner(Backend& backend, const ModelConfig& config, DType activation_dtype,
                                     const StepLayout& layout, const Tensor& metadata, int page_size, int max_batch,
                                     int max_kv_len)
    : backend_(backend),
      layout_(layout),
      metadata_(metadata),
      max_batch_(max_batch),
      max_kv_len_(max_kv_len),
      max_pages_per_seq_((max_kv_len + page_size - 1) / page_size) {
  LSERVE_CHECK(backend.supports_graphs(), "the ", backend.name(), " backend has no graph capture");
  LSERVE_CHECK(max_batch >= 1 && max_kv_len >= 1, "decode graphs: max_batch and max_kv_len must be >= 1");
  LSERVE_CHECK(max_batch <= layout.max_seqs && max_batch <= layout.max_tokens && max_batch <= layout.max_pages,
               "decode graphs: ", max_batch, " rows do not fit the step layout");
  const int64_t rows = max_batch, hidden = config.hidden_size, head_dim = config.head_dim;
  const int64_t q_width = config.num_qo_heads * head_dim, kv_width = config.num_kv_heads * head_dim;
  residual_ = backend_.empty({rows, hidden}, DType::kF32);
  normed_ = backend_.empty({rows, hidden}, activation_dtype);
  qkv_ = backend_.empty({rows, q_width + 2 * kv_width}, activation_dtype);
  attn_out_ = backend_.empty({rows, q_width}, activation_dtype);
  proj_out_ = backend_.empty({rows, hidden}, activation_dtype);
  gate_up_ = backend_.empty({rows, 2 * config.intermediate_size}, activation_dtype);
  act_ = backend_.empty({rows, config.intermediate_size}, activation_dtype);
  selected_ = backend_.empty({rows, hidden}, activation_dtype);
  logits_ = backend_.empty({rows, config.vocab_size}, DType::kF32);
}

std::vector<int> DecodeGraphRunner::batch_sizes() const {
  std::vector<int> sizes;
  for (const auto& entry : graphs_) sizes.push_back(entry.first);
  return sizes;
}

ForwardBatch DecodeGraphRunner::padded(const ForwardBatch* batch, int bucket) const {
  ForwardBatch out;
  if (batch != nullptr) out = *batch;
  if (out.qo_indptr.empty()) out.qo_indptr.push_back(0);
  if (out.kv_page_indptr.empty()) out.kv_page_indptr.push_back(0);
  for (int64_t row = out.num_seqs(); row < bucket; ++row) {
    out.token_ids.push_back(0);
    out.positions.push_back(0);
    out.slot_mapping.push_back(-1);
    out.kv_page_indices.push_back(0);
    out.qo_indptr.push_back(static_cast<int32_t>(row + 1));
    out.kv_page_indptr.push_back(static_cast<int32_t>(out.kv_page_indices.size()));
    out.kv_lens.push_back(1);
    out.logits_rows.push_back(static_cast<int32_t>(row));
    if (layout_.sparse) {  // streaming heads: no window, a one-page "ring" at page 0; dense selection
      SparsePlan& sp = out.sparse;
      sp.stream_slot_mapping.push_back(-1);
      sp.stream_mirror_mapping.push_back(-1);
      sp.stream_ring.insert(sp.stream_ring.end(), {0, 0, 0, 1});
      sp.window_sink.push_back(0);
      sp.window_local.push_back(0);
      sp.select_mode.push_back(0);
      sp.select_slot.push_back(-1);
      sp.select_base.push_back(1);
    }
  }
  return out;
}

StepTensors DecodeGraphRunner::tensors(int bucket) const {
  StepTensors t;
  // Views sized to the bucket at the block's fixed offsets; the page list spans its reservation.
  layout_.views(layout_.pack(padded(nullptr, bucket)), metadata_, &t, /*full_capacity_pages=*/true);
  auto rows = [bucket](const Tensor& tensor) { return tensor.view().slice(0, 0, bucket); };
  t.residual = rows(residual_);
  t.normed = rows(normed_);
  t.qkv = rows(qkv_);
  t.attn_out = rows(attn_out_);
  t.proj_out = rows(proj_out_);
  t.gate_up = rows(gate_up_);
  t.act = rows(act_);
  t.selected = rows(selected_);
  t.logits = rows(logits_);
  return t;
}

void DecodeGraphRunner::capture(const Enqueue& enqueue) {
  std::vector<int> buckets;
  for (int size : {1, 2, 4}) {
    if (size < max_batch_) buckets.push_back(size);
  }
  for (int size = 8; size < max_batch_; size += 8) buckets.push_back(size);
  buckets.push_back(max_batch_);
  for (auto it = buckets.rbegin(); it != buckets.rend(); ++it) {
    layout_.pack(padded(nullptr, *it)).copy_into(backend_, metadata_);
    enqueue(tensors(*it), 1, max_kv_len_);
  }
  backend_.synchronize();
  for (auto it = buckets.rbegin(); it != buckets.rend(); ++it) {
    const StepTensors t = tensors(*it);
    backend_.begin_capture();
    try {
      enqueue(t, 1, max_kv_len_);
    } catch (...) {
      try {
        backend_.end_capture();
      } catch (...) {
      }
      throw;
    }
    graphs_[*it] = backend_.end_capture();
  }
}

bool DecodeGraphRunner::eligible(const ForwardBatch& batch) const {
  const int64_t num_seqs = batch.num_seqs();
  if (num_seqs == 0 || num_seqs > max_batch_ || graphs_.empty()) return false;
  if (batch.num_tokens() != num_seqs || static_cast<int64_t>(batch.logits_rows.size()) != num_seqs) return false;
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (batch.logits_rows[s] != s || batch.qo_indptr[s + 1] != s + 1) return false;
    if (batch.kv_lens[s] > max_kv_len_ || batch.kv_page_indptr[s + 1] - batch.kv_page_indptr[s] > max_pages_per_seq_) {
      return false;
    }
  }
  return true;
}

TensorView DecodeGraphRunner::replay(const ForwardBatch& batch) {
  const int64_t num_seqs = batch.num_seqs();
  auto it = graphs_.lower_bound(static_cast<int>(num_seqs));
  LSERVE_CHECK(it != graphs_.end(), "no decode graph holds ", num_seqs, " sequences");
  layout_.pack(padded(&batch, it->first)).copy_into(backend_, metadata_);
  backend_.replay_graph(it->second);
  ++num_replays_;
  return logits_.view().slice(0, 0, num_seqs);
}

}  // namespace lserve
