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


WeightSink = Callable[[str, np.ndarray], None]


@dataclass
class ModelSource:
    model_config: "_C.ModelConfig"
    tokenizer: Optional[object]
    eos_token_ids: List[int]
    num_weights: int
    feed_weights: Callable[[int, WeightSink], None]  # (seed, sink): calls sink(hf_name, array) per weight

    def load_weights(self, core: "_C.Engine", seed: int = 0, show_progress: bool = True) -> None:
        with progress_bar(total=self.num_weights, desc="Loading weights", enabled=show_progress,
                          unit="tensor") as bar:
            def sink(name: str, array: np.ndarray) -> None:
                core.load_weight(name, np.ascontiguousarray(array))
                bar.update(1)

            self.feed_weights(seed, sink)


def load_model_source(model: str, load_format: str = "auto", tokenizer: Optional[str] = None) -> ModelSource:
    from lserve.models import resolve_model
    from lserve.tokenizer import Tokenizer

    resolved = resolve_model(model)
    if resolved.kind == "gguf":
        gguf = _C.GgufFile(str(resolved.path))
        fields = _C.gguf_model_config_dict(gguf)
        config = core_model_config(fields)
        tok = Tokenizer.from_pretrained(tokenizer) if tokenizer else Tokenizer.from_gguf(gguf)

        def gguf_weights(seed: int, sink: WeightSink) -> None:
            if load_format == "dummy":
                _feed(_dummy(fields, seed), sink)
            else:  # names, shapes and every tensor type are checked before any data is read
                _C.gguf_hf_weights(gguf, sink)

        eos = [config.eos_token_id] if config.eos_token_id >= 0 else []
        if tok is not None and tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(tok.eos_token_id)
        return ModelSource(config, tok, eos, len(_expected_names(fields)), gguf_weights)

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

    def hf_weights(seed: int, sink: WeightSink) -> None:
        if load_format == "dummy":
            _feed(_dummy(fields, seed), sink)
            return
        from lserve.loader.hf import check_weight_names
        from lserve.loader.safetensors import iter_safetensors_weights, list_safetensors_weights

        check_weight_names(set(list_safetensors_weights(resolved.path)), fields)
        for name, array in iter_safetensors_weights(resolved.path):
            if name in expected:
                sink(name, array)

    return ModelSource(config, tok, eos_ids, len(expected), hf_weights)


def _expected_names(fields: dict) -> set:
    from lserve.loader.hf import expected_weight_names

    return expected_weight_names(fields)


def _feed(weights: Iterator[Tuple[str, np.ndarray]], sink: WeightSink) -> None:
    for name, array in weights:
        sink(name, array)


def _dummy(fields: dict, seed: int):
    from lserve.loader.dummy import dummy_weights

    yield from dummy_weights(fields, seed)
