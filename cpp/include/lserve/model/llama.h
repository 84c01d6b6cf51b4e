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
#include "lserve/kv/page_selector.h"
#include "lserve/model/config.h"
#include "lserve/model/decode_graphs.h"
#include "lserve/model/step.h"
#include "lserve/sparsity.h"

namespace lserve {

class LlamaModel {
 public:
  // max_positions: rows of the rotary table (the engine passes max_model_len).
  // native_weights: the weight matrices (embedding, q|k|v, o, gate|up, down, lm_head) take the dtype
  // each arrives in at load_weight() (float32 | bfloat16 | float16 | q8_0 | q4_0 | q4_1), allocated
  // then, instead of weight_dtype; the parts of a fused matrix must share one. Norms and biases stay
  // float32. weight_dtype then only sets the activation dtype. Once whole, each gemm matrix goes to
  // the layout the backend's gemm reads fastest (Backend::pack_gemm_weight: the CPU interleaves block
  // formats); the embedding keeps its rows for embed, and a tied lm_head gets its own packed copy.
  LlamaModel(const ModelConfig& config, Backend& backend, DType weight_dtype, int max_positions,
             bool native_weights = false);

  const ModelConfig& config() const { return config_; }
  DType activation_dtype() const { return activation_dtype_; }
  // Peak bytes of the per-step buffers forward() allocates for num_tokens tokens and num_logits
  // sampled rows (what a device must keep free beside weights and KV cache).
  int64_t activation_bytes(int64_t num_tokens, int64_t num_logits) const;
  // Copies a Hugging Face-named tensor (any float dtype, host or device) into place; raises on
  // an unknown name, a wrong shape, or a tensor loaded twice.
  // `mapping` (optional) owns tensor's memory: a native weight that is a whole matrix of the serving
  // layout as stored (not a part of q|k|v or gate|up, no head reordering) on the CPU, and that the
  // backend does not pack, becomes a view into it, holding the mapping open, instead of a copy
  // (returns true then).
  bool load_weight(const std::string& name, const TensorView& tensor,
                   const std::shared_ptr<const void>& mapping = nullptr);
  int64_t weight_bytes_mapped() const { return weight_bytes_mapped_; }
  // Bytes of the native weights the backend holds in its own layout (Backend::pack_gemm_weight).
  int64_t weight_bytes_packed() const { return weight_bytes_packed_; }
  // Names still missing; finalize() raises listing them.
  std::vector<std::string> missing_weights() const;
  void finalize();
  // The checkpoint's tensors, in model order (embedding, each layer's norms, q/k/v [biases], o, MLP,
  // final norm, lm_head unless tied): the one table of Hugging Face names and shapes. The constructor
  // places its slots by it; Python's loader checks checkpoints against it (_C.weight_shapes).
  enum class WeightKind { kEmbed, kFinalNorm, kLmHead, kInputNorm, kPostNorm, kQkv, kQkvBias, kO, kGateUp, kDown };
  struct WeightSpec {
    std::string name;
    std::vector<int64_t> shape;
    WeightKind kind;
    int layer_idx = -1;      // -1: not a layer's
    int64_t row_offset = 0;  // rows of the fused tensor (q|k|v, gate|up) before this one
  };
  // Validates its copy of config first (head_dim 0 becomes hidden_size / num_qo_heads).
  static std::vector<WeightSpec> weight_specs(ModelConfig config);
  // Bytes the constructor allocates for the weights of `config` in `weight_dtype` (norms and biases
  // float32), saturating at INT64_MAX: what the engine checks against the memory before allocating.
  // A block dtype counts its bytes per 32 items (q4_0: the least any native weights can take).
  static int64_t weight_bytes(const ModelConfig& config, DType weight_dtype);
  // Bytes of the rotary table for max_positions positions (float32, (max_positions, rotary_dim)).
  static int64_t rope_table_bytes(const ModelConfig& config, int64_t max_positions);

  // Sparse attention. Must come before the first load_weight(): it reorders each layer's KV heads
  // (dense heads first, then streaming heads; query heads follow their groups) so that each kind is
  // a contiguous range of heads; the attention output is put back in the original order before
  // o_proj (Layer::unpermute), whose weight stays as stored.
  void set_sparsity(const SparsityConfig& sparsity);
  const SparsityConfig& sparsity() const { return sparsity_; }
  // Takes another config's decode-time selection settings (SparsityConfig::layout_difference is
  // null) after loading; the engine does this between requests (Engine::set_decode_sparsity).
  void set_decode_sparsity(const SparsityConfig& sparsity);
  int num_dense_kv_heads(int layer_idx) const { return layers_[layer_idx].num_dense_kv; }
  std::vector<int> num_dense_kv_heads() const;
  // The page selector whose plan and selection store the sparse forward pass reads (sparsity only).
  void set_page_selector(const PageSelector* selector) { selector_ = selector; }
  // Original KV head index of serving position `position` in layer `layer_idx`.
  int kv_head_order(int layer_idx, int position) const { return layers_[layer_idx].kv_order[position]; }

