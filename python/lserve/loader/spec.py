"""ModelSpec: a model's architecture as the C++ ModelConfig states it, plus what the struct lacks.

`ModelSpec.fields` has exactly the field names of cpp/include/lserve/model/config.h (ModelConfig,
with `rope_scaling` a nested dict of RopeScaling's fields), so the engine can copy it into the C++
struct field by field. The checks here mirror ModelConfig::validate() so a bad config.json fails
in Python with the field named, before any weight is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

# RopeScaling in config.h, with its defaults.
ROPE_SCALING_DEFAULTS: Dict[str, Any] = {
    "rope_type": "default",
    "factor": 1.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": 0.0,
    "mscale": 0.0,
    "mscale_all_dim": 0.0,
    "truncate": True,
}
ROPE_SCALING_FIELDS: Tuple[str, ...] = tuple(ROPE_SCALING_DEFAULTS)
ROPE_TYPES: Tuple[str, ...] = ("default", "linear", "llama3", "yarn")

# ModelConfig in config.h, in declaration order.
MODEL_CONFIG_FIELDS: Tuple[str, ...] = (
    "architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_qo_heads",
    "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id",
)

_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_qo_heads", "num_kv_heads",
               "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id")
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias")
_ROPE_FLOAT_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                      "attention_factor", "mscale", "mscale_all_dim")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_rope_scaling(rope: Mapping[str, Any]) -> None:
    """Checks a RopeScaling dict: exactly ROPE_SCALING_FIELDS, typed, in range. Raises ValueError."""
    if not isinstance(rope, Mapping):
        raise ValueError(f"rope_scaling must be a dict, got {type(rope).__name__}")
    missing = sorted(set(ROPE_SCALING_FIELDS) - set(rope))
    extra = sorted(set(rope) - set(ROPE_SCALING_FIELDS))
    if missing or extra:
        raise ValueError(f"rope_scaling fields differ from RopeScaling: missing {missing}, unexpected {extra}")
    if rope["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type {rope['rope_type']!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    for key in _ROPE_FLOAT_FIELDS:
        if not _is_number(rope[key]):
            raise ValueError(f"rope_scaling.{key} must be a number, got {rope[key]!r}")
    if not _is_int(rope["original_max_position_embeddings"]) or rope["original_max_position_embeddings"] < 0:
        raise ValueError("rope_scaling.original_max_position_embeddings must be an int >= 0, got "
                         f"{rope['original_max_position_embeddings']!r}")
    if not isinstance(rope["truncate"], bool):
        raise ValueError(f"rope_scaling.truncate must be a bool, got {rope['truncate']!r}")
    if rope["factor"] <= 0:
        raise ValueError(f"rope_scaling.factor must be > 0, got {rope['factor']}")
    if rope["rope_type"] == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"] > 0:
        raise ValueError("rope_scaling (llama3) needs high_freq_factor > low_freq_factor > 0, got "
                         f"{rope['high_freq_factor']} and {rope['low_freq_factor']}")
    if rope["rope_type"] == "yarn" and rope["attention_factor"] < 0:
        raise ValueError(f"rope_scaling.attention_factor must be >= 0, got {rope['attention_factor']}")


def validate_model_config_fields(fields: Mapping[str, Any]) -> None:
    """Checks a ModelConfig dict the way ModelConfig::validate() does. Raises ValueError naming the field.

    Example:
        >>> validate_model_config_fields({**fields, "num_kv_heads": 3})  # 8 heads
        ValueError: num_qo_heads (8) must be a multiple of num_kv_heads (3)
    """
    if not isinstance(fields, Mapping):
        raise ValueError(f"model config must be a dict, got {type(fields).__name__}")
    missing = [key for key in MODEL_CONFIG_FIELDS if key not in fields]
    extra = sorted(set(fields) - set(MODEL_CONFIG_FIELDS))
    if missing or extra:
        raise ValueError(f"model config fields differ from ModelConfig: missing {missing}, unexpected {extra}")
    if not isinstance(fields["architecture"], str) or not fields["architecture"]:
        raise ValueError(f"architecture must be a non-empty string, got {fields['architecture']!r}")
    for key in _INT_FIELDS:
        if not _is_int(fields[key]):
            raise ValueError(f"{key} must be an int, got {fields[key]!r}")
    for key in _FLOAT_FIELDS:
        if not _is_number(fields[key]):
            raise ValueError(f"{key} must be a number, got {fields[key]!r}")
    for key in _BOOL_FIELDS:
        if not isinstance(fields[key], bool):
            raise ValueError(f"{key} must be a bool, got {fields[key]!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_qo_heads", "num_kv_heads",
                "head_dim", "max_position_embeddings"):
        if fields[key] <= 0:
            raise ValueError(f"{key} must be > 0, got {fields[key]}")
    if fields["num_qo_heads"] % fields["num_kv_heads"]:
        raise ValueError(f"num_qo_heads ({fields['num_qo_heads']}) must be a multiple of "
                         f"num_kv_heads ({fields['num_kv_heads']})")
    if not (math.isfinite(fields["rms_norm_eps"]) and math.isfinite(fields["rope_theta"])
            and fields["rms_norm_eps"] > 0 and fields["rope_theta"] > 0):
        raise ValueError(f"rms_norm_eps and rope_theta must be finite and > 0, got {fields['rms_norm_eps']} and "
                         f"{fields['rope_theta']}")
    if not 0 < fields["partial_rotary_factor"] <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {fields['partial_rotary_factor']}")
    if fields["head_dim"] % 2:
        raise ValueError(f"head_dim must be even, got {fields['head_dim']}")
    rotary_dim = int(fields["head_dim"] * fields["partial_rotary_factor"])
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary dimension head_dim * partial_rotary_factor = {rotary_dim} must be even and > 0")
    for key in ("bos_token_id", "eos_token_id"):
        if fields[key] < -1:
            raise ValueError(f"{key} must be -1 (none) or a token id >= 0, got {fields[key]}")
    validate_rope_scaling(fields["rope_scaling"])


@dataclass(frozen=True)
class ModelSpec:
    """A model's architecture: the ModelConfig fields and the extras the C++ struct has no room for.

    fields:         exactly MODEL_CONFIG_FIELDS (rope_scaling: exactly ROPE_SCALING_FIELDS).
    eos_token_ids:  every end-of-sequence id (config.json, then generation_config.json), in order.
    sliding_window: the attention window in tokens (Mistral; Qwen2 with use_sliding_window), else None.
                    lserve runs full attention, which equals windowed attention only while the
                    sequence fits the window: the engine must cap max_model_len (see max_model_len).
    dtype:          the checkpoint's stated dtype ("bfloat16", ...), or None.
    """

    fields: Dict[str, Any]
    eos_token_ids: Tuple[int, ...] = ()
    sliding_window: Optional[int] = None
    dtype: Optional[str] = None

    def __post_init__(self) -> None:
        validate_model_config_fields(self.fields)
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        for token_id in self.eos_token_ids:
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"eos_token_ids must be token ids >= 0, got {token_id!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be None or an int > 0, got {self.sliding_window!r}")
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise ValueError(f"dtype must be None or a string, got {self.dtype!r}")

    @property
    def architecture(self) -> str:
        return self.fields["architecture"]

    @property
    def max_model_len(self) -> int:
        """The longest sequence full attention serves exactly: max_position_embeddings, capped by
        sliding_window when there is one."""
        limit = self.fields["max_position_embeddings"]
        return min(limit, self.sliding_window) if self.sliding_window else limit
