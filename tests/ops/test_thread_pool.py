"""The CPU thread pool's optional polling (LSERVE_CPU_SPIN_US, read when a backend is made): the
same bits with and without it, and a bad value refused with a message naming the variable."""
from __future__ import annotations

import numpy as np
import pytest

from lserve import _C


def _backend(monkeypatch, spin):
    if spin is None:
        monkeypatch.delenv("LSERVE_CPU_SPIN_US", raising=False)
    else:
        monkeypatch.setenv("LSERVE_CPU_SPIN_US", spin)
    return _C.Backend("cpu", 2)


def test_polling_gives_the_same_bits(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 256)).astype(np.float32)
    w = rng.standard_normal((515, 256)).astype(np.float32)
    results = []
    for spin in (None, "0", "50", "1000"):
        backend = _backend(monkeypatch, spin)
        for _ in range(20):  # many jobs back to back, as in a decode step
            out = np.empty((37, 515), np.float32)
            backend.gemm(x, w, None, out)
        results.append(out)
    for out in results[1:]:
        np.testing.assert_array_equal(out, results[0])


@pytest.mark.parametrize("value", ["-1", "abc", "5us", "2000000"])
def test_bad_spin_value_is_refused(monkeypatch, value):
    with pytest.raises(ValueError, match=r"LSERVE_CPU_SPIN_US must be an integer number of microseconds"):
        _backend(monkeypatch, value)
