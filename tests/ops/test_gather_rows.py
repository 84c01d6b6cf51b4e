"""gather_rows: output[i] = input[indices[i]], exact."""
import numpy as np
import pytest
from lserve_testing import assert_exact


@pytest.mark.parametrize("num_rows,width,num_out", [(1, 1, 1), (19, 113, 7), (113, 1023, 113)])
def test_gather_rows_matches_indexing(backend, num_rows, width, num_out):
    seed = num_rows * 31 + num_out
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num_rows, width + 3)).astype(np.float32)
    source = table[:, 2:2 + width]  # strided rows
    indices = rng.integers(0, num_rows, size=num_out).astype(np.int32)
    indices[-1] = num_rows - 1
    output = np.full((num_out, width), np.nan, np.float32)
    backend.gather_rows(source, indices, output)
    assert_exact(output, source[indices], "gather_rows", seed)


def test_gather_rows_repeats_and_empty(backend):
    source = np.arange(12, dtype=np.float32).reshape(4, 3)
    output = np.zeros((5, 3), np.float32)
    indices = np.array([3, 3, 0, 1, 3], np.int32)
    backend.gather_rows(source, indices, output)
    assert_exact(output, source[indices], "repeated indices")
    backend.gather_rows(source, np.empty((0,), np.int32), np.empty((0, 3), np.float32))


@pytest.mark.parametrize("bad_index", [-1, 4])
def test_gather_rows_rejects_out_of_range(backend, bad_index):
    source = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        backend.gather_rows(source, np.array([0, bad_index], np.int32), np.zeros((2, 3), np.float32))


def test_gather_rows_rejects_bad_arguments(backend):
    source = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="output"):
        backend.gather_rows(source, np.array([0, 1], np.int32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="indices"):
        backend.gather_rows(source, np.array([0, 1], np.int64), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="input"):
        backend.gather_rows(source.astype(np.float64), np.array([0, 1], np.int32), np.zeros((2, 3), np.float32))
