"""embed: output[t] = float(weight[token_ids[t]]), exact for every weight dtype."""
import numpy as np
import pytest
import torch
from lserve_testing import assert_exact

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,vocab_size,hidden_size", [(1, 1, 1), (7, 113, 19), (64, 1023, 64)])
def test_embed_matches_indexing(backend, dtype, num_tokens, vocab_size, hidden_size):
    seed = 1000 + num_tokens
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab_size, hidden_size, generator=generator).to(DTYPES[dtype])
    token_ids = torch.randint(0, vocab_size, (num_tokens,), generator=generator, dtype=torch.int32)
    token_ids[0] = vocab_size - 1  # the last row
    output = torch.full((num_tokens, hidden_size), float("nan"))
    backend.embed(token_ids, weight, output)
    assert_exact(output.numpy(), weight.float()[token_ids.long()].numpy(), "embed", seed)


def test_embed_strided_output_rows(backend):
    seed = 7
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((50, 19)).astype(np.float32)
    token_ids = rng.integers(0, 50, size=11).astype(np.int32)
    buffer = np.full((11, 40), -1.0, np.float32)
    backend.embed(token_ids, weight, buffer[:, 5:24])  # rows 40 floats apart
    assert_exact(buffer[:, 5:24], weight[token_ids], "embed into a column slice", seed)
    assert_exact(buffer[:, :5], np.full((11, 5), -1.0, np.float32), "left of the slice untouched", seed)
    assert_exact(buffer[:, 24:], np.full((11, 16), -1.0, np.float32), "right of the slice untouched", seed)


def test_embed_no_tokens(backend):
    """No tokens: nothing is written (the rows around an empty output slice keep their values)."""
    weight = np.ones((5, 3), np.float32)
    buffer = np.full((2, 3), 7.0, np.float32)
    backend.embed(np.empty((0,), np.int32), weight, buffer[1:1])
    assert_exact(buffer, np.full((2, 3), 7.0, np.float32), "buffer around an empty output", 0)


@pytest.mark.parametrize("bad_id", [-1, 13])
def test_embed_rejects_out_of_range_token(backend, bad_id):
    weight = np.zeros((13, 4), np.float32)
    output = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        backend.embed(np.array([0, bad_id, 2], np.int32), weight, output)


def test_embed_rejects_bad_arguments(backend):
    weight = np.zeros((13, 4), np.float32)
    with pytest.raises(ValueError, match="int32"):
        backend.embed(np.array([0, 1], np.int64), weight, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="output"):
        backend.embed(np.array([0, 1], np.int32), weight, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="weight"):
        backend.embed(np.array([0, 1], np.int32), weight.astype(np.int32), np.zeros((2, 4), np.float32))
