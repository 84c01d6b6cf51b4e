// ModelConfig::validate: derives head_dim and checks every field with a message naming it (the one
// place: Python's ModelSpec and the GGUF reader call it).
#include <cmath>

#include "lserve/check.h"
#include "lserve/model/config.h"

namespace lserve {

void ModelConfig::validate() {
  const std::string& arch = architecture;
  LSERVE_CHECK(arch == "LlamaForCausalLM" || arch == "MistralForCausalLM" || arch == "Qwen2ForCausalLM",
               "unsupported architecture '", arch,
               "' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");
  LSERVE_CHECK(vocab_size > 0, "model config: vocab_size must be positive, got ", vocab_size);
  LSERVE_CHECK(hidden_size > 0, "model config: hidden_size must be positive, got ", hidden_size);
  LSERVE_CHECK(intermediate_size > 0, "model config: intermediate_size must be positive, got ", intermediate_size);
  LSERVE_CHECK(num_layers > 0, "model config: num_layers must be positive, got ", num_layers);
  LSERVE_CHECK(num_qo_heads > 0, "model config: num_attention_heads must be positive, got ", num_qo_heads);
  LSERVE_CHECK(num_kv_heads > 0 && num_qo_heads % num_kv_heads == 0, "model config: num_kv_heads ",
               "(num_key_value_heads) ", num_kv_heads, " must divide num_qo_heads (num_attention_heads) ", num_qo_heads);
  if (head_dim == 0) {
    LSERVE_CHECK(hidden_size % num_qo_heads == 0, "model config: hidden_size ", hidden_size,
                 " is not a multiple of num_attention_heads ", num_qo_heads, " and head_dim is not given");
    head_dim = hidden_size / num_qo_heads;
  }
  LSERVE_CHECK(head_dim > 0 && head_dim % 2 == 0, "model config: head_dim must be positive and even, got ",
               head_dim);
  // Finite: an infinite epsilon or base loads and then produces garbage.
  LSERVE_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, "model config: rms_norm_eps must be finite and positive, got ",
               rms_norm_eps);
  LSERVE_CHECK(std::isfinite(rope_theta) && rope_theta > 0, "model config: rope_theta must be finite and positive, got ",
               rope_theta);
  LSERVE_CHECK(partial_rotary_factor > 0 && partial_rotary_factor <= 1, "model config: partial_rotary_factor ",
               partial_rotary_factor, " not in (0, 1]");
  LSERVE_CHECK(rotary_dim() % 2 == 0 && rotary_dim() > 0, "model config: rotary dimension ", rotary_dim(),
               " must be positive and even");
  LSERVE_CHECK(max_position_embeddings > 0, "model config: max_position_embeddings must be positive, got ",
               max_position_embeddings);
  LSERVE_CHECK(bos_token_id >= -1, "model config: bos_token_id must be -1 (none) or a token id >= 0, got ", bos_token_id);
  LSERVE_CHECK(eos_token_id >= -1, "model config: eos_token_id must be -1 (none) or a token id >= 0, got ", eos_token_id);
  const std::string& rope = rope_scaling.rope_type;
  LSERVE_CHECK(rope == "default" || rope == "linear" || rope == "llama3" || rope == "yarn",
               "model config: unsupported rope_scaling type '", rope, "' (supported: default, linear, llama3, yarn)");
  LSERVE_CHECK(std::isfinite(rope_scaling.factor) && rope_scaling.factor > 0,
               "model config: rope_scaling.factor must be finite and positive, got ", rope_scaling.factor);
  LSERVE_CHECK(rope_scaling.original_max_position_embeddings >= 0,
               "model config: rope_scaling.original_max_position_embeddings must be >= 0, got ",
               rope_scaling.original_max_position_embeddings);
  if (rope == "llama3") {
    LSERVE_CHECK(rope_scaling.high_freq_factor > rope_scaling.low_freq_factor && rope_scaling.low_freq_factor > 0,
                 "model config: rope_scaling (llama3) needs high_freq_factor > low_freq_factor > 0, got ",
                 rope_scaling.high_freq_factor, " and ", rope_scaling.low_freq_factor);
  }
  if (rope == "yarn") {
    LSERVE_CHECK(rope_scaling.attention_factor >= 0, "model config: rope_scaling.attention_factor must be >= 0, got ",
                 rope_scaling.attention_factor);
  }
}

}  // namespace lserve
