"""lserve.loader.hf: config.json parsing against configs written by transformers, and weight names
and shapes against tiny models transformers builds and saves."""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest
import torch
import transformers

from lserve.loader.hf import (check_weight_names, check_weight_shape,
                              expected_weight_names, expected_weight_shapes, iter_hf_weights, load_hf_config,
                              spec_from_hf_config)
from lserve.loader.safetensors import list_safetensors_weights
from lserve.loader.spec import MODEL_CONFIG_FIELDS, ROPE_SCALING_FIELDS, ModelSpec
from lserve_testing import assert_exact

SEED = 7
CONFIG_H = pathlib.Path(__file__).resolve().parents[2] / "cpp" / "include" / "lserve" / "model" / "config.h"
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def _struct_fields(struct_name: str) -> list:
    text = CONFIG_H.read_text()
    body = re.search(r"struct " + struct_name + r" \{(.*?)\n\};", text, re.S).group(1)
    return re.findall(r"^\s+[\w:<>]+\s+(\w+)(?:\s*=[^;]*)?;", body, re.M)


def test_field_names_match_the_cpp_contract():
    assert tuple(_struct_fields("ModelConfig")) == MODEL_CONFIG_FIELDS
    assert tuple(_struct_fields("RopeScaling")) == ROPE_SCALING_FIELDS


def _save_config(tmp_path, config_class: str, **kwargs) -> pathlib.Path:
    config = getattr(transformers, config_class)(**{**TINY, **kwargs})
    config.save_pretrained(tmp_path)
    return tmp_path


def _check_spec_keys(spec: ModelSpec):
    assert tuple(spec.fields) == MODEL_CONFIG_FIELDS
    assert tuple(spec.fields["rope_scaling"]) == ROPE_SCALING_FIELDS


def test_llama_defaults(tmp_path):
    spec = load_hf_config(_save_config(tmp_path, "LlamaConfig", rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2))
    _check_spec_keys(spec)
    assert spec.fields == {
        "architecture": "LlamaForCausalLM", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 40,
        "num_layers": 2, "num_qo_heads": 4, "num_kv_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "rope_scaling": spec.fields["rope_scaling"],
        "max_position_embeddings": 256, "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": 1, "eos_token_id": 2}
    assert spec.fields["rope_scaling"]["rope_type"] == "default"
    assert spec.eos_token_ids == (2,) and spec.sliding_window is None and spec.max_model_len == 256


ROPE_CASES = [
    ("LlamaConfig", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}),
    ("LlamaConfig", {"rope_type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    ("LlamaConfig", {"type": "linear", "factor": 3.0}, {"rope_type": "linear", "factor": 3.0}),
    ("MistralConfig", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                       "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
      "beta_slow": 2.0, "attention_factor": 1.25}),
    ("Qwen2Config", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "truncate": False,
                     "mscale": 0.707, "mscale_all_dim": 1.0},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "truncate": False,
      "mscale": 0.707, "mscale_all_dim": 1.0}),
]


@pytest.mark.parametrize("config_class, rope_scaling, expected", ROPE_CASES)
def test_rope_scaling(tmp_path, config_class, rope_scaling, expected):
    spec = load_hf_config(_save_config(tmp_path, config_class, rope_theta=500000.0, rope_scaling=rope_scaling))
    _check_spec_keys(spec)
    assert spec.fields["rope_theta"] == 500000.0
    rope = spec.fields["rope_scaling"]
    assert {key: rope[key] for key in expected} == expected
    untouched = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "attention_factor": 0.0, "mscale": 0.0, "mscale_all_dim": 0.0, "truncate": True}
    assert {k: rope[k] for k in untouched if k not in expected} == {k: v for k, v in untouched.items()
                                                                     if k not in expected}


