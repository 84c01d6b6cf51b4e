"""rms_norm (optionally fused with the residual add) against x / sqrt(mean(x^2) + eps) * w in float64."""
import numpy as np
import pytest
import torch
from lserve_testing import assert_close_fp32, assert_exact

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reference_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * weight.astype(np.float64)


@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden_size", [(1, 1), (19, 113), (113, 4096)])
def test_rms_norm_matches_formula(backend, weight_dtype, num_tokens, hidden_size):
    seed = num_tokens * 7 + hidden_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden_size, generator=generator) * 3
    weight = (1 + 0.1 * torch.randn(hidden_size, generator=generator)).to(DTYPES[weight_dtype])
    output = torch.full_like(x, float("nan"))
    backend.rms_norm(x, None, weight, output, 1e-5)
    expected = reference_rms_norm(x.numpy(), weight.float().numpy(), 1e-5)
    assert_close_fp32(output.numpy(), expected, f"rms_norm weight={weight_dtype}", seed)


@pytest.mark.parametrize("num_tokens,hidden_size", [(1, 64), (19, 113)])
def test_rms_norm_fused_residual(backend, num_tokens, hidden_size):
    seed = 3 * num_tokens + hidden_size
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, hidden_size)).astype(np.float32)
    residual = rng.standard_normal((num_tokens, hidden_size)).astype(np.float32)
    weight = rng.standard_normal(hidden_size).astype(np.float32)
    expected_residual = x + residual  # fp32 add, exact
    output = np.full_like(x, np.nan)
    backend.rms_norm(x, residual, weight, output, 1e-6)
    assert_exact(residual, expected_residual, "residual += input", seed)
    assert_close_fp32(output, reference_rms_norm(expected_residual, weight, 1e-6), "fused rms_norm", seed)


def test_rms_norm_in_place_on_strided_rows(backend):
    seed = 11
    rng = np.random.default_rng(seed)
    buffer = rng.standard_normal((13, 200)).astype(np.float32)
    x = buffer[:, 50:163]  # rows 200 floats apart
    weight = rng.standard_normal(113).astype(np.float32)
    expected = reference_rms_norm(x.copy(), weight, 1e-6)
    untouched = buffer[:, :50].copy()
    backend.rms_norm(x, None, weight, x, 1e-6)  # output aliases input
    assert_close_fp32(x, expected, "in-place rms_norm", seed)
    assert_exact(buffer[:, :50], untouched, "columns outside the view", seed)


def test_rms_norm_rejects_bad_arguments(backend):
    x = np.zeros((3, 8), np.float32)
    out = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="weight"):
        backend.rms_norm(x, None, np.ones(7, np.float32), out, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        backend.rms_norm(x, None, np.ones(8, np.float32), out, 0.0)
    with pytest.raises(ValueError, match="residual"):
        backend.rms_norm(x, np.zeros((2, 8), np.float32), np.ones(8, np.float32), out, 1e-6)
    with pytest.raises(ValueError, match="output"):
        backend.rms_norm(x, None, np.ones(8, np.float32), np.zeros((3, 9), np.float32), 1e-6)
