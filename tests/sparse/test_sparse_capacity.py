"""Capacity with LServe's streaming heads: at the same KV memory, SmolLM2-135M with its shipped
head pattern (half the 90 KV heads streaming) holds at least 1.5x as many concurrent 4K-token
sequences as the dense engine, because a streaming head keeps only sink + decode window per
sequence. Weights are random (load_format="dummy"); only the shapes and the pattern matter."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lserve import Engine, SamplingParams
from lserve.sparsity import SparsityConfig

SMOLLM2_135M = {
    "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "architectures": ["LlamaForCausalLM"],
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
CONTEXT = 4096 + 48  # a 4K prompt and the tokens it generates
MEMORY = 1 << 30     # the CPU engine's default KV memory


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smollm2_dummy")
    (directory / "config.json").write_text(json.dumps(SMOLLM2_135M))
    return directory


def _engine(directory, sparsity, **kwargs):
    return Engine(str(directory), load_format="dummy", kv_cache_memory=MEMORY, max_model_len=8192,
                  show_progress=False, sparsity=sparsity, **kwargs)


def _capacity(engine) -> int:
    """Concurrent CONTEXT-token sequences the engine's KV memory holds (pages, and with sparse
    attention a decode slot each)."""
    stats = engine._core.stats()
    pages = stats.num_total_pages // math.ceil(CONTEXT / stats.page_size)
    return min(pages, stats.num_stream_slots) if stats.num_stream_slots else pages


# With the paper's logical pages of 16 tokens, SmolLM2's operating point (docs/ACCURACY.md: prefill
# window 1024) must reach 1.5x (measured 1.6x). With the paper's prefill window of 8192, at least the
# whole 8K context, the one prefill ring is a full-context cache of the streaming heads (186 MB of the
# 1 GiB here) while a long prompt prefills: 1.4x. The policy shipped for SmolLM2 (logical pages of 4 in
# physical pages of 16, chosen for accuracy: lserve.patterns.SELECTION_POLICIES) keeps 4x the page
# statistics of the dense heads (kmax and kmin per 4 keys: a quarter of their K and V in float32),
# which costs capacity: measured 1.4x at the operating point and 1.2x with the paper's window
# (2026-12-05); the physical page size alone does not change the capacity.
PAPER_PAGES = {"logical_page_size": 16, "physical_page_size": 64}
@pytest.mark.parametrize("overrides, ratio", [
    ({"prefill_local_tokens": 1024, "decode_token_budget": 1024, **PAPER_PAGES}, 1.5),
    (PAPER_PAGES, 1.4),
    ({"prefill_local_tokens": 1024, "decode_token_budget": 1024}, 1.4),
    ({}, 1.2),
])
def test_half_the_heads_streaming_holds_1_5x_the_4k_sequences(smollm2_dir, overrides, ratio):
    dense = _engine(smollm2_dir, None)
    sparse = _engine(smollm2_dir, SparsityConfig.preset("lserve", model="smollm2-135m-instruct", **overrides))
    assert sum(sum(row) for row in sparse.sparsity.streaming_mask(30, 3)) == 45
    dense_capacity, sparse_capacity = _capacity(dense), _capacity(sparse)
    assert dense_capacity >= 4
    assert sparse_capacity >= ratio * dense_capacity, (sparse_capacity, dense_capacity)
    stats = sparse._core.stats()
    assert stats.kv_cache_bytes <= MEMORY
    # The decode slot is what a decoding sequence holds for its streaming heads: the sink's pages and a
    # ring one page longer than the window (64-token pages: 2 + 5; 16-token pages: 8 + 17) of 45
    # heads, K and V in float32, whatever the prefill window.
    page = stats.page_size
    assert page == sparse.sparsity.physical_page_size
    slot_pages = -(-sparse.sparsity.decode_sink_tokens // page) + sparse.sparsity.decode_local_tokens // page + 1
    assert stats.streaming_bytes_per_seq == slot_pages * page * 45 * 2 * 64 * 4


@pytest.mark.slow
def test_concurrent_4k_sequences_run(smollm2_dir):
    """End to end: as many 4K prompts as the sparse engine's memory holds all run at once. They prefill
    one after another (one prefill ring, a 4K step budget shared with the running decodes), so each
    generates enough tokens to still be running when the last one is admitted."""
    sparse = _engine(smollm2_dir, SparsityConfig.preset("lserve", model="smollm2-135m-instruct",
                                                        prefill_local_tokens=1024, decode_token_budget=1024),
                     max_num_batched_tokens=4096)
    capacity = _capacity(sparse)
    rng = np.random.default_rng(0)
    for i in range(capacity):
        prompt = [int(t) for t in rng.integers(100, 49000, size=4096)]
        sparse.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    most = 0
    while sparse._core.has_unfinished_requests():
        sparse._core.step()
        most = max(most, sparse._core.stats().num_running)
    stats = sparse._core.stats()
    assert most == capacity and stats.num_preemptions == 0
