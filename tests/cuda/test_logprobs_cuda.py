"""logprobs on CUDA against the CPU reference on the same Args (ops/logprobs.h).

Top token ids exact (both rank by the raw logits, larger first, lower id on ties); values within fp32
tolerance (both sum exp(x - max) in float64, in different orders, with their own expf). The
outputs are poisoned before each CUDA run."""
from __future__ import annotations

import numpy as np
import pytest

from cuda_testing import DEVICE, on_gpu, require, torch
from lserve_testing import assert_close_fp32, assert_exact

pytestmark = pytest.mark.cuda

POISON_ID = -12345


def make_logits(num_logits_rows: int, vocab_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((num_logits_rows, vocab_size)) * rng.uniform(0.5, 8.0, (num_logits_rows, 1)))
    logits = logits.astype(np.float32)
    logits[1::3] = np.round(logits[1::3] * 2.0) / 2.0  # many ties: the lower id must rank first
    return logits


def run(backend, logits, row_indices, token_ids, num_top, device):
    num_rows = len(row_indices)
    as_tensor = (lambda a: on_gpu(a)) if device != "cpu" else (lambda a: torch.from_numpy(a.copy()))
    args = dict(
        logits=as_tensor(logits),
        row_indices=torch.tensor(np.asarray(row_indices, np.int32), device=device),
        token_ids=torch.tensor(np.asarray(token_ids, np.int32), device=device),
        logprobs=torch.full((num_rows,), float("nan"), device=device),
        top_token_ids=torch.full((num_rows, num_top), POISON_ID, dtype=torch.int32, device=device),
        top_logprobs=torch.full((num_rows, num_top), float("nan"), device=device),
    )
    backend.logprobs(**args)
    return tuple(args[key].cpu().numpy() for key in ("logprobs", "top_token_ids", "top_logprobs"))


@pytest.mark.parametrize("vocab_size", [1, 19, 1023, 2048, 2049, 49152, 128256])
@pytest.mark.parametrize("num_top", [0, 1, 20])
def test_logprobs_match_cpu(cuda_backend, cpu_backend, vocab_size, num_top):
    require(cuda_backend, "logprobs")
    seed = vocab_size * 31 + num_top
    rng = np.random.default_rng(seed)
    num_logits_rows = 9
    logits = make_logits(num_logits_rows, vocab_size, seed)
    row_indices = rng.integers(0, num_logits_rows, 13)  # shared rows, as forked samples read them
    token_ids = rng.integers(0, vocab_size, 13)
    token_ids[5] = -1  # a row the sampler rejected: NaN on both
    expected = run(cpu_backend, logits, row_indices, token_ids, num_top, "cpu")
    actual = run(cuda_backend, logits, row_indices, token_ids, num_top, DEVICE)
    what = f"logprobs ({vocab_size}, top {num_top})"
    assert np.isnan(actual[0][5]) and np.isnan(expected[0][5]), f"{what}: token -1 gives NaN (seed={seed})"
    keep = np.arange(13) != 5
    assert_close_fp32(actual[0][keep], expected[0][keep], f"{what}: chosen", seed)
    assert_exact(actual[1], expected[1], f"{what}: top ids", seed)
    present = expected[1] >= 0
    assert_close_fp32(actual[2][present], expected[2][present], f"{what}: top logprobs", seed)
    assert (actual[2][~present] == -np.inf).all(), f"{what}: the tail past the vocabulary is -inf (seed={seed})"


def test_logprobs_nan_and_infinite_rows(cuda_backend, cpu_backend):
    logits = np.array([[-np.inf, 1.0, -np.inf, 0.0], [np.inf, 0.0, np.inf, 1.0], [0.0, np.nan, 2.0, 1.0]],
                      np.float32)
    expected = run(cpu_backend, logits, [0, 1, 2], [1, 2, 0], 4, "cpu")
    actual = run(cuda_backend, logits, [0, 1, 2], [1, 2, 0], 4, DEVICE)
    assert_exact(actual[1], expected[1], "top ids with inf and NaN")
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(actual[2], expected[2], rtol=1e-5, atol=1e-5, equal_nan=True)
