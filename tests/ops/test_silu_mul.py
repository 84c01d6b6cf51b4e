"""silu_mul: output = silu(gate) * up with input = [gate | up]; fp32 elementwise tolerance."""
import numpy as np
import pytest
from lserve_testing import assert_close_fp32


def reference_silu_mul(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    half = x.shape[1] // 2
    gate, up = x[:, :half], x[:, half:]
    with np.errstate(over="ignore"):  # exp(1000) = inf gives silu = -0, as intended
        return gate / (1.0 + np.exp(-gate)) * up


@pytest.mark.parametrize("num_tokens,intermediate_size", [(1, 1), (19, 113), (113, 1536)])
def test_silu_mul_matches_formula(backend, num_tokens, intermediate_size):
    seed = num_tokens + intermediate_size
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((num_tokens, 2 * intermediate_size)) * 4).astype(np.float32)
    output = np.full((num_tokens, intermediate_size), np.nan, np.float32)
    backend.silu_mul(x, output)
    assert_close_fp32(output, reference_silu_mul(x), "silu_mul", seed)


def test_silu_mul_extremes_and_strides(backend):
    gate = np.array([[-1000.0, -88.0, -20.0, 0.0, 20.0, 88.0, 1000.0]], np.float32)
    up = np.full_like(gate, 2.0)
    buffer = np.concatenate([np.zeros((1, 3), np.float32), gate, up], axis=1)
    x = buffer[:, 3:]  # strided row start
    output = np.full((1, 7), np.nan, np.float32)
    backend.silu_mul(x, output)
    assert_close_fp32(output, reference_silu_mul(x), "silu_mul at extreme inputs")


def test_silu_mul_rejects_bad_shapes(backend):
    with pytest.raises(ValueError, match="even"):
        backend.silu_mul(np.zeros((2, 7), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="output"):
        backend.silu_mul(np.zeros((2, 8), np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="input"):
        backend.silu_mul(np.zeros((2, 8), np.float64), np.zeros((2, 4), np.float32))
