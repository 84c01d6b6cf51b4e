"""lserve.loader.dummy: real shapes, determinism per (seed, name), dtypes, one tensor at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lserve.loader.dummy as dummy
from lserve.loader.dummy import dummy_weights, float32_to_bf16_bits
from lserve.loader.hf import expected_weight_shapes, spec_from_hf_config
from lserve_testing import assert_exact

SEED = 3
BASE = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 113, "num_hidden_layers": 3,
        "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _spec(model_type="llama", **overrides):
    return spec_from_hf_config({"model_type": model_type, **BASE, **overrides})


@pytest.mark.parametrize("spec", [_spec(), _spec("qwen2", tie_word_embeddings=True), _spec(head_dim=16)],
                         ids=["llama", "qwen2_tied", "head_dim16"])
def test_shapes_match_expected(spec):
    weights = list(dummy_weights(spec, SEED))
    assert [(name, array.shape) for name, array in weights] == list(expected_weight_shapes(spec).items())
    assert all(array.dtype == np.float32 for _, array in weights)


def test_accepts_a_fields_dict():
    spec = _spec()
    assert [n for n, _ in dummy_weights(spec.fields, SEED)] == [n for n, _ in dummy_weights(spec, SEED)]


def test_deterministic_and_seed_dependent():
    spec = _spec()
    first, again, other = (dict(dummy_weights(spec, seed)) for seed in (SEED, SEED, SEED + 1))
    for name in first:
        assert_exact(again[name], first[name], what=name, seed=SEED)
        assert not np.array_equal(other[name], first[name]), name


def test_values_depend_only_on_seed_and_name():
    small, large = dict(dummy_weights(_spec(num_hidden_layers=1), SEED)), dict(dummy_weights(_spec(), SEED))
    for name in small:
        assert_exact(small[name], large[name], what=name, seed=SEED)
    q0, q1 = large["model.layers.0.self_attn.q_proj.weight"], large["model.layers.1.self_attn.q_proj.weight"]
    assert not np.array_equal(q0, q1)


def test_distributions():
    weights = dict(dummy_weights(_spec(vocab_size=4001), SEED))
    embed = weights["model.embed_tokens.weight"].astype(np.float64)  # 256k samples
    assert abs(embed.mean()) < 1e-3 and abs(embed.std() - 0.02) < 1e-3, (embed.mean(), embed.std())
    norms = np.concatenate([a for n, a in weights.items() if n.endswith("norm.weight")]).astype(np.float64)
    assert abs(norms.mean() - 1.0) < 0.01 and 0.01 < norms.std() < 0.03, (norms.mean(), norms.std())


def test_lazy_one_tensor_at_a_time(monkeypatch):
    made = []
    real = dummy.dummy_weight
    monkeypatch.setattr(dummy, "dummy_weight", lambda *args: made.append(args[0]) or real(*args))
    iterator = dummy_weights(_spec(), SEED)
    assert made == []
    next(iterator)
    assert made == ["model.embed_tokens.weight"]


def test_half_dtypes():
    spec = _spec()
    f32 = dict(dummy_weights(spec, SEED))
    f16 = dict(dummy_weights(spec, SEED, dtype="float16"))
    bf16 = dict(dummy_weights(spec, SEED, dtype="bfloat16"))
    for name, values in f32.items():
        assert_exact(f16[name], values.astype(np.float16), what=name, seed=SEED)
        torch_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert bf16[name].dtype == np.uint16
        assert_exact(bf16[name], torch_bits, what=name, seed=SEED)


def test_bf16_rounding_ties_to_even():
    values = np.array([1.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -2.5, 1e-40, 3.0e38], dtype=np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert_exact(float32_to_bf16_bits(values), expected, what="ties", seed=None)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(seed=-1), "seed must be an int >= 0"),
    (dict(seed=1.5), "seed must be an int >= 0"),
    (dict(seed=0, dtype="int8"), "dtype must be one of"),
])
def test_bad_arguments(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        dummy_weights(_spec(), **kwargs)
