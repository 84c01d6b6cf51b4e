"""The sparse-attention vocabulary on CUDA against the CPU backend on the same Args (outputs poisoned
first): attention with per-sequence Lambda windows, stream rings that have wrapped, and the page
selector's store read through select_slot / select_base (dense rows, slots never selected, pages made
since the base); rope_kv_append's mirror slot mapping (a streaming head's decode ring filled while
prefilling through its prefill ring)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cuda_testing import as_f32, ints, on_gpu, on_host, poisoned, randn, require
from lserve_testing import assert_close_fp32, assert_exact, stream_ring_caches

pytestmark = pytest.mark.cuda


def _rounded(array, dtype):
    import torch

    return torch.from_numpy(array).to(getattr(torch, dtype)).float().numpy() if dtype != "float32" else array


def _case(seed, seqs, page_size, num_qo_heads, num_kv_heads, head_dim):
    rng = np.random.default_rng(seed)
    pages_per_seq = [math.ceil(kv / page_size) for _, kv in seqs]
    num_pages = sum(pages_per_seq) + 3
    order = rng.permutation(num_pages).astype(np.int32)
    return dict(
        page_indptr=np.concatenate([[0], np.cumsum(pages_per_seq)]).astype(np.int32),
        page_indices=order[:sum(pages_per_seq)].copy(),
        qo_indptr=np.concatenate([[0], np.cumsum([q for q, _ in seqs])]).astype(np.int32),
        kv_lens=np.array([kv for _, kv in seqs], np.int32),
        k_cache=randn((num_pages, page_size, num_kv_heads, head_dim), seed + 1),
        v_cache=randn((num_pages, page_size, num_kv_heads, head_dim), seed + 2),
        query=randn((sum(q for q, _ in seqs), num_qo_heads, head_dim), seed + 3),
        pages_per_seq=pages_per_seq)


def _both(cuda_backend, cpu_backend, c, cache_dtype, page_lists=True, tensor_cores=False, **policy):
    """Runs the CUDA backend and the CPU backend on the same values; returns (cuda, cpu) outputs as
    float32 arrays. Default: float32 query and output, cache in cache_dtype (the reference kernel).
    tensor_cores: bf16 query, cache and output with the host's length hints (the engine's path: the
    tensor-core prefill and decode kernels, which read the policy through KvBlockSparsity)."""
    dtype = "bfloat16" if tensor_cores else cache_dtype
    query = _rounded(c["query"], "bfloat16") if tensor_cores else c["query"]
    k_cache, v_cache = _rounded(c["k_cache"], dtype), _rounded(c["v_cache"], dtype)
    scale = 1.0 / math.sqrt(c["query"].shape[2])
    out = poisoned(c["query"].shape, "bfloat16" if tensor_cores else "float32")
    gpu_policy = {name: ints(value) for name, value in policy.items()}
    indptr = ints(c["page_indptr"]) if page_lists else None
    indices = ints(c["page_indices"]) if page_lists else None
    hints = {}
    if tensor_cores:
        q_lens = np.diff(c["qo_indptr"])
        hints = dict(max_q_len=int(q_lens.max()), max_kv_len=int(c["kv_lens"].max()))
    cuda_backend.attention(on_gpu(query, "bfloat16" if tensor_cores else "float32"), on_gpu(k_cache, dtype),
                           on_gpu(v_cache, dtype), ints(c["qo_indptr"]), indptr, indices, ints(c["kv_lens"]), out,
                           scale, **hints, **gpu_policy)
    expected = np.full(c["query"].shape, np.nan, np.float32)
    cpu_backend.attention(query, k_cache, v_cache, c["qo_indptr"], c["page_indptr"] if page_lists else None,
                          c["page_indices"] if page_lists else None, c["kv_lens"], expected, scale, **policy)
    return as_f32(out), expected


def _check(got, want, tensor_cores, what):
    if not tensor_cores:
        assert_close_fp32(got, want, what=what)
        return
    # bf16 probabilities and output (the tensor-core kernels): outputs are convex combinations of
    # N(0, 1) values, so an absolute bound at bf16 resolution of the softmax and the output.
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    err = np.abs(got - want)
    assert err.max() <= 3e-2, f"{what}: max error {err.max():.3e} at {np.unravel_index(err.argmax(), err.shape)}"


SEQS = [(1, 1), (17, 17), (40, 100), (1, 161), (33, 70), (1, 64), (16, 129)]


@pytest.mark.parametrize("num_qo_heads, num_kv_heads, head_dim", [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
@pytest.mark.parametrize("cache_dtype, tensor_cores", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
@pytest.mark.parametrize("page_size", [16, 64])
def test_lambda_windows_per_sequence(cuda_backend, cpu_backend, num_qo_heads, num_kv_heads, head_dim, cache_dtype,
                                     tensor_cores, page_size):
    require(cuda_backend, "attention", kv_cache_dtype=cache_dtype, head_dim=head_dim, window=True)
    c = _case(head_dim + num_qo_heads, SEQS, page_size, num_qo_heads, num_kv_heads, head_dim)
    sink = np.array([0, 4, 16, 7, 0, 32, 3], np.int32)
    local = np.array([8, 16, 0, 33, 1, 24, 64], np.int32)  # 0: no window for that sequence
    got, want = _both(cuda_backend, cpu_backend, c, cache_dtype, tensor_cores=tensor_cores, window_sink=sink,
                      window_local=local)
    _check(got, want, tensor_cores, f"Lambda windows gqa {num_qo_heads // num_kv_heads} d{head_dim} {cache_dtype} "
                                    f"page {page_size}{' tensor cores' if tensor_cores else ''}")


@pytest.mark.parametrize("num_qo_heads, num_kv_heads, head_dim", [(8, 2, 64), (16, 2, 128)])
def test_lambda_windows_at_decode_on_tensor_cores(cuda_backend, cpu_backend, num_qo_heads, num_kv_heads, head_dim):
    require(cuda_backend, "attention", dtype="bfloat16", kv_cache_dtype="bfloat16", head_dim=head_dim, window=True)
    seqs = [(1, 300), (1, 65), (1, 1), (1, 129), (1, 640)]
    c = _case(3 + head_dim, seqs, 64, num_qo_heads, num_kv_heads, head_dim)
    sink = np.array([128, 64, 128, 0, 128], np.int32)
    local = np.array([256, 100, 256, 64, 0], np.int32)
    got, want = _both(cuda_backend, cpu_backend, c, "bfloat16", tensor_cores=True, window_sink=sink, window_local=local)
    _check(got, want, True, f"decode windows gqa {num_qo_heads // num_kv_heads} d{head_dim}")


@pytest.mark.parametrize("num_qo_heads, num_kv_heads, head_dim", [(8, 2, 64), (4, 4, 128), (16, 2, 128)])
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_selection_store(cuda_backend, cpu_backend, num_qo_heads, num_kv_heads, head_dim, tensor_cores):
    require(cuda_backend, "attention", head_dim=head_dim, selection=True)
    seqs = [(1, 161), (1, 100), (1, 47), (1, 130), (2, 90), (1, 64)]
    c = _case(5 + head_dim, seqs, 16, num_qo_heads, num_kv_heads, head_dim)
    rng = np.random.default_rng(9)
    num_slots, capacity = 8, 5
    selection = np.full((num_slots, num_kv_heads, capacity), 999, np.int32)
    counts = np.full((num_slots, num_kv_heads), -1, np.int32)  # slot 6: never selected (every page)
    select_slot = np.array([5, 2, -1, 0, 6, 1], np.int32)       # sequence 2 dense
    pages = c["pages_per_seq"]
    select_base = np.array([pages[0], 4, pages[2], 6, pages[4], pages[5]], np.int32)
    for s in (0, 1, 3, 5):
        slot, base = select_slot[s], select_base[s]
        for kh in range(num_kv_heads):
            chosen = sorted(set(rng.choice(base - 1, size=min(2, base - 1), replace=False).tolist()) | {base - 1})
            stored = chosen + [p for p in (base, base + 1) if p < pages[s]][:capacity - len(chosen)]
            selection[slot, kh, :len(stored)] = stored
            counts[slot, kh] = len(stored)
    got, want = _both(cuda_backend, cpu_backend, c, "float32", tensor_cores=tensor_cores, selection=selection,
                      selection_count=counts, select_slot=select_slot, select_base=select_base)
    _check(got, want, tensor_cores, f"selection store gqa {num_qo_heads // num_kv_heads} d{head_dim}"
                                    f"{' tensor cores' if tensor_cores else ''}")


@pytest.mark.parametrize("seqs, page_size, num_sink_pages, local", [
    ([(1, 200), (9, 75), (1, 33), (4, 120)], 16, 1, 24),
    ([(1, 200), (9, 75), (1, 33), (4, 120)], 16, 2, 40),
    ([(1, 200), (9, 75), (1, 33), (4, 120)], 16, 0, 17),
    ([(1, 700), (1, 129), (1, 64), (1, 1000)], 64, 2, 256),   # decode steps, the defaults' geometry
    ([(130, 900), (64, 300), (1, 500)], 64, 2, 200),          # prefill chunks through a prefill ring
])
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_stream_ring(cuda_backend, cpu_backend, seqs, page_size, num_sink_pages, local, tensor_cores):
    """Rings that have wrapped: keys laid out by (sink base, sinks, ring base, ring) arithmetic."""
    require(cuda_backend, "attention", stream_ring=True)
    num_qo_heads, num_kv_heads, head_dim = 8, 2, 64 if page_size == 16 else 128
    c = _case(11 + local + page_size, seqs, page_size, num_qo_heads, num_kv_heads, head_dim)
    ring_k, ring_v, rings = stream_ring_caches(c["k_cache"], c["v_cache"], c["page_indices"], c["page_indptr"], seqs,
                                               num_sink_pages, local)
    # Ring slots no token reached hold zeros, as in the engine's zero-filled caches (a tensor-core
    # kernel loads whole pages and masks inside them; masked NaN values would still poison P V).
    c["k_cache"], c["v_cache"] = np.nan_to_num(ring_k), np.nan_to_num(ring_v)
    sink = np.full(len(seqs), num_sink_pages * page_size, np.int32)
    local_arr = np.full(len(seqs), local, np.int32)
    got, want = _both(cuda_backend, cpu_backend, c, "float32", page_lists=False, tensor_cores=tensor_cores,
                      window_sink=sink, window_local=local_arr, stream_ring=rings)
    assert np.isfinite(want).all()
    _check(got, want, tensor_cores, f"stream ring page {page_size} sinks {num_sink_pages} local {local}"
                                    f"{' tensor cores' if tensor_cores else ''}")


@pytest.mark.parametrize("act_dtype, cache_dtype", [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_rope_kv_append_mirror(cuda_backend, cpu_backend, act_dtype, cache_dtype):
    require(cuda_backend, "rope_kv_append", dtype=act_dtype, kv_cache_dtype=cache_dtype)
    num_tokens, num_qo_heads, num_kv_heads, head_dim, page_size, num_pages = 37, 8, 2, 64, 16, 12
    rng = np.random.default_rng(4)
    q_width, kv_width = num_qo_heads * head_dim, num_kv_heads * head_dim
    qkv = _rounded(randn((num_tokens, q_width + 2 * kv_width), 4), act_dtype)
    angles = rng.uniform(-np.pi, np.pi, size=(64, head_dim // 2))
    table = np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    positions = rng.integers(0, 64, size=num_tokens).astype(np.int32)
    slots_all = rng.permutation(num_pages * page_size).astype(np.int64)
    slots, mirror = slots_all[:num_tokens].copy(), slots_all[num_tokens:2 * num_tokens].copy()
    slots[::5] = -1
    mirror[: num_tokens // 2] = -1  # only the chunk's last tokens are mirrored
    shape = (num_pages, page_size, num_kv_heads, head_dim)

    def split(buffer):
        return (buffer[:, :q_width].reshape(num_tokens, num_qo_heads, head_dim),
                buffer[:, q_width:q_width + kv_width].reshape(num_tokens, num_kv_heads, head_dim),
                buffer[:, q_width + kv_width:].reshape(num_tokens, num_kv_heads, head_dim))

    qkv_gpu = on_gpu(qkv, act_dtype)
    k_gpu, v_gpu = poisoned(shape, cache_dtype), poisoned(shape, cache_dtype)
    q, k, v = split(qkv_gpu)
    cuda_backend.rope_kv_append(q, k, v, ints(positions), on_gpu(table), k_gpu, v_gpu, ints(slots),
                                mirror_slot_mapping=ints(mirror))
    qkv_cpu = qkv.copy()
    k_cpu, v_cpu = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    q, k, v = split(qkv_cpu)
    cpu_backend.rope_kv_append(q, k, v, positions, table, k_cpu, v_cpu, slots, mirror_slot_mapping=mirror)
    written = np.zeros(num_pages * page_size, bool)
    written[slots[slots >= 0]] = True
    written[mirror[mirror >= 0]] = True
    for name, gpu, cpu in (("k", k_gpu, k_cpu), ("v", v_gpu, v_cpu)):
        gpu_flat, cpu_flat = as_f32(gpu).reshape(num_pages * page_size, -1), cpu.reshape(num_pages * page_size, -1)
        assert np.isnan(gpu_flat[~written]).all(), f"{name}: slots outside both mappings were written"
        if cache_dtype == "float32" and act_dtype == "float32":
            assert_close_fp32(gpu_flat[written], cpu_flat[written], what=f"mirror {name}_cache")
        else:
            cpu_rounded = _rounded(cpu_flat[written], cache_dtype)
            assert np.abs(gpu_flat[written] - cpu_rounded).max() <= 2e-2 * max(1.0, np.abs(cpu_rounded).max())
        # The mirror slot holds exactly what the primary slot of the same token holds.
        both = (slots >= 0) & (mirror >= 0)
        assert_exact(gpu_flat[mirror[both]], gpu_flat[slots[both]], what=f"{name}: mirror == primary")
