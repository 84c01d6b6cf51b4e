"""Dummy weights of a config's real shapes, for benchmarks and tests without a checkpoint.

Each tensor gets its own generator seeded by (seed, hash of its name), so a tensor's values depend
only on the seed and its name: not on iteration order, on the layer count, or on other tensors.
Tensors are made one at a time, so an 8B model never holds more than one tensor in Python.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator, Mapping, Tuple, Union

import numpy as np

from lserve.loader.hf import expected_weight_shapes
from lserve.loader.spec import ModelSpec

DUMMY_DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_STD = 0.02  # matrices and biases ~ N(0, 0.02^2)
NORM_NOISE_STD = 0.02  # norm weights ~ 1 + N(0, 0.02^2)
_CHUNK_ELEMENTS = 1 << 22


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """(...,) float32 -> (...,) uint16 bfloat16 bit patterns, rounded to nearest even (finite inputs),
    converted in chunks so the temporaries stay small."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)
    bits = np.empty(flat.shape, dtype=np.uint16)
    for start in range(0, flat.size, _CHUNK_ELEMENTS):
        chunk = flat[start:start + _CHUNK_ELEMENTS]
        rounded = chunk + (np.uint32(0x7FFF) + ((chunk >> np.uint32(16)) & np.uint32(1)))
        bits[start:start + _CHUNK_ELEMENTS] = rounded >> np.uint32(16)
    return bits.reshape(values.shape)


def dummy_weight(name: str, shape: Tuple[int, ...], seed: int, dtype: str = "float32") -> np.ndarray:
    """One dummy tensor of `shape`: norm weights (names ending "norm.weight") ~ 1 + N(0, 0.02^2),
    everything else ~ N(0, 0.02^2). dtype "bfloat16" returns uint16 bit patterns."""
    rng = np.random.default_rng([seed, _name_key(name)])
    values = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        values *= np.float32(NORM_NOISE_STD)
        values += np.float32(1.0)
    else:
        values *= np.float32(WEIGHT_STD)
    if dtype == "float16":
        return values.astype(np.float16)
    if dtype == "bfloat16":
        return float32_to_bf16_bits(values)
    return values


def dummy_weights(config: Union[ModelSpec, Mapping[str, Any]], seed: int = 0, dtype: str = "float32"
                  ) -> Iterator[Tuple[str, np.ndarray]]:
    """(Hugging Face name, array) for every weight of `config` (see hf.expected_weight_shapes), in
    model order, deterministic in `seed`.

    dtype: "float32", "float16", or "bfloat16" (uint16 bit patterns, as safetensors' bf16="uint16").

    Example:
        >>> weights = dict(dummy_weights(spec, seed=0))
        >>> weights["model.norm.weight"].shape
        (576,)
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if dtype not in DUMMY_DTYPES:
        raise ValueError(f"dtype must be one of {DUMMY_DTYPES}, got {dtype!r}")
    shapes = expected_weight_shapes(config)
    return ((name, dummy_weight(name, shape, int(seed), dtype)) for name, shape in shapes.items())
