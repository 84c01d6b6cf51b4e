"""gemm: output = input @ weight.T + bias against float64 numpy, normalised-MSE bound. Covers the
decode path (num_tokens <= 8) and the blocked path with fringes in every dimension (tiles are 6
tokens x 16 features x 256 inputs, decode blocks 4 features x 1024 inputs), every weight dtype,
strided rows, both kernel builds, and thread-count independence."""
import numpy as np
import pytest
import torch
from conftest import make_cpu_backend
from lserve_testing import assert_exact, assert_nmse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SHAPES = [  # (num_tokens, in_features, out_features)
    (1, 1, 1),
    (1, 19, 113),
    (2, 576, 37),
    (3, 1100, 17),  # crosses the 1024-input decode block
    (8, 64, 128),
    (9, 113, 19),
    (13, 257, 33),  # crosses the 256-input block
    (113, 576, 300),
]


def reference_gemm(x, weight, bias):
    out = x.astype(np.float64) @ weight.astype(np.float64).T
    return out if bias is None else out + bias.astype(np.float64)


@pytest.mark.parametrize("weight_dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,in_features,out_features", SHAPES)
def test_gemm_matches_float64(any_isa_backend, weight_dtype, num_tokens, in_features, out_features):
    seed = num_tokens * 10007 + in_features * 101 + out_features
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator).to(DTYPES[weight_dtype])
    bias = torch.randn(out_features, generator=generator)
    for with_bias in (False, True):
        output = torch.full((num_tokens, out_features), float("nan"))
        any_isa_backend.gemm(x, weight, bias if with_bias else None, output)
        expected = reference_gemm(x.numpy(), weight.float().numpy(), bias.numpy() if with_bias else None)
        assert_nmse(output.numpy(), expected, 1e-12,
                    f"gemm {num_tokens}x{in_features}x{out_features} {weight_dtype} bias={with_bias}", seed)


@pytest.mark.parametrize("num_tokens", [5, 40])
def test_gemm_strided_rows(any_isa_backend, num_tokens):
    """Input a column slice of a wider activation matrix; output a column slice (as for qkv)."""
    seed = 17 + num_tokens
    rng = np.random.default_rng(seed)
    activations = rng.standard_normal((num_tokens, 300)).astype(np.float32)
    x = activations[:, 7:120]  # (num_tokens, 113), rows 300 floats apart
    weight = rng.standard_normal((67, 113)).astype(np.float32)
    outputs = np.full((num_tokens, 100), -7.0, np.float32)
    any_isa_backend.gemm(x, weight, None, outputs[:, 20:87])
    assert_nmse(outputs[:, 20:87], reference_gemm(x, weight, None), 1e-12, "strided gemm", seed)
    assert_exact(outputs[:, :20], np.full((num_tokens, 20), -7.0, np.float32), "left of output slice", seed)
    assert_exact(outputs[:, 87:], np.full((num_tokens, 13), -7.0, np.float32), "right of output slice", seed)


@pytest.mark.parametrize("num_tokens", [3, 61])
def test_gemm_is_independent_of_thread_count(num_tokens):
    """Every output element is summed in the same order whatever the partition."""
    seed = 23
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, 700)).astype(np.float32)
    weight = rng.standard_normal((333, 700)).astype(np.float32)
    outputs = []
    for num_threads in (1, 2, 3):
        output = np.empty((num_tokens, 333), np.float32)
        make_cpu_backend("auto", num_threads).gemm(x, weight, None, output)
        outputs.append(output)
    assert_exact(outputs[1], outputs[0], "2 threads vs 1", seed)
    assert_exact(outputs[2], outputs[0], "3 threads vs 1", seed)


def test_gemm_empty_dimensions(backend):
    bias = np.arange(5, dtype=np.float32)
    output = np.full((3, 5), np.nan, np.float32)
    backend.gemm(np.zeros((3, 0), np.float32), np.zeros((5, 0), np.float32), bias, output)
    assert_exact(output, np.broadcast_to(bias, (3, 5)), "in_features = 0 leaves the bias")
    backend.gemm(np.zeros((0, 4), np.float32), np.zeros((5, 4), np.float32), None, np.zeros((0, 5), np.float32))


def test_gemm_rejects_bad_arguments(backend):
    x = np.zeros((3, 8), np.float32)
    weight = np.zeros((5, 8), np.float32)
    out = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="weight"):
        backend.gemm(x, np.zeros((5, 7), np.float32), None, out)
    with pytest.raises(ValueError, match="bias"):
        backend.gemm(x, weight, np.zeros(4, np.float32), out)
    with pytest.raises(ValueError, match="output"):
        backend.gemm(x, weight, None, np.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="input"):
        backend.gemm(x.astype(np.float64), weight, None, out)
    with pytest.raises(ValueError, match="weight"):
        backend.gemm(x, weight.astype(np.int32), None, out)
    with pytest.raises(ValueError, match="contiguous"):
        backend.gemm(x, np.zeros((8, 5), np.float32).T, None, out)
