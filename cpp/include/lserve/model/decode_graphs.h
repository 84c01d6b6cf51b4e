// DecodeGraphRunner: CUDA graphs for decode steps. At start-up it allocates activation buffers
// for max_batch rows and captures one graph per batch-size bucket (1, 2, 4, 8, then multiples of
// 8 up to max_batch) of the model's forward pass over them and the step's metadata block; a decode
// step whose sequences each add one token and sample replays the smallest bucket that holds it,
// after the engine's one metadata packing (StepLayout::pack) of the batch padded to the bucket.
// Padding rows write nothing (slot -1) and attend to one token of page 0; their outputs are unread.
// With sparse attention the plan rides in the same block (page_select reads each row's mode on the
// device), so a replay serves fresh, reused and dense rows alike.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "lserve/backend.h"
#include "lserve/model/config.h"
#include "lserve/model/step.h"

namespace lserve {

class DecodeGraphRunner {
 public:
  // enqueue(t, max_q_len, max_kv_len): the model's whole forward pass on t (no allocation, copy or
  // synchronisation). metadata: the step block laid out by `layout`, shared with eager steps.
  using Enqueue = std::function<void(const StepTensors&, int32_t, int32_t)>;
  DecodeGraphRunner(Backend& backend, const ModelConfig& config, DType activation_dtype, const StepLayout& layout,
                    const Tensor& metadata, int page_size, int max_batch, int max_kv_len);

  // Runs every bucket once eagerly on an all-padding batch (kernel loading, cuBLASLt's choice and
  // the attention workspace settle), then captures each, largest first.
  void capture(const Enqueue& enqueue);
  // A batch of single-token sequences that all sample, within the captured sizes.
  bool eligible(const ForwardBatch& batch) const;
  // Packs the batch padded to its bucket into the metadata block, replays, returns its logits rows.
  TensorView replay(const ForwardBatch& batch);

  std::vector<int> batch_sizes() const;
  int64_t num_replays() const { return num_replays_; }

 private:
  ForwardBatch padded(const ForwardBatch* batch, int bucket) const;
  StepTensors tensors(int bucket) const;

  Backend& backend_;
  StepLayout layout_;
  Tensor metadata_;
  int max_batch_, max_kv_len_, max_pages_per_seq_;
  Tensor residual_, normed_, qkv_, attn_out_, proj_out_, gate_up_, act_, selected_, logits_;
  std::map<int, std::shared_ptr<void>> graphs_;
  int64_t num_replays_ = 0;
};

}  // namespace lserve
