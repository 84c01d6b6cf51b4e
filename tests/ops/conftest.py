"""Fixtures for the CPU op tests: backends with the AVX2 kernels ("auto") and the portable ones."""
from __future__ import annotations

import os

import pytest

from lserve import _C


def make_cpu_backend(isa: str = "auto", num_threads: int = 2):
    """A CPU _C.Backend; isa="generic" forces the portable kernels through LSERVE_CPU_ISA."""
    previous = os.environ.get("LSERVE_CPU_ISA")
    try:
        if isa == "generic":
            os.environ["LSERVE_CPU_ISA"] = "generic"
        else:
            os.environ.pop("LSERVE_CPU_ISA", None)
        return _C.Backend("cpu", num_threads)
    finally:
        if previous is None:
            os.environ.pop("LSERVE_CPU_ISA", None)
        else:
            os.environ["LSERVE_CPU_ISA"] = previous


@pytest.fixture(scope="session")
def backend():
    return make_cpu_backend("auto", 2)


@pytest.fixture(scope="session", params=["auto", "generic"])
def any_isa_backend(request):
    """Both kernel builds: AVX2+FMA where the CPU has it, and the portable fallback."""
    return make_cpu_backend(request.param, 2)
