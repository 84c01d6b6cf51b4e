"""Shared test helpers: the one place tolerances live (see STYLE.md, "Tests").

Rules:
  exact: data movement, indices, page selections, greedy tokens
  fp32 elementwise: rtol = atol = 1e-5
  bf16/fp16 elementwise: atol + |ref| * eps(dtype)
  reductions / GEMM: normalised MSE bound
Every failure message names the seed, the shape, the max error and where it is.
"""
from __future__ import annotations

import math

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


# ---- sampling statistics (the host sampler's and the sample op's tests) -----------------------------

def chi_square_bound(df: int, z: float = 4.75) -> float:
    """Upper quantile of chi-square(df) at a normal z-score (Wilson-Hilferty); z=4.75 ~ 1e-6."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def assert_distribution(samples: np.ndarray, expected: np.ndarray, what: str, seed) -> None:
    counts = np.bincount(samples, minlength=expected.size)
    disallowed = np.flatnonzero((counts > 0) & (expected == 0))
    assert disallowed.size == 0, (f"{what}: drew disallowed tokens {disallowed[:10].tolist()} "
                                  f"(seed={seed}, vocab={expected.size})")
    expected_counts = expected * samples.size
    # Cells: every allowed token expected at least 5 times; the rarer ones pooled into one cell,
    # or folded into the smallest cell when even the pool is expected fewer than 5 times.
    big = expected_counts >= 5
    small = (expected > 0) & ~big
    observed_cells = counts[big].astype(np.float64)
    expected_cells = expected_counts[big]
    if small.any():
        if expected_counts[small].sum() >= 5 or not big.any():
            observed_cells = np.append(observed_cells, counts[small].sum())
            expected_cells = np.append(expected_cells, expected_counts[small].sum())
        else:
            smallest = int(np.argmin(expected_cells))
            observed_cells[smallest] += counts[small].sum()
            expected_cells[smallest] += expected_counts[small].sum()
    if observed_cells.size < 2:
        return  # one allowed token: the disallowed check above is the whole test
    df = observed_cells.size - 1
    statistic = float(np.sum((observed_cells - expected_cells) ** 2 / expected_cells))
    bound = chi_square_bound(df)
    worst = int(np.argmax(np.abs(observed_cells - expected_cells)))
    assert statistic <= bound, (
        f"{what}: chi-square {statistic:.1f} > {bound:.1f} (df={df}); worst cell {worst}: observed "
        f"{observed_cells[worst]} vs expected {expected_cells[worst]:.1f} (seed={seed}, vocab={expected.size})")


def make_logits(seed: int, vocab_size: int, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab_size) * scale).astype(np.float32)


# Filter settings both sampler tests draw against their reference distributions.
FILTER_CASES = {
    "plain": dict(),
    "temperature 0.5": dict(temperature=0.5),
    "temperature 1.7": dict(temperature=1.7),
    "top_k 5": dict(top_k=5),
    "top_k 1": dict(top_k=1),
    "top_p 0.6": dict(top_p=0.6),
    "top_p tiny": dict(top_p=1e-6),
    "min_p 0.1": dict(min_p=0.1),
    "top_k + top_p": dict(top_k=10, top_p=0.7),
    "top_k + top_p + min_p": dict(top_k=12, top_p=0.9, min_p=0.2, temperature=0.8),
    "top_p + min_p": dict(top_p=0.8, min_p=0.05),
}


def stream_ring_caches(k_cache, v_cache, page_indices, page_indptr, seqs, num_sink_pages: int, local: int):
    """Lays the keys and values of paged sequences out as streaming-head rings (ops/attention.h's
    stream_ring): per sequence num_sink_pages sink pages, then a ring sized like the page selector
    sizes it (the window plus the chunk), tokens written in order so later ones overwrite earlier
    ones on a reused ring page. Returns float32 (ring_k, ring_v, rings): slots no token reached hold
    NaN, rings is (num_seqs, 4) [sink_base, num_sink, ring_base, num_ring] int32."""
    k_cache, v_cache = np.asarray(k_cache, np.float32), np.asarray(v_cache, np.float32)
    page_indices, page_indptr = np.asarray(page_indices), np.asarray(page_indptr)
    page_size = k_cache.shape[1]
    rings, total = [], 0
    for q_len, _ in seqs:
        num_ring = math.ceil((local + q_len - 1) / page_size) + 1
        rings.append((total, num_sink_pages, total + num_sink_pages, num_ring))
        total += num_sink_pages + num_ring
    ring_k = np.full((total,) + k_cache.shape[1:], np.nan, np.float32)
    ring_v = ring_k.copy()
    for s, (_, kv_len) in enumerate(seqs):
        pages = page_indices[page_indptr[s]:page_indptr[s + 1]]
        sink_base, num_sink, ring_base, num_ring = rings[s]
        for t in range(kv_len):
            lp = t // page_size
            dst = sink_base + lp if lp < num_sink else ring_base + (lp - num_sink) % num_ring
            ring_k[dst, t % page_size] = k_cache[pages[lp], t % page_size]
            ring_v[dst, t % page_size] = v_cache[pages[lp], t % page_size]
    return ring_k, ring_v, np.array(rings, np.int32)
