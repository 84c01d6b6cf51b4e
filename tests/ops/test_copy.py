"""Backend.copy (same-dtype bytes, float32/bfloat16/float16 conversions) and fill_zero, against
torch's own conversions (round to nearest even), bit for bit."""
import numpy as np
import pytest
import torch
from lserve_testing import assert_exact

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def special_values() -> torch.Tensor:
    """Zeros, subnormals, rounding ties, overflow, inf and NaN for each target dtype."""
    values = [0.0, -0.0, 1.0, -2.5, 1e-40, -1e-45, 6e-8, 3e-5, 65504.0, 65520.0, 1e5, 3.0e38,
              float("inf"), float("-inf"), float("nan"), 1.00390625, 1.01171875, 2049.0, 2051.0]
    return torch.tensor(values, dtype=torch.float32)


def as_bits(t: torch.Tensor) -> np.ndarray:
    """Bit patterns, so that -0 differs from +0; every NaN maps to one pattern (torch's own
    conversion paths disagree on NaN sign and payload)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    bits = t.contiguous().view(view).numpy().copy()
    bits[torch.isnan(t.float()).numpy()] = -1
    return bits


@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dst_dtype", DTYPES)
def test_copy_converts_like_torch(backend, src_dtype, dst_dtype):
    seed = 5
    generator = torch.Generator().manual_seed(seed)
    src32 = torch.cat([special_values(), torch.randn(1000, generator=generator) * 100])
    src = src32.to(DTYPES[src_dtype])
    dst = torch.empty(src.shape, dtype=DTYPES[dst_dtype])
    backend.copy(dst, src)
    expected = src.to(DTYPES[dst_dtype])
    assert_exact(as_bits(dst), as_bits(expected), f"copy {src_dtype} -> {dst_dtype}", seed)


def test_copy_same_dtype_any_shape(backend):
    rng = np.random.default_rng(0)
    src = rng.integers(-2**31, 2**31 - 1, size=(7, 19, 3)).astype(np.int32)
    dst = np.zeros((7 * 19 * 3,), np.int32)  # same size, different shape
    backend.copy(dst, src)
    assert_exact(dst, src.reshape(-1), "int32 copy")
    big = rng.standard_normal(300_001).astype(np.float32)  # spans several parallel chunks
    big_dst = np.zeros_like(big)
    backend.copy(big_dst, big)
    assert_exact(big_dst, big, "large float32 copy")


def test_fill_zero(backend):
    buffer = torch.randn(13, 113).to(torch.bfloat16)
    backend.fill_zero(buffer)
    assert_exact(as_bits(buffer), np.zeros((13, 113), np.int16), "fill_zero")


def test_copy_rejects_bad_arguments(backend):
    with pytest.raises(ValueError, match="size"):
        backend.copy(np.zeros(5, np.float32), np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        backend.copy(np.zeros(3, np.float32), np.zeros(6, np.float32)[::2])
    with pytest.raises(ValueError, match="convert"):
        backend.copy(np.zeros(3, np.float32), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="contiguous"):
        backend.fill_zero(np.zeros((4, 4), np.float32)[:, :2])


def test_ops_refuse_read_only_outputs(backend):
    """numpy exports read-only arrays through versioned DLPack; an op must not write into them."""
    read_only = np.zeros((3, 5), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        backend.copy(read_only, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="read-only"):
        backend.fill_zero(read_only)
    with pytest.raises(ValueError, match="read-only"):
        backend.gemm(np.ones((3, 4), np.float32), np.ones((5, 4), np.float32), None, read_only)
    assert_exact(read_only, np.zeros((3, 5), np.float32), "read-only output untouched")
