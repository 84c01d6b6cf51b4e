// LlamaModel: the Llama-family decoder (Llama, Mistral, Qwen2) as a sequence of Backend ops.
// Weights are allocated once at construction in their fused serving layout (q|k|v rows in one
// matrix, gate|up rows in one matrix) and filled by load_weight() under Hugging Face names.
// forward() runs one scheduled batch: embed -> layers (norm, qkv, rope + KV append, paged
// attention, o_proj, norm, gate_up, silu_mul, down) -> final norm -> logits of chosen rows.
// The residual stream is float32; the activations between GEMMs use the backend's activation
// dtype (float32 on the CPU, the weight dtype on CUDA); logits are float32.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "lserve/backend.h"
#include "lserve/model/config.h"

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

  // Allocates the per-layer paged caches: (num_pages, page_size, num_kv_heads, head_dim) each.
  void allocate_kv_cache(int num_pages, int page_size, DType kv_cache_dtype);
  int64_t kv_bytes_per_token(DType kv_cache_dtype) const;

  // Returns the logits of batch.logits_rows, (num_logits, vocab_size) float32 on the host.
  std::vector<float> forward(const ForwardBatch& batch);

 private:
  struct Slot {  // where a Hugging Face tensor lands
    Tensor* tensor;
    int64_t row_offset;
    std::vector<int64_t> shape;
  };
  struct Layer {
    Tensor input_norm, qkv_weight, qkv_bias, o_weight, post_norm, gate_up_weight, down_weight;
    Tensor k_cache, v_cache;
  };

  Tensor upload_i32(const std::vector<int32_t>& values);
  Tensor upload_i64(const std::vector<int64_t>& values);

  ModelConfig config_;
  Backend& backend_;
  DType weight_dtype_;
  DType activation_dtype_;
  Tensor embed_tokens_, final_norm_, lm_head_, cos_sin_cache_;
  std::vector<Layer> layers_;
  std::map<std::string, Slot> slots_;
  std::set<std::string> loaded_;
  bool finalized_ = false;
};

}  // namespace lserve
