"""Hugging Face config.json -> lserve ModelConfig fields, and strict weight-name/shape checks.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases). Rotary settings
are read from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older configs).
A Mistral sliding window caps the context length at the window, inside which attention is full.
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Dict, List, Set, Tuple

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


@dataclass
class HfModelSpec:
    fields: Dict[str, object]  # lserve ModelConfig field names
    eos_token_ids: List[int] = field(default_factory=list)
    sliding_window: int = 0


def load_hf_config(model_dir) -> HfModelSpec:
    path = pathlib.Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no config.json in '{model_dir}'") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"'{path}' is not valid JSON ({error})") from None
    return spec_from_config(config, str(path))


def spec_from_config(config: Dict, where: str = "config") -> HfModelSpec:
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{where}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (only silu)")
    if config.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=True is not supported")

    def required(key: str) -> int:
        if key not in config:
            raise ValueError(f"{where}: missing '{key}'")
        return config[key]

    rope = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    rope.update({k: v for k, v in legacy.items() if k not in rope})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = {"rope_type": rope_type, **{k: rope[k] for k in _ROPE_KEYS if rope.get(k) is not None}}

    num_heads = required("num_attention_heads")
    eos = config.get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    max_positions = int(config.get("max_position_embeddings", 2048))
    sliding_window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    sliding_window = int(sliding_window or 0)
    if 0 < sliding_window < max_positions:
        max_positions = sliding_window
    fields = {
        "architecture": arch,
        "vocab_size": required("vocab_size"),
        "hidden_size": required("hidden_size"),
        "intermediate_size": required("intermediate_size"),
        "num_layers": required("num_hidden_layers"),
        "num_qo_heads": num_heads,
        "num_kv_heads": config.get("num_key_value_heads") or num_heads,
        "head_dim": config.get("head_dim") or 0,
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope_theta),
        "partial_rotary_factor": float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))),
        "rope_scaling": scaling,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "attention_bias": arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
        "bos_token_id": int(config["bos_token_id"]) if isinstance(config.get("bos_token_id"), int) else -1,
        "eos_token_id": eos_ids[0] if eos_ids else -1,
    }
    return HfModelSpec(fields, eos_ids, sliding_window)


def expected_weight_shapes(fields: Dict) -> Dict[str, Tuple[int, ...]]:
    hidden, inter = fields["hidden_size"], fields["intermediate_size"]
    head_dim = fields["head_dim"] or hidden // fields["num_qo_heads"]
    q_rows, kv_rows = fields["num_qo_heads"] * head_dim, fields["num_kv_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (fields["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not fields["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (fields["vocab_size"], hidden)
    for i in range(fields["num_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_rows, hidden), p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden), p + "self_attn.o_proj.weight": (hidden, q_rows),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
        if fields["attention_bias"]:
            shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                           p + "self_attn.v_proj.bias": (kv_rows,)})
    return shapes


def expected_weight_names(fields: Dict) -> Set[str]:
    return set(expected_weight_shapes(fields))


def check_weight_names(found: Set[str], fields: Dict) -> None:
    """Raises ValueError listing missing and unexpected tensors (rotary buffers and a tied lm_head
    are tolerated)."""
    expected = expected_weight_names(fields)
    ignorable = {n for n in found if n.endswith("rotary_emb.inv_freq")}
    if fields["tie_word_embeddings"]:
        ignorable.add("lm_head.weight")
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - ignorable)
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing[:8])}" + (f" ... ({len(missing)} in all)" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(unexpected[:8])}" + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 8 else ""))
    if problems:
        raise ValueError("; ".join(problems))
