// ModelConfig: the architecture hyper-parameters of a Llama-family decoder (Llama, Mistral,
// Qwen2), filled from a Hugging Face config.json (python/lserve/config.py) or GGUF metadata
// (cpp/src/model/gguf_loader.cpp). validate() rejects inconsistent configs with a clear error.
#pragma once

#include <string>

namespace lserve {

// Rotary scaling as Hugging Face's rope_scaling states it ("rope_type").
struct RopeScaling {
  std::string rope_type = "default";  // default | linear | llama3 | yarn
  double factor = 1.0;                // linear, llama3, yarn
  double low_freq_factor = 1.0;       // llama3
  double high_freq_factor = 4.0;      // llama3
  int original_max_position_embeddings = 0;  // llama3, yarn (0: use max_position_embeddings)
  double beta_fast = 32.0;            // yarn
  double beta_slow = 1.0;             // yarn
  double attention_factor = 0.0;      // yarn; 0 means 0.1 * ln(factor) + 1
  double mscale = 0.0;                // yarn (DeepSeek-style); 0 means unused
  double mscale_all_dim = 0.0;        // yarn; 0 means unused
  bool truncate = true;               // yarn
};

struct ModelConfig {
  std::string architecture = "LlamaForCausalLM";
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_qo_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  // 0: hidden_size / num_qo_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  double partial_rotary_factor = 1.0;
  RopeScaling rope_scaling;
  int max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry biases (Qwen2)
  int bos_token_id = -1;
  int eos_token_id = -1;

  int rotary_dim() const { return static_cast<int>(head_dim * partial_rotary_factor); }
  // Fills head_dim when 0, then checks every field; throws lserve::Error naming the field.
  void validate();
};

}  // namespace lserve
