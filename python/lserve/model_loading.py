"""From a model name to a configured core engine: config, tokenizer and a weight stream.

load_model_source() resolves the model (lserve.models), reads its config (GGUF metadata or
config.json), its tokenizer, and returns a ModelSource whose load_weights() feeds every tensor,
under its Hugging Face name, into lserve._C.Engine.load_weight with a progress bar.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from lserve import _C
from lserve.progress import progress_bar

_ROPE_FIELDS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def core_model_config(fields: dict) -> "_C.ModelConfig":
    """Builds the C++ ModelConfig from a dict of its field names (rope_scaling a nested dict)."""
    config = _C.ModelConfig()
    for name, value in fields.items():
        if name == "rope_scaling":
            rope = _C.RopeScaling()
            for key, item in (value or {}).items():
                if key in _ROPE_FIELDS and item is not None:
                    setattr(rope, key, item)
            config.rope_scaling = rope
        elif hasattr(config, name) and value is not None:
            setattr(config, name, value)
    config.validate()
    return config


def core_config_fields(config: "_C.ModelConfig") -> dict:
    """The ModelConfig as a dict of its field names (rope_scaling nested)."""
    fields = {name: getattr(config, name) for name in dir(config)
              if not name.startswith("_") and name not in ("validate", "rope_scaling")}
    fields["rope_scaling"] = {name: getattr(config.rope_scaling, name) for name in _ROPE_FIELDS}
    return fields


@dataclass
class ModelSource:
    model_config: "_C.ModelConfig"
    tokenizer: Optional[object]
    eos_token_ids: List[int]
    num_weights: int
    weights: Callable[[int], Iterator[Tuple[str, np.ndarray]]]  # seed -> (hf_name, array) stream

    def load_weights(self, core: "_C.Engine", seed: int = 0, show_progress: bool = True) -> None:
        with progress_bar(total=self.num_weights, desc="Loading weights", enabled=show_progress,
                          unit="tensor") as bar:
            for name, array in self.weights(seed):
                core.load_weight(name, np.ascontiguousarray(array))
                bar.update(1)


def load_model_source(model: str, load_format: str = "auto", tokenizer: Optional[str] = None) -> ModelSource:
    from lserve.models import resolve_model
    from lserve.tokenizer import Tokenizer

    resolved = resolve_model(model)
    if resolved.kind == "gguf":
        gguf = _C.GgufFile(str(resolved.path))
        config = _C.gguf_model_config(gguf)
        tok = Tokenizer.from_pretrained(tokenizer) if tokenizer else Tokenizer.from_gguf(gguf)
        names = list(_C.gguf_hf_weight_names(gguf))

        def gguf_weights(seed: int):
            if load_format == "dummy":
                yield from _dummy(core_config_fields(config), seed)
                return
            for name in names:
                yield name, _C.gguf_read_hf_weight(gguf, config, name)

        eos = [config.eos_token_id] if config.eos_token_id >= 0 else []
        if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        return ModelSource(config, tok, eos, len(names), gguf_weights)

    from lserve.loader.hf import load_hf_config

    spec = load_hf_config(resolved.path)
    fields = spec.fields
    config = core_model_config(fields)
    tok = None
    tokenizer_dir = tokenizer or str(resolved.path)
    try:
        tok = Tokenizer.from_pretrained(tokenizer_dir)
    except (ValueError, FileNotFoundError, OSError):
        if tokenizer:
            raise
    eos_ids = list(spec.eos_token_ids)
    if not eos_ids and config.eos_token_id >= 0:
        eos_ids = [config.eos_token_id]

    from lserve.loader.hf import expected_weight_names

    expected = expected_weight_names(fields)

    def hf_weights(seed: int):
        if load_format == "dummy":
            yield from _dummy(fields, seed)
            return
        from lserve.loader.hf import check_weight_names
        from lserve.loader.safetensors import iter_safetensors_weights, list_safetensors_weights

        check_weight_names(set(list_safetensors_weights(resolved.path)), fields)
        for name, array in iter_safetensors_weights(resolved.path):
            if name in expected:
                yield name, array

    return ModelSource(config, tok, eos_ids, len(expected), hf_weights)


def _dummy(fields: dict, seed: int):
    from lserve.loader.dummy import dummy_weights

    yield from dummy_weights(fields, seed)
