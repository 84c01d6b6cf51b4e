"""The CPU thread pool's polling policy: idle threads poll for jobs only inside a forward pass (the
backend's isolated region), for 30 us by default while the host is quiet; LSERVE_CPU_SPIN_US (read
when a backend is made) sets the budget and turns the quiet-host check off, 0 never polls. The same
bits with and without polling, and a bad value refused with a message naming the variable."""
from __future__ import annotations

import time

import numpy as np
import pytest

from lserve import _C


def _backend(monkeypatch, spin):
    if spin is None:
        monkeypatch.delenv("LSERVE_CPU_SPIN_US", raising=False)
    else:
        monkeypatch.setenv("LSERVE_CPU_SPIN_US", spin)
    return _C.Backend("cpu", 2)


def _job(backend) -> None:
    """One gemm large enough to be split between the two threads."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    w = rng.standard_normal((515, 256)).astype(np.float32)
    backend.gemm(x, w, None, np.empty((8, 515), np.float32))


def _cpu_seconds_while_idle(backend, seconds: float = 0.1) -> float:
    """Process CPU time (every thread) over `seconds` of sleep right after a job."""
    _job(backend)
    start = time.process_time()
    time.sleep(seconds)
    return time.process_time() - start


def test_polling_gives_the_same_bits(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 256)).astype(np.float32)
    w = rng.standard_normal((515, 256)).astype(np.float32)
    results = []
    for spin in (None, "0", "50", "1000"):
        backend = _backend(monkeypatch, spin)
        for isolated in (False, True):  # polling happens only inside the forward pass's region
            if isolated:
                backend.begin_isolated()
            for _ in range(20):  # many jobs back to back, as in a decode step
                out = np.empty((37, 515), np.float32)
                backend.gemm(x, w, None, out)
            if isolated:
                backend.end_isolated()
            results.append(out)
    for out in results[1:]:
        np.testing.assert_array_equal(out, results[0])


@pytest.mark.parametrize("spin, policy", [(None, "polls 30 us in a forward pass on a quiet host"),
                                          ("0", "never polls"), ("50", "polls 50 us in a forward pass")])
def test_backend_names_its_polling_policy(monkeypatch, spin, policy):
    assert f" threads, {policy}, " in _backend(monkeypatch, spin).name  # the ISA level comes last


def test_polling_is_scoped_to_the_forward_pass(monkeypatch):
    # A 1 s budget: a worker that polls burns the whole 0.1 s sleep; one that blocks burns nothing.
    backend = _backend(monkeypatch, "1000000")
    assert _cpu_seconds_while_idle(backend) < 0.02, "polled outside a forward pass"
    backend.begin_isolated()
    try:
        assert _cpu_seconds_while_idle(backend) > 0.03, "did not poll inside a forward pass"
    finally:
        backend.end_isolated()
    start = time.process_time()  # the polling worker stops when the pass ends
    time.sleep(0.1)
    assert time.process_time() - start < 0.02, "kept polling after the forward pass"


@pytest.mark.parametrize("spin", [None, "0"])
def test_default_polls_briefly_and_zero_never(monkeypatch, spin):
    # The default budget is 30 us per wait; 0 blocks at once. Either way a 0.1 s idle gap inside a
    # forward pass costs (almost) no CPU.
    backend = _backend(monkeypatch, spin)
    backend.begin_isolated()
    try:
        for _ in range(3):  # the first pass's quiet-host check has nothing to go on yet
            backend.end_isolated()
            backend.begin_isolated()
        assert _cpu_seconds_while_idle(backend) < 0.02
    finally:
        backend.end_isolated()


@pytest.mark.parametrize("value", ["-1", "abc", "5us", "2000000"])
def test_bad_spin_value_is_refused(monkeypatch, value):
    with pytest.raises(ValueError, match=r"LSERVE_CPU_SPIN_US must be an integer number of microseconds"):
        _backend(monkeypatch, value)
