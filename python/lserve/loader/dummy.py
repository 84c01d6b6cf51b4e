"""Dummy weights for benchmarks of real shapes: deterministic random tensors, one at a time."""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np

from lserve.loader.hf import expected_weight_shapes


def dummy_weights(fields: Dict, seed: int = 0) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, float32 array) for every weight: matrices ~ N(0, 0.02), norms ~ 1 + N(0, 0.02),
    biases ~ N(0, 0.02). Each tensor has its own generator (seed, index), so order does not matter."""
    for index, (name, shape) in enumerate(sorted(expected_weight_shapes(fields).items())):
        rng = np.random.default_rng([seed, index])
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if name.endswith("norm.weight"):
            values += np.float32(1.0)
        yield name, values
