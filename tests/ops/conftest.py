"""Fixtures for the CPU op tests: backends at each kernel level the CPU runs (LSERVE_CPU_ISA)."""
from __future__ import annotations

import os

import pytest

from lserve import _C

# The kernel levels this CPU runs, lowest first: ("generic", "avx2") on an AVX2 host, up to
# ("generic", "avx2", "avx512", "avx512vnni").
CPU_ISAS = tuple(_C.cpu_isas())


def make_cpu_backend(isa: str = "auto", num_threads: int = 2):
    """A CPU _C.Backend at kernel level `isa` (generic | avx2 | avx512 | avx512vnni, set through
    LSERVE_CPU_ISA for the construction); "auto" keeps the environment's level (the best when unset)."""
    if isa == "auto":
        return _C.Backend("cpu", num_threads)
    previous = os.environ.get("LSERVE_CPU_ISA")
    try:
        os.environ["LSERVE_CPU_ISA"] = isa
        return _C.Backend("cpu", num_threads)
    finally:
        if previous is None:
            os.environ.pop("LSERVE_CPU_ISA", None)
        else:
            os.environ["LSERVE_CPU_ISA"] = previous


@pytest.fixture(scope="session")
def backend():
    return make_cpu_backend("auto", 2)


@pytest.fixture(scope="session", params=CPU_ISAS)
def any_isa_backend(request):
    """Every kernel level this CPU runs: the portable kernels, AVX2+FMA, AVX-512 where present."""
    return make_cpu_backend(request.param, 2)
