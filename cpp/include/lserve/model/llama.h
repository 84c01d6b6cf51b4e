// LlamaModel: the Llama-family decoder (Llama, Mistral, Qwen2) as a sequence of Backend ops.
// Weights are allocated once at construction in their fused serving layout (q|k|v rows in one
// matrix, gate|up rows in one matrix) and filled by load_weight() under Hugging Face names.
// forward() runs one scheduled batch: embed -> layers (norm, qkv, rope + KV append, paged
// attention, o_proj, norm, gate_up, silu_mul, down) -> final norm -> logits of chosen rows.
// The residual stream is float32; the activations between GEMMs use the backend's activation
// dtype (float32 on the CPU, the weight dtype on CUDA); logits are float32.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "lserve/backend.h"
#include "lserve/model/config.h"
#include "lserve/packed_upload.h"
#include "lserve/sparsity.h"

namespace lserve {

// One step's batch, host-side metadata (copied to the device by forward()).
struct ForwardBatch {
  std::vector<int32_t> token_ids;        // (num_tokens,)
  std::vector<int32_t> positions;        // (num_tokens,)
  std::vector<int64_t> slot_mapping;     // (num_tokens,)
  std::vector<int32_t> qo_indptr;        // (num_seqs + 1,)
  std::vector<int32_t> kv_page_indptr;   // (num_seqs + 1,)
  std::vector<int32_t> kv_page_indices;  // (kv_page_indptr.back(),)
  std::vector<int32_t> kv_lens;          // (num_seqs,)
  std::vector<int32_t> logits_rows;      // (num_logits,) rows whose logits are returned

  // Sparse attention only (LlamaModel::set_sparsity with enabled = true); per token, then per sequence.
  std::vector<int64_t> stream_slot_mapping;   // (num_tokens,) slots in the streaming-head cache
  std::vector<int32_t> stream_page_indptr;    // (num_seqs + 1,)
  std::vector<int32_t> stream_page_indices;   // logical page -> streaming-cache page, per sequence
  std::vector<int32_t> window_sink;           // (num_seqs,) Lambda mask of the streaming heads
  std::vector<int32_t> window_local;          // (num_seqs,)
  std::vector<int32_t> seq_slots;             // (num_seqs,) slot holding the sequence's page selection
  std::vector<uint8_t> select_mode;           // (num_seqs,) SelectMode of the dense heads
  std::vector<int32_t> select_base_pages;     // (num_seqs,) pages when the reused selection was made
};

// How the dense heads of one sequence read the cache this step.
enum SelectMode : uint8_t {
  kSelectDense = 0,  // every page (prefill chunks, contexts within the budget)
  kSelectFresh = 1,  // score pages now and keep the selection in the sequence's slot
  kSelectReuse = 2,  // the slot's selection plus every page created since it was made
};

class LlamaModel {
 public:
  // max_positions: rows of the rotary table (the engine passes max_model_len).
  LlamaModel(const ModelConfig& config, Backend& backend, DType weight_dtype, int max_positions);

  const ModelConfig& config() const { return config_; }
  DType activation_dtype() const { return activation_dtype_; }
  // Peak bytes of the per-step buffers forward() allocates for num_tokens tokens and num_logits
  // sampled rows (what a device must keep free beside weights and KV cache).
  int64_t activation_bytes(int64_t num_tokens, int64_t num_logits) const;
  // Copies a Hugging Face-named tensor (any float dtype, host or device) into place; raises on
  // an unknown name, a wrong shape, or a tensor loaded twice.
  void load_weight(const std::string& name, const TensorView& tensor);
  // Names still missing; finalize() raises listing them.
  std::vector<std::string> missing_weights() const;
  void finalize();
  static std::vector<std::string> weight_names(const ModelConfig& config);

  // Sparse attention. Must come before the first load_weight(): it reorders each layer's KV heads
  // (dense heads first, then streaming heads; query heads and o_proj columns follow their groups)
  // so that each kind is a contiguous range of heads.
  void set_sparsity(const SparsityConfig& sparsity);
  const SparsityConfig& sparsity() const { return sparsity_; }
  int num_dense_kv_heads(int layer_idx) const { return layers_[layer_idx].num_dense_kv; }
  // Original KV head index of serving position `position` in layer `layer_idx`.
  int kv_head_order(int layer_idx, int position) const { return layers_[layer_idx].kv_order[position]; }

  // Allocates the per-layer paged caches of the dense heads: (num_pages, page_size, num_dense_kv_heads,
  // head_dim) each, plus (with sparsity) the kmax/kmin statistics per logical page.
  void allocate_kv_cache(int num_pages, int page_size, DType kv_cache_dtype);
  // Bytes per token of the dense heads' cache (keys, values, and kmax/kmin with sparsity).
  int64_t kv_bytes_per_token(DType kv_cache_dtype) const;
  // Streaming heads (sparsity only): their cache of num_pages pages, and `num_slots` page selections.
  void allocate_streaming_cache(int num_pages, int page_size, DType kv_cache_dtype, int num_slots);
  int64_t streaming_bytes_per_token(DType kv_cache_dtype) const;
  // Pages read by the dense heads' attention in the last forward() (summed over layers and heads), and
  // pages they would have read densely: selection statistics for metrics.
  int64_t last_pages_selected() const { return last_pages_selected_; }
  int64_t last_pages_total() const { return last_pages_total_; }

