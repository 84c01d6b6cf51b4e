"""Device suite (marker `cuda`): the CUDA backend against the CPU reference on the same Args, and
the GPU engine against the CPU engine. Skipped without a GPU, without torch's CUDA, or when this
build of lserve has no CUDA backend.

LSERVE_CUDA_STANDIN=cpu dry-runs the suite on a machine without a GPU: the CPU backend stands in
for the CUDA one (the checks' own logic is exercised; CUDA is not)."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from cuda_testing import STANDIN, torch  # noqa: E402
from lserve import _C  # noqa: E402


@pytest.fixture(scope="session")
def cuda_backend():
    if STANDIN:
        return _C.Backend("cpu")
    if not _C.has_cuda_backend:
        pytest.skip("this build of lserve has no CUDA backend")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return _C.Backend("cuda")


@pytest.fixture(scope="session")
def cpu_backend():
    return _C.Backend("cpu")


