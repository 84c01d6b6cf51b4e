"""Helpers of the eval tests (fixtures are in conftest.py)."""
from __future__ import annotations

import re
import zlib


def word_tokens(text):
    """A stand-in tokenizer: one token per word or punctuation mark."""
    return [zlib.crc32(piece.encode()) % 50_000 for piece in re.findall(r"\w+|[^\w\s]", text)]


# Sparsity that bites on the tiny model at a few hundred tokens: pages of 16 (logical 4), a budget of
# 4 pages, layer 0's KV head 0 streaming with small windows.
TINY_SPARSITY = dict(physical_page_size=16, logical_page_size=4, decode_token_budget=64, streaming_heads=[[0], []],
                     prefill_sink_tokens=16, prefill_local_tokens=128, decode_sink_tokens=16, decode_local_tokens=32,
                     selection_reuse_interval=3)
