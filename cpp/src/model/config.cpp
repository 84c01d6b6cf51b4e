// ModelConfig::validate: derives head_dim and checks every field with a message naming it.
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
  LSERVE_CHECK(num_kv_heads > 0 && num_qo_heads % num_kv_heads == 0, "model config: num_key_value_heads ",
               num_kv_heads, " must divide num_attention_heads ", num_qo_heads);
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
  LSERVE_CHECK(max_position_embeddings > 0, "model config: max_position_embeddings must be positive");
  const std::string& rope = rope_scaling.rope_type;
  LSERVE_CHECK(rope == "default" || rope == "linear" || rope == "llama3" || rope == "yarn",
               "model config: unsupported rope_scaling type '", rope, "' (supported: default, linear, llama3, yarn)");
  if (rope != "default") {
    LSERVE_CHECK(rope_scaling.factor > 0, "model config: rope_scaling.factor must be positive, got ",
                 rope_scaling.factor);
  }
}

}  // namespace lserve