  // Allocates the per-layer paged caches of the dense heads: (num_pages, page_size, num_dense_kv_heads,
  // head_dim) each, plus (with sparsity) the kmax/kmin statistics per logical page.
  void allocate_kv_cache(int num_pages, int page_size, DType kv_cache_dtype);
  // Bytes per token of the dense heads' cache (keys, values, and kmax/kmin with sparsity).
  int64_t kv_bytes_per_token(DType kv_cache_dtype) const;
  // Streaming heads (sparsity only): their cache of num_pages pages (the page selector's tiers).
  void allocate_streaming_cache(int num_pages, int page_size, DType kv_cache_dtype);
  int64_t streaming_bytes_per_token(DType kv_cache_dtype) const;
  // Copies whole pages on the backend, every layer: the dense heads' K, V (and kmax/kmin) of page
  // src onto page dst (a copy-on-write page), and num_pages streaming pages from src_page on
  // (a forked sequence's decode slot). Stream-ordered: no synchronisation.
  void copy_kv_page(int src_page, int dst_page);
  void copy_streaming_pages(int src_page, int dst_page, int num_pages);
  // Pages read by the dense heads' attention in the last forward() (summed over layers and heads), and
  // pages they would have read densely: selection statistics for metrics.
  int64_t last_pages_selected() const { return last_pages_selected_; }
  int64_t last_pages_total() const { return last_pages_total_; }

  // The capacities of every step (StepLayout): allocates the persistent metadata block that eager
  // steps and graph replays share. Must come before the first forward.
  void prepare_steps(int64_t max_tokens, int64_t max_seqs, int64_t max_pages);

  // Returns the logits of batch.logits_rows, (num_logits, vocab_size) float32 on the host.
  std::vector<float> forward(const ForwardBatch& batch);
  // The same logits left on the backend's device, valid until the next forward (empty without rows).
  TensorView forward_logits(const ForwardBatch& batch);

  // CUDA graphs for decode steps (DecodeGraphRunner; backends with supports_graphs(), dense or
  // sparse attention, no attention bias). max_kv_len bounds the sequences a replay serves (the attention's
  // split count is fixed at capture for it).
  void capture_decode_graphs(int max_batch, int max_kv_len);
  std::vector<int> decode_graph_batch_sizes() const;
  int64_t num_graph_replays() const { return graphs_ ? graphs_->num_replays() : 0; }

 private:
  struct Slot {  // where a Hugging Face tensor lands
    Tensor* tensor;
    int64_t row_offset;
    std::vector<int64_t> shape;
    std::vector<int64_t> matrix_shape;  // the whole (fused) tensor's shape: native weights allocate it on first load
    WeightLayout* layout;               // a gemm matrix's layout (null: the embedding, norms, biases)
  };
  struct Layer {
    Tensor input_norm, qkv_weight, qkv_bias, o_weight, post_norm, gate_up_weight, down_weight;
    WeightLayout qkv_layout = WeightLayout::kRows, o_layout = WeightLayout::kRows;
    WeightLayout gate_up_layout = WeightLayout::kRows, down_layout = WeightLayout::kRows;
    Tensor k_cache, v_cache;    // dense heads
    Tensor kmax, kmin;          // dense heads' statistics per logical page (sparsity)
    Tensor ks_cache, vs_cache;  // streaming heads (sparsity)
    int num_dense_kv = 0;
    std::vector<int> kv_order;  // serving position -> original KV head
    // With reordered heads: (max_tokens * num_qo_heads,) int32 rows of the attention output (one per
    // token and query head) that put the heads back in their original order before o_proj, whose
    // weight stays as stored, so its sums run in dense attention's order (prepare_steps makes it).
    Tensor unpermute;
  };

  // Enqueues the whole forward pass on t: backend ops only, inside the backend's isolated region
  // (no allocation, copy or synchronisation, and no host branch on the step's data).
  void enqueue_forward(const StepTensors& t, int32_t max_q_len, int32_t max_kv_len);

  // Reorders a q/k/v tensor of layer_idx by its KV head order (host tensors only); o_proj is not
  // reordered (the attention output is put back in order instead: Layer::unpermute).
  std::vector<uint8_t> permute_heads(int layer_idx, const std::string& kind, const TensorView& tensor) const;
  // Native weights: a whole matrix (all its parts loaded) to the backend's gemm layout (see the constructor).
  void pack_matrix(const Slot& slot);


  ModelConfig config_;
  Backend& backend_;
  DType weight_dtype_;
  DType activation_dtype_;
  bool native_weights_ = false;
  Tensor embed_tokens_, final_norm_, lm_head_, cos_sin_cache_;
  WeightLayout lm_head_layout_ = WeightLayout::kRows;
  std::vector<Layer> layers_;
  std::map<std::string, Slot> slots_;
  std::set<std::string> loaded_;
  int64_t weight_bytes_mapped_ = 0, weight_bytes_packed_ = 0;
  std::map<const Tensor*, int64_t> rows_loaded_;  // native weights: rows of each matrix loaded so far
  bool finalized_ = false;
  bool kv_allocated_ = false;
  SparsityConfig sparsity_;
  const PageSelector* selector_ = nullptr;
  bool streaming_allocated_ = false;
  int64_t last_pages_selected_ = 0, last_pages_total_ = 0;
  StepLayout step_layout_;
  Tensor step_metadata_;  // the persistent metadata block (StepLayout) of every step
  std::unique_ptr<DecodeGraphRunner> graphs_;
  Tensor step_logits_;  // the last eager forward's logits (forward_logits returns a view of them)
};

}  // namespace lserve