def test_transformers4_style_config():
    hf_config = {"architectures": ["LlamaForCausalLM"], **TINY, "rope_theta": 123.0, "partial_rotary_factor": 0.5,
                 "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": [5, 9], "bos_token_id": 3,
                 "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    spec = spec_from_hf_config(hf_config, {"eos_token_id": [9, 11]})
    assert spec.fields["rope_theta"] == 123.0 and spec.fields["partial_rotary_factor"] == 0.5
    assert spec.fields["rope_scaling"]["rope_type"] == "linear" and spec.fields["rope_scaling"]["factor"] == 2.0
    assert spec.fields["eos_token_id"] == 5 and spec.eos_token_ids == (5, 9, 11)
    assert spec.fields["bos_token_id"] == 3 and spec.fields["tie_word_embeddings"] is True
    assert spec.dtype == "bfloat16"


def test_partial_rotary_and_explicit_head_dim(tmp_path):
    spec = load_hf_config(_save_config(tmp_path, "LlamaConfig", head_dim=16, partial_rotary_factor=0.5))
    assert spec.fields["head_dim"] == 16 and spec.fields["partial_rotary_factor"] == 0.5


def test_mistral_sliding_window(tmp_path):
    spec = load_hf_config(_save_config(tmp_path, "MistralConfig", sliding_window=128))
    assert spec.architecture == "MistralForCausalLM" and spec.sliding_window == 128
    assert spec.fields["max_position_embeddings"] == 256 and spec.max_model_len == 128


def test_qwen2_window_only_when_enabled(tmp_path):
    spec = load_hf_config(_save_config(tmp_path / "off", "Qwen2Config", sliding_window=64, use_sliding_window=False))
    assert spec.sliding_window is None and spec.fields["attention_bias"] is True
    assert spec.fields["bos_token_id"] == -1 and spec.fields["eos_token_id"] == -1 and spec.eos_token_ids == ()
    spec = load_hf_config(_save_config(tmp_path / "on", "Qwen2Config", sliding_window=64, use_sliding_window=True,
                                       max_window_layers=0))
    assert spec.sliding_window == 64 and spec.max_model_len == 64


def test_eos_list_from_config_and_generation_config(tmp_path):
    model_dir = _save_config(tmp_path, "LlamaConfig", eos_token_id=[7, 3])
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 8]}))
    spec = load_hf_config(model_dir)
    assert spec.fields["eos_token_id"] == 7 and spec.eos_token_ids == (7, 3, 8)


def _base(**overrides):
    return {"architectures": ["LlamaForCausalLM"], **TINY, **overrides}


@pytest.mark.parametrize("hf_config, reason", [
    (_base(architectures=["GPT2LMHeadModel"]),
     "unsupported architecture 'GPT2LMHeadModel' \\(supported: LlamaForCausalLM, MistralForCausalLM, "
     "Qwen2ForCausalLM\\)"),
    ({**TINY, "model_type": "gemma"}, "no 'architectures' and a model_type lserve does not know \\('gemma'"),
    (_base(architectures=["LlamaForCausalLM", "MistralForCausalLM"]), "names several classes"),
    (_base(attention_bias=True), "o_proj bias"),
    (_base(mlp_bias=True), "mlp_bias"),
    (_base(hidden_act="gelu"), "hidden_act 'gelu'"),
    (_base(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "unsupported rope_scaling type 'dynamic' \\(supported: default, linear, llama3, yarn\\)"),
    (_base(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs low_freq_factor, high_freq_factor"),
    (_base(rope_scaling={"rope_type": "linear"}), "needs factor"),
    (_base(num_key_value_heads=3), r"num_kv_heads \(num_key_value_heads\) 3 must divide num_qo_heads"),
    (_base(hidden_size=30), "not a multiple of num_attention_heads"),
    (_base(vocab_size=None), "missing 'vocab_size'"),
    (_base(rms_norm_eps="small"), "'rms_norm_eps' must be a number"),
    (_base(eos_token_id="</s>"), "eos_token_id must be a token id"),
    (_base(head_dim=6, partial_rotary_factor=0.5), "rotary dimension 3 must be positive and even"),
    (_base(rms_norm_eps=float("inf")), "rms_norm_eps must be finite and positive, got inf"),  # json reads Infinity
    (_base(rope_theta=float("nan")), "rope_theta must be finite and positive, got nan"),
    (_base(bos_token_id=-2), "bos_token_id must be a token id"),
    (_base(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192}),
     r"rope_scaling \(llama3\) needs high_freq_factor > low_freq_factor > 0, got 1 and 4"),
    (_base(rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}),
     "rope_scaling.attention_factor must be >= 0, got -1"),
])
def test_bad_configs(hf_config, reason):
    with pytest.raises(ValueError, match=reason):
        spec_from_hf_config(hf_config)


def test_unsupported_architecture_from_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_base(architectures=["PhiForCausalLM"])))
    with pytest.raises(ValueError,
                       match="config.json: unsupported architecture 'PhiForCausalLM' \\(supported: LlamaForCausalLM, "):
        load_hf_config(tmp_path)


def test_missing_or_invalid_config_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        load_hf_config(tmp_path)


def test_model_spec_validates():
    spec = spec_from_hf_config(_base())
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        ModelSpec({**spec.fields, "extra": 1})
    with pytest.raises(ValueError, match="sliding_window"):
        ModelSpec(spec.fields, sliding_window=0)
    with pytest.raises(ValueError, match="rope_scaling.factor must be a real number, got '2'"):
        ModelSpec({**spec.fields, "rope_scaling": {**spec.fields["rope_scaling"], "factor": "2"}})


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", "5", "vocab_size must be an int, got '5'"),
    ("num_layers", 0, "num_layers must be positive, got 0"),
    ("bos_token_id", -2, r"bos_token_id must be -1 \(none\) or a token id >= 0, got -2"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be True or False, got 1"),
    ("partial_rotary_factor", 1.5, r"partial_rotary_factor 1.5 not in \(0, 1\]"),
    ("architecture", "GPT2LMHeadModel", "unsupported architecture 'GPT2LMHeadModel'"),
    ("max_position_embeddings", 2**31, "max_position_embeddings must fit a 32-bit int, got 2147483648"),
])
def test_model_spec_is_checked_by_the_core(field, value, message):
    """ModelSpec's rules are ModelConfig::validate()'s (and the bindings' conversions): one message,
    naming the field and the value, whichever way the config arrives."""
    from lserve import _C

    spec = spec_from_hf_config(_base())
    with pytest.raises(ValueError, match=message) as info:
        ModelSpec({**spec.fields, field: value})
    core = _C.ModelConfig()
    with pytest.raises(ValueError) as core_info:
        for name, current in {**spec.fields, field: value}.items():
            if name != "rope_scaling":
                setattr(core, name, current)
        core.validate()
    assert str(core_info.value) == str(info.value)


