"""The logprobs op (ops/logprobs.h) on the CPU reference against a numpy log-softmax.

Values: fp32 tolerance against float64 numpy. Top ids: exact, larger logit first and the lower id
on ties. Data (NaN logits, a token id outside the vocabulary) never raises: it gives NaN."""
from __future__ import annotations

import numpy as np
import pytest

from lserve import _C
from lserve_testing import assert_close_fp32, assert_exact


@pytest.fixture(scope="module")
def cpu():
    return _C.Backend("cpu", 2)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def best_first(row: np.ndarray) -> np.ndarray:
    """Token ids by larger logit first, lower id on ties."""
    return np.lexsort((np.arange(row.size), -row.astype(np.float64)))


def run(backend, logits, row_indices, token_ids, num_top):
    num_rows = len(row_indices)
    logprobs = np.full(num_rows, 7.0, np.float32)  # poison
    top_ids = np.full((num_rows, num_top), -7, np.int32)
    top_logprobs = np.full((num_rows, num_top), 7.0, np.float32)
    backend.logprobs(logits, np.asarray(row_indices, np.int32), np.asarray(token_ids, np.int32), logprobs, top_ids,
                     top_logprobs)
    return logprobs, top_ids, top_logprobs


@pytest.mark.parametrize("vocab_size, num_top", [(1, 0), (19, 5), (1023, 20), (50257, 1), (50257, 20)])
def test_matches_numpy_log_softmax(cpu, vocab_size, num_top):
    seed = vocab_size + num_top
    rng = np.random.default_rng(seed)
    num_logits_rows = 3
    logits = (rng.standard_normal((num_logits_rows, vocab_size)) * rng.uniform(0.5, 8.0, (num_logits_rows, 1)))
    logits = logits.astype(np.float32)
    row_indices = [2, 0, 0, 1, 2]  # rows may share a logits row (forked samples)
    token_ids = rng.integers(0, vocab_size, len(row_indices))
    logprobs, top_ids, top_logprobs = run(cpu, logits, row_indices, token_ids, num_top)
    reference = log_softmax(logits)
    for r, logits_row in enumerate(row_indices):
        what = f"row {r} (logits row {logits_row}, vocab {vocab_size})"
        assert_close_fp32(logprobs[r], reference[logits_row, token_ids[r]], what, seed)
        expected_ids = best_first(logits[logits_row])[:num_top]
        assert_exact(top_ids[r], expected_ids, f"{what}: top ids", seed)
        assert_close_fp32(top_logprobs[r], reference[logits_row, expected_ids], f"{what}: top logprobs", seed)


def test_ties_rank_the_lower_id_first(cpu):
    logits = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], np.float32)
    _, top_ids, top_logprobs = run(cpu, logits, [0], [0], 4)
    assert top_ids[0].tolist() == [1, 2, 4, 3]
    assert_close_fp32(top_logprobs[0], log_softmax(logits[0])[[1, 2, 4, 3]], "tied logprobs")


def test_more_top_than_vocab_leaves_the_tail_empty(cpu):
    logits = np.array([[0.5, -0.5]], np.float32)
    logprobs, top_ids, top_logprobs = run(cpu, logits, [0], [1], 5)
    assert top_ids[0].tolist() == [0, 1, -1, -1, -1]
    assert_close_fp32(top_logprobs[0, :2], log_softmax(logits[0]), "present entries")
    assert (top_logprobs[0, 2:] == -np.inf).all()
    assert_close_fp32(logprobs[0], log_softmax(logits[0])[1], "chosen")


def test_infinite_logits(cpu):
    logits = np.array([[-np.inf, 1.0, -np.inf, 0.0], [np.inf, 0.0, np.inf, 1.0]], np.float32)
    logprobs, top_ids, top_logprobs = run(cpu, logits, [0, 1], [1, 2], 4)
    assert_close_fp32(logprobs[0], log_softmax(logits[0, [1, 3]])[0], "finite row")
    assert top_ids[0].tolist() == [1, 3, 0, 2]
    assert (top_logprobs[0, 2:] == -np.inf).all()
    # Two tokens at +inf share the mass: each -log 2; the finite ones -inf.
    assert top_ids[1].tolist() == [0, 2, 3, 1]
    assert_close_fp32(top_logprobs[1, :2], [-np.log(2.0)] * 2, "+inf tokens")
    assert (top_logprobs[1, 2:] == -np.inf).all()
    assert_close_fp32(logprobs[1], -np.log(2.0), "chosen +inf token")


def test_nan_and_bad_token_ids_give_nan(cpu):
    logits = np.array([[0.0, 1.0, 2.0], [0.0, np.nan, 2.0]], np.float32)
    logprobs, top_ids, top_logprobs = run(cpu, logits, [0, 0, 1], [-1, 3, 0], 3)
    assert np.isnan(logprobs).all()  # -1 and 3 lie outside the vocabulary; row 2 holds a NaN
    assert top_ids[0].tolist() == [2, 1, 0] and np.isfinite(top_logprobs[0]).all()
    assert top_ids[2].tolist() == [2, 0, 1], "NaN ranks last"
    assert np.isnan(top_logprobs[2]).all()


def test_bad_arguments_raise(cpu):
    logits = np.zeros((2, 8), np.float32)
    ok = dict(row_indices=np.zeros(3, np.int32), token_ids=np.zeros(3, np.int32),
              logprobs=np.zeros(3, np.float32), top_token_ids=np.zeros((3, 2), np.int32),
              top_logprobs=np.zeros((3, 2), np.float32))
    cpu.logprobs(logits, **ok)
    cases = [
        (dict(row_indices=np.array([0, 2, 1], np.int32)), r"row_indices\[1\] = 2 outside \[0, 2\)"),
        (dict(row_indices=np.array([0, -1, 1], np.int32)), r"row_indices\[1\] = -1"),
        (dict(token_ids=np.zeros(2, np.int32)), "token_ids"),
        (dict(logprobs=np.zeros(3, np.float64)), "logprobs"),
        (dict(top_logprobs=np.zeros((3, 3), np.float32)), "top_logprobs"),
        (dict(top_token_ids=np.zeros((3, 21), np.int32), top_logprobs=np.zeros((3, 21), np.float32)),
         "at most 20 top logprobs"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            cpu.logprobs(logits, **{**ok, **change})
    with pytest.raises(ValueError, match="logits"):
        cpu.logprobs(logits.astype(np.float64), **ok)


def test_logits_are_read_only(cpu):
    seed = 11
    logits = np.random.default_rng(seed).standard_normal((2, 300)).astype(np.float32)
    before = logits.copy()
    run(cpu, logits, [1, 0], [5, 6], 20)
    assert_exact(logits, before, "logits after logprobs", seed)
