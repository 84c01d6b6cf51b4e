"""Helpers of the device suite: where tensors go (CUDA, or the CPU when LSERVE_CUDA_STANDIN=cpu
dry-runs the suite without a GPU), NaN-poisoned outputs, dtype rounding through torch."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lserve import _C

STANDIN = os.environ.get("LSERVE_CUDA_STANDIN") == "cpu"
DEVICE = "cpu" if STANDIN else "cuda"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def engine_device() -> str:
    """The device of the engine under test ("cpu" when standing in); skips when there is none."""
    if STANDIN:
        return "cpu"
    if not _C.has_cuda_backend:
        pytest.skip("this build of lserve has no CUDA backend")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return "cuda"


def require(backend, op: str, **kinds) -> None:
    """Skips the test with the backend's own reason unless backend.supports(op, **kinds): the device
    suite asks the backend what it runs instead of keeping its own list (kinds: dtype, weight_dtype,
    kv_cache_dtype, head_dim, window, stream_ring, selection, group_score)."""
    answer = backend.supports(op, **kinds)
    if not answer:
        pytest.skip(f"{backend.name}: {answer.reason}")


def randn(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def on_gpu(array: np.ndarray, dtype: str = "float32") -> "torch.Tensor":
    """A CUDA tensor holding `array` rounded to `dtype`."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=DEVICE, dtype=TORCH_DTYPES[dtype]).clone()


def on_host(array: np.ndarray, dtype: str = "float32") -> "torch.Tensor":
    """A CPU tensor holding `array` rounded to `dtype` (torch: numpy has no bfloat16)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype=TORCH_DTYPES[dtype])


def poisoned(shape, dtype: str = "float32") -> "torch.Tensor":
    """A NaN-filled CUDA tensor: any element an op fails to write stays NaN."""
    return torch.full(tuple(shape), float("nan"), device=DEVICE, dtype=TORCH_DTYPES[dtype])


def as_f32(tensor: "torch.Tensor") -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def ints(array: np.ndarray) -> "torch.Tensor":
    """A CUDA tensor of the integer array, dtype kept (int32 indices, int64 slots)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE).clone()
