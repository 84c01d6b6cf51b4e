"""Hugging Face checkpoints: config.json -> ModelSpec, and strict weight names and shapes.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases). Rotary settings
come from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4).
Weights keep their Hugging Face names (model.layers.{i}.self_attn.q_proj.weight, ...); the
reference is transformers' modeling_llama.py / modeling_qwen2.py.

Example:
    >>> spec = load_hf_config("path/to/model_dir")
    >>> spec.fields["num_kv_heads"], spec.eos_token_ids
    (2, (2,))
    >>> for name, array in iter_hf_weights("path/to/model_dir", spec):
    ...     engine.load_weight(name, array)
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple, Union

import numpy as np

from lserve.loader.safetensors import iter_safetensors_weights, list_safetensors_weights
from lserve.loader.spec import ROPE_SCALING_DEFAULTS, ModelSpec, check_architecture, core_model_config

PathLike = Union[str, os.PathLike]
ConfigLike = Union[ModelSpec, Mapping[str, Any]]

# config.json files without 'architectures': the class their model_type stands for. Which architectures
# lserve runs is ModelConfig::validate's to say (the error reaches the user with this file's path).
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Keys each rope_type needs, as transformers' rope validation requires them.
_ROPE_REQUIRED = {"linear": ("factor",), "yarn": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_ROPE_KEY_TYPES = {"original_max_position_embeddings": int, "truncate": bool}
# Non-parameter buffers some checkpoints store; never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LIST_LIMIT = 12


def _read_json(path: pathlib.Path) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"'{path}' is not a readable JSON file ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"'{path}' holds a JSON {type(value).__name__}, not an object")
    return value


def load_hf_config(model_dir: PathLike) -> ModelSpec:
    """Reads model_dir/config.json (and generation_config.json's eos ids, when present) into a ModelSpec.

    Raises ValueError for a missing or invalid config.json, an unsupported architecture, activation,
    bias layout or rope type, or inconsistent sizes.
    """
    model_dir = pathlib.Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in '{model_dir}'")
    hf_config = _read_json(config_path)
    generation_path = model_dir / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    return spec_from_hf_config(hf_config, generation, where=str(config_path))


def _architecture(hf_config: Mapping[str, Any], where: str) -> str:
    architectures = hf_config.get("architectures")
    if architectures:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ValueError(f"{where}: 'architectures' must be a list of strings, got {architectures!r}")
        if len(set(architectures)) > 1:
            raise ValueError(f"{where}: 'architectures' names several classes {architectures!r}; lserve loads one")
        return architectures[0]  # ModelConfig::validate says whether lserve runs it
    model_type = hf_config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(f"{where}: no 'architectures' and a model_type lserve does not know ({model_type!r}; known: "
                     f"{', '.join(_MODEL_TYPES)}): name the class in 'architectures'")


def _token_ids(value: Any, key: str, where: str) -> List[int]:
    """An id, a list of ids, or null -> [ids]."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where}: {key} must be a token id, a list of them, or null; got {value!r}")
    return list(values)


def _rope_scaling(rope: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """The RopeScaling dict (every field, defaults filled) from a HF rope_scaling / rope_parameters dict."""
    rope_type = rope.get("rope_type") or rope.get("type") or "default"  # ModelConfig::validate checks it
    missing = [key for key in _ROPE_REQUIRED.get(rope_type, ()) if rope.get(key) is None]
    if missing:
        raise ValueError(f"{where}: rope type '{rope_type}' needs {', '.join(missing)}")
    scaling = dict(ROPE_SCALING_DEFAULTS, rope_type=rope_type)
    if rope_type == "default":
        return scaling
    for key, default in ROPE_SCALING_DEFAULTS.items():
        value = rope.get(key)
        if key == "rope_type" or value is None:
            continue
        kind = _ROPE_KEY_TYPES.get(key, float)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: rope scaling '{key}' must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"{where}: rope scaling '{key}' must be a number, got {value!r}")
        scaling[key] = kind(value)
    return scaling


