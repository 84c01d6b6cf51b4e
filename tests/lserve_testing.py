"""Shared test helpers: the one place tolerances live (see STYLE.md, "Tests").

Rules:
  exact: data movement, indices, page selections, greedy tokens
  fp32 elementwise: rtol = atol = 1e-5
  bf16/fp16 elementwise: atol + |ref| * eps(dtype)
  reductions / GEMM: normalised MSE bound
Every failure message names the seed, the shape, the max error and where it is.
"""
from __future__ import annotations

import numpy as np

EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _where(err: np.ndarray) -> tuple:
    return np.unravel_index(int(np.argmax(err)), err.shape) if err.size else ()


def assert_exact(actual, expected, what: str = "", seed=None) -> None:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} (seed={seed})"
    bad = actual != expected
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ; first at {idx}: "
            f"{actual[idx]} != {expected[idx]} (seed={seed}, shape={expected.shape})")


def assert_close_fp32(actual, expected, what: str = "", seed=None, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} (seed={seed})"
    assert np.isfinite(actual).all(), f"{what}: non-finite output (seed={seed}, shape={expected.shape})"
    err = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    if (err > bound).any():
        idx = _where(err - bound)
        raise AssertionError(
            f"{what}: max error {err.max():.3e} at {idx} ({actual[idx]} vs {expected[idx]}), "
            f"bound atol={atol} rtol={rtol} (seed={seed}, shape={expected.shape})")


def assert_close_lowp(actual, expected, dtype: str, what: str = "", seed=None, atol: float = 1e-5) -> None:
    """bf16/fp16 elementwise: |a - e| <= atol + |e| * eps(dtype)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    err = np.abs(actual - expected)
    bound = atol + np.abs(expected) * EPS[dtype]
    if (err > bound).any():
        idx = _where(err - bound)
        raise AssertionError(
            f"{what}: max error {err.max():.3e} at {idx} beyond atol + |ref|*eps({dtype}) "
            f"(seed={seed}, shape={expected.shape})")


def assert_nmse(actual, expected, bound: float = 1e-10, what: str = "", seed=None) -> None:
    """Reductions and GEMMs: sum((a - e)^2) / sum(e^2) <= bound."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} (seed={seed})"
    assert np.isfinite(actual).all(), f"{what}: non-finite output (seed={seed})"
    nmse = float(np.sum((actual - expected) ** 2) / max(np.sum(expected**2), 1e-300))
    if nmse > bound:
        err = np.abs(actual - expected)
        idx = _where(err)
        raise AssertionError(
            f"{what}: normalised MSE {nmse:.3e} > {bound:.1e}; max error {err.max():.3e} at {idx} "
            f"(seed={seed}, shape={expected.shape})")


def assert_rel_close(actual, expected, rel: float, what: str = "", seed=None) -> None:
    """max|a - e| <= rel * max|e| (model logits against transformers)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} (seed={seed})"
    err = np.abs(actual - expected)
    scale = max(float(np.abs(expected).max()), 1e-30)
    if err.max() > rel * scale:
        idx = _where(err)
        raise AssertionError(
            f"{what}: max error {err.max():.3e} at {idx} > {rel:.1e} * max|ref| ({scale:.3e}) "
            f"(seed={seed}, shape={expected.shape})")