  // Returns the logits of batch.logits_rows, (num_logits, vocab_size) float32 on the host.
  std::vector<float> forward(const ForwardBatch& batch);
  // The same logits left on the backend's device, valid until the next forward (empty without rows).
  TensorView forward_logits(const ForwardBatch& batch);

  // CUDA graphs for decode steps (backends with supports_graphs(), dense attention, no attention
  // bias): captures one graph per batch-size bucket (1, 2, 4, 8, then multiples of 8 up to
  // max_batch) over persistent buffers; afterwards forward() replays the smallest bucket that
  // holds a batch of single-token sequences that all sample, padding the rest, and runs every
  // other batch eagerly. max_kv_len bounds the sequences a replay serves (the attention's split
  // count is fixed at capture for it).
  void capture_decode_graphs(int max_batch, int max_kv_len);
  std::vector<int> decode_graph_batch_sizes() const;
  int64_t num_graph_replays() const { return num_graph_replays_; }

 private:
  struct Slot {  // where a Hugging Face tensor lands
    Tensor* tensor;
    int64_t row_offset;
    std::vector<int64_t> shape;
  };
  struct Layer {
    Tensor input_norm, qkv_weight, qkv_bias, o_weight, post_norm, gate_up_weight, down_weight;
    Tensor k_cache, v_cache;    // dense heads
    Tensor kmax, kmin;          // dense heads' statistics per logical page (sparsity)
    Tensor ks_cache, vs_cache;  // streaming heads (sparsity)
    int num_dense_kv = 0;
    std::vector<int> kv_order;  // serving position -> original KV head
    // Page selections per slot (host): positions in the page list, num_select per (slot, dense head).
    std::vector<int32_t> selection;
    std::vector<int32_t> selection_count;
  };

  // Device tensors of one forward pass, sized to its tokens (metadata per sequence) and sampled rows.
  struct StepTensors {
    TensorView token_ids, positions, slot_mapping, qo_indptr, kv_page_indptr, kv_page_indices, kv_lens, logits_rows;
    TensorView residual, normed, qkv, attn_out, proj_out, gate_up, act, selected, logits;
    TensorView stream_slot_mapping, stream_page_indptr, stream_page_indices, window_sink, window_local;  // sparse
  };
  // Persistent buffers (sized for max_batch sequences) and the captured graphs, by batch size.
  struct DecodeGraphs {
    int max_batch = 0, max_kv_len = 0, max_pages_per_seq = 0;
    Tensor metadata;  // one block laid out by pack_graph_batch; the views below span full capacity
    TensorView token_ids, positions, slot_mapping, qo_indptr, kv_page_indptr, kv_page_indices, kv_lens, logits_rows;
    Tensor residual, normed, qkv, attn_out, proj_out, gate_up, act, selected, logits;
    std::map<int, std::shared_ptr<void>> graphs;
  };
  // Enqueues the whole forward pass on t (no host synchronisation, no allocation on the dense path);
  // `batch` is needed only for the sparse path's page selection.
  void enqueue_forward(const StepTensors& t, const ForwardBatch* batch, int32_t max_q_len, int32_t max_kv_len);
  bool graph_eligible(const ForwardBatch& batch) const;
  // A decode batch (or none: all padding) padded to `bucket` rows, packed in the graph block's layout:
  // the metadata arrays in GraphArray order, each at the capacity of max_batch rows, so every step's
  // block has the layout the graphs were captured with.
  enum GraphArray { kGraphTokens, kGraphPositions, kGraphSlots, kGraphQoIndptr, kGraphPageIndptr, kGraphKvLens,
                    kGraphRows, kGraphPages };
  static PackedUpload pack_graph_batch(const DecodeGraphs& graphs, const ForwardBatch* batch, int bucket);
  StepTensors graph_tensors(int bucket) const;
  TensorView forward_graph(const ForwardBatch& batch);

  // Reorders a q/k/v/o tensor of layer_idx by its KV head order (host tensors only).
  std::vector<uint8_t> permute_heads(int layer_idx, const std::string& kind, const TensorView& tensor) const;
  // Builds head_page_positions / head_num_pages for layer_idx's dense heads (sparse decode).
  void select_pages(int layer_idx, Layer& layer, const ForwardBatch& batch, const TensorView& dense_query,
                    Tensor* head_pages, Tensor* head_counts);


  ModelConfig config_;
  Backend& backend_;
  DType weight_dtype_;
  DType activation_dtype_;
  Tensor embed_tokens_, final_norm_, lm_head_, cos_sin_cache_;
  std::vector<Layer> layers_;
  std::map<std::string, Slot> slots_;
  std::set<std::string> loaded_;
  bool finalized_ = false;
  bool kv_allocated_ = false;
  SparsityConfig sparsity_;
  int num_slots_ = 0;
  int num_select_ = 0;  // pages per selection: decode_token_budget / physical_page_size
  int64_t last_pages_selected_ = 0, last_pages_total_ = 0;
  std::unique_ptr<DecodeGraphs> graphs_;
  Tensor step_logits_;  // the last eager forward's logits (forward_logits returns a view of them)
  int64_t num_graph_replays_ = 0;
};

}  // namespace lserve