def spec_from_hf_config(hf_config: Mapping[str, Any], generation_config: Optional[Mapping[str, Any]] = None,
                        where: str = "config.json") -> ModelSpec:
    """A parsed config.json dict (and optionally generation_config.json) -> ModelSpec. See load_hf_config."""
    architecture = _architecture(hf_config, where)
    try:
        check_architecture(architecture)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None

    def required(key: str) -> int:
        value = hf_config.get(key)
        if value is None:
            raise ValueError(f"{where}: missing '{key}'")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: '{key}' must be an int > 0, got {value!r}")
        return value

    def number(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)

    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act '{hf_config['hidden_act']}' is not supported (only silu)")
    if hf_config.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported (lserve's MLP has no biases)")
    if architecture == "Qwen2ForCausalLM":
        attention_bias = True  # Qwen2 always has q/k/v biases and no o_proj bias
    elif hf_config.get("attention_bias"):
        raise ValueError(f"{where}: {architecture} with attention_bias=true also has an o_proj bias, which "
                         f"lserve's ModelConfig cannot express (it carries q/k/v biases only, as in Qwen2)")
    else:
        attention_bias = False

    hidden_size = required("hidden_size")
    num_qo_heads = required("num_attention_heads")
    num_kv_heads = required("num_key_value_heads") if hf_config.get("num_key_value_heads") else num_qo_heads
    head_dim = required("head_dim") if hf_config.get("head_dim") is not None else None
    if head_dim is None:
        if hidden_size % num_qo_heads:
            raise ValueError(f"{where}: hidden_size {hidden_size} is not a multiple of num_attention_heads "
                             f"{num_qo_heads} and head_dim is not given")
        head_dim = hidden_size // num_qo_heads

    # transformers 5 folds rope_theta, partial_rotary_factor and the scaling into rope_parameters.
    legacy = hf_config.get("rope_scaling") or {}
    parameters = hf_config.get("rope_parameters") or {}
    if not isinstance(legacy, dict) or not isinstance(parameters, dict):
        raise ValueError(f"{where}: rope_scaling / rope_parameters must be objects")
    if parameters and all(isinstance(v, dict) for v in parameters.values()):
        raise ValueError(f"{where}: per-layer-type rope_parameters ({', '.join(parameters)}) are not supported")
    rope = {**legacy, **parameters}
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    partial_rotary_factor = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))

    eos_token_ids = _token_ids(hf_config.get("eos_token_id"), "eos_token_id", where)
    generation_eos = _token_ids((generation_config or {}).get("eos_token_id"), "eos_token_id",
                                f"{where} (generation_config.json)")
    eos_token_ids += [t for t in generation_eos if t not in eos_token_ids]
    bos_token_ids = _token_ids(hf_config.get("bos_token_id"), "bos_token_id", where)

    sliding_window = hf_config.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not hf_config.get("use_sliding_window", False):
        sliding_window = None  # Qwen2 configs carry a window that is off unless use_sliding_window

    fields = {
        "architecture": architecture,
        "vocab_size": required("vocab_size"),
        "hidden_size": hidden_size,
        "intermediate_size": required("intermediate_size"),
        "num_layers": required("num_hidden_layers"),
        "num_qo_heads": num_qo_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": number(hf_config.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        "rope_theta": number(rope_theta, "rope_theta"),
        "partial_rotary_factor": number(partial_rotary_factor, "partial_rotary_factor"),
        "rope_scaling": _rope_scaling(rope, where),
        "max_position_embeddings": required("max_position_embeddings"),
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
        "attention_bias": attention_bias,
        "bos_token_id": bos_token_ids[0] if bos_token_ids else -1,
        "eos_token_id": eos_token_ids[0] if eos_token_ids else -1,
    }
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    try:
        return ModelSpec(fields, tuple(eos_token_ids), sliding_window, dtype if isinstance(dtype, str) else None)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _fields(config: ConfigLike) -> Mapping[str, Any]:
    return config.fields if isinstance(config, ModelSpec) else config


