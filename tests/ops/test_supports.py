"""Backend.supports(): an answer per op and argument kind, with a reason naming the argument, that the
op itself keeps (it refuses what supports() refuses). The CPU reference runs every call the op
contracts allow; CUDA's own limits are tested in tests/cuda (test_*_supports_is_truthful)."""
from __future__ import annotations

import numpy as np
import pytest

from lserve import _C


@pytest.fixture(scope="module")
def cpu():
    return _C.Backend("cpu", 1)


def test_every_op_is_answered(cpu):
    assert len(_C.OPS) == len(set(_C.OPS)) == 11
    for op in _C.OPS:
        answer = cpu.supports(op)
        assert answer and answer.supported and answer.reason == "", (op, answer)
    with pytest.raises(ValueError, match=r"unknown op 'sparse_attention' \(known: embed, .*page_stats_append\)"):
        cpu.supports("sparse_attention")


@pytest.mark.parametrize("kinds", [
    dict(head_dim=576), dict(window=True), dict(stream_ring=True), dict(selection=True),
    dict(window=True, stream_ring=True), dict(dtype="bfloat16", kv_cache_dtype="bfloat16"), dict(dtype="float16"),
])
def test_cpu_runs_every_attention_the_contract_allows(cpu, kinds):
    assert cpu.supports("attention", **kinds)


@pytest.mark.parametrize("op", ["gemm", "embed"])
@pytest.mark.parametrize("weight_dtype", ["q8_0", "q4_0", "q4_1"])
def test_cpu_runs_block_weights(cpu, op, weight_dtype):
    assert cpu.supports(op, weight_dtype=weight_dtype)


@pytest.mark.parametrize("group_score", ["sum", "max", "mass"])
def test_cpu_runs_every_group_score(cpu, group_score):
    assert cpu.supports("page_select", head_dim=64, group_score=group_score)


@pytest.mark.parametrize("op, kinds, reason", [
    ("attention", dict(kv_cache_dtype="float16"), "attention: KV caches are float32 or bfloat16, got float16"),
    ("rope_kv_append", dict(kv_cache_dtype="int32"), "rope_kv_append: KV caches are float32 or bfloat16, got int32"),
    ("gemm", dict(weight_dtype="int32"), "gemm: weights are float32, bfloat16 or float16 (or q8_0, q4_0, q4_1 blocks), got int32"),
    ("embed", dict(weight_dtype="int64"), "embed: weights are float32, bfloat16 or float16 (or q8_0, q4_0, q4_1 blocks), got int64"),
    ("rms_norm", dict(weight_dtype="q4_1"), "rms_norm: weights are float32, bfloat16 or float16, got q4_1"),
    ("silu_mul", dict(dtype="int32"), "silu_mul: activations are float32, bfloat16 or float16, got int32"),
    ("attention", dict(stream_ring=True, selection=True), "attention: a selection store reads a page list, not a stream ring"),
    ("page_select", dict(head_dim=-1), "page_select: head_dim must be >= 0, got -1"),
])
def test_contract_refusals_name_the_argument(cpu, op, kinds, reason):
    answer = cpu.supports(op, **kinds)
    assert not answer and not answer.supported
    assert answer.reason == reason
    assert repr(answer) == f"Support(False, '{reason}')"


def test_ops_keep_the_answer(cpu):
    """What supports() refuses, the op refuses too (here through the contract's own check)."""
    query = np.zeros((1, 2, 8), np.float32)
    cache = np.zeros((2, 4, 1, 8), np.float16)
    output = np.zeros_like(query)
    assert not cpu.supports("attention", kv_cache_dtype="float16", head_dim=8)
    with pytest.raises(ValueError, match="k_cache"):
        cpu.attention(query, cache, cache, np.array([0, 1], np.int32), np.array([0, 1], np.int32),
                      np.array([0], np.int32), np.array([1], np.int32), output, 1.0)
    ring = np.zeros((1, 4), np.int32)
    assert not cpu.supports("attention", stream_ring=True, selection=True)
    with pytest.raises(ValueError, match="stream ring"):
        cpu.attention(query, cache.astype(np.float32), cache.astype(np.float32), np.array([0, 1], np.int32), None,
                      None, np.array([1], np.int32), output, 1.0, stream_ring=ring,
                      selection=np.zeros((1, 1, 2), np.int32), selection_count=np.zeros((1, 1), np.int32),
                      select_slot=np.zeros(1, np.int32), select_base=np.zeros(1, np.int32))
    # and what it accepts runs: a one-token attention over one key returns that key's value
    cache32 = np.zeros((2, 4, 1, 8), np.float32)
    cache32[0, 0, 0] = np.arange(8)
    cpu.attention(query, cache32, cache32, np.array([0, 1], np.int32), np.array([0, 1], np.int32),
                  np.array([0], np.int32), np.array([1], np.int32), output, 1.0)
    np.testing.assert_array_equal(output[0, 0], np.arange(8, dtype=np.float32))