# ---- tiny models saved by transformers --------------------------------------------------------

TINY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, num_key_value_heads=1)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{variant: (model_dir, {name: float32 numpy state})}, saved in bfloat16 for the tied Llama."""
    torch.manual_seed(SEED)
    result = {}
    for variant, (config_class, model_class, kwargs) in TINY_MODELS.items():
        config = getattr(transformers, config_class)(**{**TINY, **kwargs})
        model = getattr(transformers, model_class)(config)
        if variant == "llama_tied":
            model = model.to(torch.bfloat16)
        model_dir = tmp_path_factory.mktemp(variant)
        model.save_pretrained(model_dir)
        state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}
        result[variant] = (model_dir, state)
    return result


@pytest.mark.parametrize("variant", list(TINY_MODELS))
def test_tiny_model_names_and_shapes(tiny_models, variant):
    model_dir, state = tiny_models[variant]
    spec = load_hf_config(model_dir)
    infos = list_safetensors_weights(model_dir)
    assert set(infos) == expected_weight_names(spec)
    assert {name: info.shape for name, info in infos.items()} == expected_weight_shapes(spec)
    assert check_weight_names(infos, spec) == set(infos)
    loaded = dict(iter_hf_weights(model_dir, spec))
    assert set(loaded) == expected_weight_names(spec)
    for name, array in loaded.items():
        assert array.dtype == np.float32
        assert_exact(array, state[name], what=f"{variant}:{name}", seed=SEED)


def test_tiny_model_fields(tiny_models):
    assert load_hf_config(tiny_models["qwen2"][0]).fields["attention_bias"] is True
    assert load_hf_config(tiny_models["qwen2_tied"][0]).fields["tie_word_embeddings"] is True
    assert load_hf_config(tiny_models["llama"][0]).fields["head_dim"] == 16
    assert load_hf_config(tiny_models["llama_tied"][0]).dtype == "bfloat16"


def test_qwen2_biases_expected():
    spec = spec_from_hf_config({**TINY, "model_type": "qwen2"})
    shapes = expected_weight_shapes(spec)
    assert shapes["model.layers.1.self_attn.q_proj.bias"] == (32,)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (16,)
    assert "model.layers.1.self_attn.o_proj.bias" not in shapes and "lm_head.weight" in shapes


def test_missing_and_unexpected_names_are_listed():
    spec = spec_from_hf_config(_base())
    found = expected_weight_names(spec) - {"model.layers.1.mlp.up_proj.weight", "lm_head.weight"}
    found |= {"model.layers.2.mlp.up_proj.weight"}
    with pytest.raises(ValueError) as error:
        check_weight_names(found, spec)
    message = str(error.value)
    assert "missing weights: lm_head.weight, model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected weights: model.layers.2.mlp.up_proj.weight" in message


def test_ignored_names():
    tied = spec_from_hf_config(_base(tie_word_embeddings=True))
    found = expected_weight_names(tied) | {"lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"}
    assert check_weight_names(found, tied) == expected_weight_names(tied)
    untied = spec_from_hf_config(_base())
    assert "lm_head.weight" in check_weight_names(expected_weight_names(untied), untied)


def test_shape_mismatch_names_the_tensor():
    spec = spec_from_hf_config(_base())
    shapes = dict(expected_weight_shapes(spec))
    shapes["model.layers.0.self_attn.k_proj.weight"] = (32, 32)
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.self_attn.k_proj.weight' has shape \(32, 32\), "
                                         r"expected \(16, 32\)"):
        check_weight_names(shapes, spec)
    with pytest.raises(ValueError, match="unexpected weight 'foo'"):
        check_weight_shape("foo", (1,), expected_weight_shapes(spec))


def test_iter_hf_weights_checks_before_reading(tiny_models, tmp_path):
    model_dir, _ = tiny_models["llama"]
    spec = load_hf_config(tiny_models["mistral"][0])  # no head_dim=16: every attention shape differs
    with pytest.raises(ValueError, match="has shape"):
        iter_hf_weights(model_dir, spec)