def expected_weight_shapes(config: ConfigLike) -> Dict[str, Tuple[int, ...]]:
    """{Hugging Face weight name: shape}, in model order (embedding, layers, final norm, lm_head): the
    C++ model's own table (LlamaModel::weight_specs through _C.weight_shapes), so the loader checks a
    checkpoint against exactly what the model will accept.

    config: a ModelSpec or a ModelConfig dict (head_dim 0 means hidden_size / num_qo_heads); a bad
    one raises the core's ValueError. Shapes, with q = num_qo_heads * head_dim, kv = num_kv_heads * head_dim:
        model.embed_tokens.weight                 (vocab_size, hidden_size)
        model.layers.{i}.input_layernorm.weight   (hidden_size,)
        model.layers.{i}.self_attn.q_proj.weight  (q, hidden_size); k_proj, v_proj (kv, hidden_size)
        model.layers.{i}.self_attn.{q,k,v}_proj.bias  (q,), (kv,), (kv,)   only with attention_bias
        model.layers.{i}.self_attn.o_proj.weight  (hidden_size, q)
        model.layers.{i}.post_attention_layernorm.weight  (hidden_size,)
        model.layers.{i}.mlp.{gate,up}_proj.weight (intermediate_size, hidden_size)
        model.layers.{i}.mlp.down_proj.weight     (hidden_size, intermediate_size)
        model.norm.weight                         (hidden_size,)
        lm_head.weight                            (vocab_size, hidden_size)   unless tie_word_embeddings
    """
    from lserve import _C

    return {name: tuple(shape) for name, shape in _C.weight_shapes(core_model_config(_fields(config)))}


def expected_weight_names(config: ConfigLike) -> Set[str]:
    """The Hugging Face names every checkpoint of this config must hold (see expected_weight_shapes)."""
    return set(expected_weight_shapes(config))


def ignored_weight_names(found: Iterable[str], config: ConfigLike) -> Set[str]:
    """Names a checkpoint may hold that are never loaded: rotary_emb.inv_freq buffers, and lm_head.weight
    when the embeddings are tied (some tied checkpoints store the copy anyway)."""
    tied = bool(_fields(config)["tie_word_embeddings"])
    return {name for name in found
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight")}


def _listing(names: List[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _LIST_LIMIT else "")


def check_weight_shape(name: str, shape: Iterable[int], expected_shapes: Mapping[str, Tuple[int, ...]]) -> None:
    """Raises ValueError when `name` is not expected or its shape differs, naming both shapes."""
    if name not in expected_shapes:
        raise ValueError(f"unexpected weight '{name}'")
    if tuple(shape) != tuple(expected_shapes[name]):
        raise ValueError(f"weight '{name}' has shape {tuple(shape)}, expected {tuple(expected_shapes[name])}")


def check_weight_names(found: Union[Iterable[str], Mapping[str, Any]], config: ConfigLike) -> Set[str]:
    """Strict name check of a checkpoint against a config; returns the names to load.

    found: weight names, or a mapping name -> shape / array / TensorInfo (anything with .shape, or a
           tuple), in which case shapes are checked too.
    Raises ValueError listing every missing and every unexpected name (ignored_weight_names excepted),
    or naming the first tensor whose shape differs from expected_weight_shapes.
    """
    expected_shapes = expected_weight_shapes(config)
    names = set(found)
    loadable = names - ignored_weight_names(names, config)
    missing, unexpected = sorted(set(expected_shapes) - names), sorted(loadable - set(expected_shapes))
    problems = []
    if missing:
        problems.append(f"missing weights: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_listing(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint does not match {_fields(config).get('architecture', 'the model')}: "
                         + "; ".join(problems))
    if isinstance(found, Mapping):
        for name in expected_shapes:
            item = found[name]
            check_weight_shape(name, getattr(item, "shape", item), expected_shapes)
    return loadable


def iter_hf_weights(model_dir: PathLike, config: ConfigLike, *, bf16: str = "float32"
                    ) -> Iterator[Tuple[str, np.ndarray]]:
    """(Hugging Face name, array) for every weight the model uses, after checking every name and shape
    against `config` from the headers alone (nothing is read before the checkpoint is known good).
    Ignored names (rotary buffers, a tied lm_head copy) are skipped. See iter_safetensors_weights
    for `bf16`.
    """
    loadable = check_weight_names(list_safetensors_weights(model_dir), config)
    return ((name, array) for name, array in iter_safetensors_weights(model_dir, bf16=bf16) if name in loadable)
