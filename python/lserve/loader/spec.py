"""ModelSpec: a model's architecture as the C++ ModelConfig states it, plus what the struct lacks.

`ModelSpec.fields` has exactly the field names of cpp/include/lserve/model/config.h (ModelConfig,
with `rope_scaling` a nested dict of RopeScaling's fields), so the engine can copy it into the C++
struct field by field. A ModelSpec is checked by copying it into the C++ struct and calling
ModelConfig::validate() (core_model_config), so a bad config.json fails with the core's error, naming
the field, before any weight is read.
"""
from __future__ import annotations

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

# ModelConfig in config.h, in declaration order.
MODEL_CONFIG_FIELDS: Tuple[str, ...] = (
    "architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_qo_heads",
    "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id",
)

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def core_model_config(fields: Mapping[str, Any]):
    """The C++ ModelConfig (lserve._C.ModelConfig) of a fields dict (rope_scaling a nested dict),
    validated by ModelConfig::validate(), the one place the rules live. Raises ValueError naming the
    field: the dict's keys against the struct's here, a value of the wrong kind in the bindings' setters,
    a value out of range in validate().

    Example:
        >>> core_model_config({**fields, "num_kv_heads": 3})  # 8 heads
        ValueError: model config: num_kv_heads (num_key_value_heads) 3 must divide num_qo_heads ...
    """
    from lserve import _C

    if not isinstance(fields, Mapping):
        raise ValueError(f"model config must be a dict, got {type(fields).__name__}")
    missing = [key for key in MODEL_CONFIG_FIELDS if key not in fields]
    extra = sorted(set(fields) - set(MODEL_CONFIG_FIELDS))
    if missing or extra:
        raise ValueError(f"model config fields differ from ModelConfig: missing {missing}, unexpected {extra}")
    rope_fields = fields["rope_scaling"]
    if not isinstance(rope_fields, Mapping):
        raise ValueError(f"rope_scaling must be a dict, got {type(rope_fields).__name__}")
    missing = sorted(set(ROPE_SCALING_FIELDS) - set(rope_fields))
    extra = sorted(set(rope_fields) - set(ROPE_SCALING_FIELDS))
    if missing or extra:
        raise ValueError(f"rope_scaling fields differ from RopeScaling: missing {missing}, unexpected {extra}")
    config = _C.ModelConfig()
    for name, value in fields.items():
        if name == "rope_scaling":
            rope = _C.RopeScaling()
            for key, rope_value in value.items():
                if rope_value is not None:  # None: RopeScaling's default
                    setattr(rope, key, rope_value)
            config.rope_scaling = rope
        else:
            setattr(config, name, value)
    config.validate()
    return config


def check_architecture(architecture: str) -> None:
    """Raises the core's ValueError when lserve does not run `architecture` (ModelConfig::validate keeps
    the list): a loader asks before it parses the rest of a foreign config, whose other fields would
    otherwise be the first thing to fail."""
    one_of_each = dict(vocab_size=2, hidden_size=2, intermediate_size=2, num_layers=1, num_qo_heads=1,
                       num_kv_heads=1, head_dim=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                       partial_rotary_factor=1.0, rope_scaling=dict(ROPE_SCALING_DEFAULTS),
                       max_position_embeddings=2, tie_word_embeddings=False, attention_bias=False,
                       bos_token_id=-1, eos_token_id=-1)
    core_model_config({"architecture": architecture, **one_of_each})


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
        core_model_config(self.fields)  # raises the core's ValueError
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
