"""rope_frequencies / rope_cos_sin_cache against transformers: inv_freq and attention scaling
from ROPE_INIT_FUNCTIONS (and the Llama default), and the cos/sin table against
LlamaRotaryEmbedding.forward. transformers computes in float32, lserve in double, so inv_freq
agrees to a few float32 ulps."""
import math

import numpy as np
import pytest
import torch
from lserve import _C
from lserve_testing import assert_close_fp32

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

CASES = [  # (head_dim, rope_theta, partial_rotary_factor, max_position_embeddings, rope_scaling)
    (64, 10000.0, 1.0, 2048, None),
    (128, 500000.0, 1.0, 8192, None),
    (64, 10000.0, 1.0, 4096, {"rope_type": "linear", "factor": 2.0}),
    (128, 10000.0, 0.5, 4096, {"type": "linear", "factor": 4.0}),  # legacy "type" key
    (128, 500000.0, 1.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    (64, 10000.0, 1.0, 32768, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0,
                               "high_freq_factor": 8.0, "original_max_position_embeddings": 4096}),
    (128, 1000000.0, 1.0, 131072, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    (64, 10000.0, 1.0, 16384, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
                               "beta_fast": 16, "beta_slow": 2, "truncate": False}),
    (64, 10000.0, 1.0, 16384, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                               "mscale": 1.0, "mscale_all_dim": 0.707}),
    (64, 10000.0, 0.75, 8192, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                               "attention_factor": 1.25}),
    (64, 10000.0, 1.0, 8192, {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 2048}),  # implicit factor
]


def hf_config(head_dim, rope_theta, partial_rotary_factor, max_position_embeddings, rope_scaling):
    parameters = dict(rope_scaling) if rope_scaling else {"rope_type": "default"}
    parameters.setdefault("rope_type", parameters.pop("type", "default"))
    parameters["rope_theta"] = rope_theta
    if partial_rotary_factor != 1.0:
        parameters["partial_rotary_factor"] = partial_rotary_factor
    return LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings, rope_parameters=parameters)


def hf_frequencies(config):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.double().numpy(), float(scaling)


def case_id(case):
    scaling = case[4]
    name = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return f"{name}-d{case[0]}-p{case[2]}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_rope_frequencies_match_transformers(case):
    head_dim, rope_theta, partial, max_positions, scaling = case
    if scaling is None and partial != 1.0:
        pytest.skip("Llama's default rope ignores partial_rotary_factor")
    expected_inv_freq, expected_scaling = hf_frequencies(hf_config(*case))
    inv_freq, attention_scaling = _C.rope_frequencies(head_dim, rope_theta, partial, scaling, max_positions)
    assert inv_freq.shape == expected_inv_freq.shape, (inv_freq.shape, expected_inv_freq.shape)
    # transformers' float32 pow and products: a few ulps of float32
    assert_close_fp32(inv_freq, expected_inv_freq, f"inv_freq {case_id(case)}", rtol=2e-6, atol=0.0)
    assert math.isclose(attention_scaling, expected_scaling, rel_tol=1e-6), (attention_scaling, expected_scaling)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_cos_sin_cache_layout(case):
    """Row p = [cos(p f) | sin(p f)] * attention_scaling, evaluated in float64 from the frequencies."""
    head_dim, rope_theta, partial, max_positions, scaling = case
    inv_freq, attention_scaling = _C.rope_frequencies(head_dim, rope_theta, partial, scaling, max_positions)
    num_positions = 3000
    cache = _C.rope_cos_sin_cache(head_dim, rope_theta, num_positions, partial, scaling, max_positions)
    assert cache.dtype == np.float32 and cache.shape == (num_positions, 2 * inv_freq.size)
    angles = np.arange(num_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1) * attention_scaling
    assert_close_fp32(cache, expected, f"cos/sin cache {case_id(case)}", rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == 1.0], ids=[case_id(c) for c in CASES if c[2] == 1.0])
def test_cos_sin_cache_matches_transformers_rotary_embedding(case):
    """Against LlamaRotaryEmbedding.forward at small positions, where its float32 angles are exact enough."""
    head_dim, rope_theta, partial, max_positions, scaling = case
    config = hf_config(*case)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.arange(64)[None, :]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)  # (1, 64, head_dim)
    cache = _C.rope_cos_sin_cache(head_dim, rope_theta, 64, partial, scaling, max_positions)
    half = head_dim // 2
    assert_close_fp32(cache[:, :half], cos[0, :, :half].numpy(), f"cos {case_id(case)}", rtol=0.0, atol=2e-5)
    assert_close_fp32(cache[:, half:], sin[0, :, :half].numpy(), f"sin {case_id(case)}", rtol=0.0, atol=2e-5)


def test_rope_rejects_bad_configs():
    with pytest.raises(ValueError, match="unsupported rope_type"):
        _C.rope_cos_sin_cache(64, 10000.0, 8, 1.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        _C.rope_cos_sin_cache(64, 10000.0, 8, 1.0, {"rope_type": "linear"})
    with pytest.raises(ValueError, match="rotary_dim"):
        _C.rope_cos_sin_cache(64, 10000.0, 8, 0.3)  # 19 channels: odd
    with pytest.raises(ValueError, match="rope_theta"):
        _C.rope_cos_sin_cache(64, 0.0, 8)
