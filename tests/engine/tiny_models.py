"""Tiny random Llama / Mistral / Qwen2 checkpoints made with transformers (fp32, safetensors)."""
from __future__ import annotations

import pathlib

TINY_COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

TINY_VARIANTS = {
    # GQA 4, llama3 rope scaling, untied
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(rope_theta=10000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # GQA 1 (MHA), tied embeddings, linear rope scaling
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(num_key_value_heads=8, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
    # qkv biases, yarn rope scaling
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_key_value_heads=1, tie_word_embeddings=False, use_sliding_window=False,
                   rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})),
}


def make_tiny_model(kind: str, directory: pathlib.Path, seed: int = 0):
    import torch
    import transformers

    config_name, model_name, overrides = TINY_VARIANTS[kind]
    kwargs = {**TINY_COMMON, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # larger than the default init so the logits are not all near zero
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif param.dim() == 2:
                param.normal_(0.0, 0.15)
    model.save_pretrained(directory, safe_serialization=True)
    return model
