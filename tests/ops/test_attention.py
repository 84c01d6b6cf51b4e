"""attention over the paged KV cache against dense float64 softmax attention: the test gathers
each sequence's pages into contiguous K/V and masks with positions (query row i of a chunk of
q_len sits at kv_len - q_len + i and sees keys at positions <= its own). The kernel computes in
float32 from the same cache values, so the bound is float32's (stricter than STYLE's
"2x a bf16 implementation" rule for GPU kernels)."""
import math

import numpy as np
import pytest
import torch
from conftest import make_cpu_backend
from lserve_testing import assert_close_fp32, assert_exact

# (q_len, kv_len): decode rows, whole prefills, chunked prefills; with page_size 16 the lengths
# cover kv_len % 16 in {0, 1, 15}, chunks longer than the 16-row query block, more keys than a
# 32-key tile, and a sequence with no query rows this step.
MIXED_BATCH = [(1, 1), (1, 17), (16, 16), (37, 100), (3, 47), (5, 33), (1, 48), (0, 20), (20, 31)]


class PagedBatch:
    """Query, paged cache and CSR page tables for a batch of (q_len, kv_len) sequences."""

    def __init__(self, seed, seqs, num_qo_heads, num_kv_heads, head_dim, page_size, cache_dtype,
                 query_scale=1.0):
        generator = torch.Generator().manual_seed(seed)
        self.seqs, self.page_size, self.seed = seqs, page_size, seed
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        pages_per_seq = [math.ceil(kv_len / page_size) + (i % 2) for i, (_, kv_len) in enumerate(seqs)]
        num_pages = sum(pages_per_seq) + 3  # a few pages nobody owns
        order = torch.randperm(num_pages, generator=generator).to(torch.int32)  # scattered pages
        self.kv_page_indptr = torch.tensor(np.concatenate([[0], np.cumsum(pages_per_seq)]), dtype=torch.int32)
        self.kv_page_indices = order[:sum(pages_per_seq)].clone()
        self.qo_indptr = torch.tensor(np.concatenate([[0], np.cumsum([q for q, _ in seqs])]), dtype=torch.int32)
        self.kv_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cache_dtype]
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=generator).to(torch_dtype)
        self.v_cache = torch.randn(shape, generator=generator).to(torch_dtype)
        num_tokens = int(self.qo_indptr[-1])
        # query: a column slice of a qkv-shaped matrix, as the engine passes it
        q_width, kv_width = num_qo_heads * head_dim, num_kv_heads * head_dim
        self.qkv = torch.randn(num_tokens, q_width + 2 * kv_width, generator=generator) * query_scale
        self.query = self.qkv[:, :q_width].view(num_tokens, num_qo_heads, head_dim)
        self.out_buffer = torch.full((num_tokens, q_width + 8), float("nan"))
        self.output = self.out_buffer[:, 4:4 + q_width].view(num_tokens, num_qo_heads, head_dim)
        self.sm_scale = 1.0 / math.sqrt(head_dim)

    def run(self, backend):
        backend.attention(self.query, self.k_cache, self.v_cache, self.qo_indptr, self.kv_page_indptr,
                          self.kv_page_indices, self.kv_lens, self.output, self.sm_scale)
        return self.output.numpy().copy()

    def reference(self) -> np.ndarray:
        group = self.num_qo_heads // self.num_kv_heads
        out = np.zeros(self.output.shape, np.float64)
        k_all = self.k_cache.double().numpy()
        v_all = self.v_cache.double().numpy()
        query = self.query.double().numpy()
        for s, (q_len, kv_len) in enumerate(self.seqs):
            if q_len == 0:
                continue
            pages = self.kv_page_indices[self.kv_page_indptr[s]:self.kv_page_indptr[s + 1]].numpy()
            keys = k_all[pages].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]   # (kv_len, Hkv, D)
            values = v_all[pages].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]
            keys = np.repeat(keys, group, axis=1).transpose(1, 0, 2)                       # (Hq, kv_len, D)
            values = np.repeat(values, group, axis=1).transpose(1, 0, 2)
            start = int(self.qo_indptr[s])
            q = query[start:start + q_len].transpose(1, 0, 2)                               # (Hq, q_len, D)
            scores = q @ keys.transpose(0, 2, 1) * self.sm_scale                            # (Hq, q_len, kv_len)
            q_pos = kv_len - q_len + np.arange(q_len)
            mask = np.arange(kv_len)[None, :] > q_pos[:, None]
            scores = np.where(mask[None], -np.inf, scores)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            out[start:start + q_len] = (probs @ values).transpose(1, 0, 2)
        return out


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_attention_mixed_batch(any_isa_backend, cache_dtype, head_dim, num_qo_heads, num_kv_heads):
    seed = head_dim * 100 + num_qo_heads * 10 + num_kv_heads
    batch = PagedBatch(seed, MIXED_BATCH, num_qo_heads, num_kv_heads, head_dim, 16, cache_dtype)
    untouched = batch.out_buffer[:, :4].clone()
    output = batch.run(any_isa_backend)
    assert_close_fp32(output, batch.reference(), f"attention {cache_dtype} d={head_dim} "
                      f"heads={num_qo_heads}/{num_kv_heads}", seed)
    assert torch.isnan(untouched).all() and torch.isnan(batch.out_buffer[:, :4]).all()


@pytest.mark.parametrize("page_size", [1, 5, 64])
def test_attention_page_sizes(backend, page_size):
    seed = 500 + page_size
    batch = PagedBatch(seed, [(1, 1), (7, 7), (1, 64), (9, 130)], 4, 2, 64, page_size, "float32")
    assert_close_fp32(batch.run(backend), batch.reference(), f"attention page_size={page_size}", seed)


def test_attention_long_sequence_large_logits(any_isa_backend):
    """Many key tiles and logits of tens: the running max must rescale correctly."""
    seed = 77
    batch = PagedBatch(seed, [(1, 1000), (64, 700)], 8, 2, 64, 16, "bfloat16", query_scale=8.0)
    assert_close_fp32(batch.run(any_isa_backend), batch.reference(), "long attention", seed, rtol=1e-5, atol=2e-5)


def test_attention_is_independent_of_thread_count():
    seed = 5
    batch = PagedBatch(seed, MIXED_BATCH, 8, 2, 64, 16, "float32")
    single = batch.run(make_cpu_backend("auto", 1))
    assert_exact(batch.run(make_cpu_backend("auto", 3)), single, "3 threads vs 1", seed)


def test_attention_empty_batch(backend):
    """A sequence with no queries: the op runs, returns no rows, and leaves the caches as they were."""
    batch = PagedBatch(1, [(0, 5)], 2, 1, 64, 16, "float32")
    k_before, v_before = batch.k_cache.numpy().copy(), batch.v_cache.numpy().copy()
    out = batch.run(backend)
    assert out.shape[0] == 0
    assert_exact(batch.k_cache.numpy(), k_before, "k cache untouched", 1)
    assert_exact(batch.v_cache.numpy(), v_before, "v cache untouched", 1)


def _run_with(backend, batch, **overrides):
    args = dict(query=batch.query, k_cache=batch.k_cache, v_cache=batch.v_cache, qo_indptr=batch.qo_indptr,
                kv_page_indptr=batch.kv_page_indptr, kv_page_indices=batch.kv_page_indices,
                kv_lens=batch.kv_lens, output=batch.output, sm_scale=batch.sm_scale)
    args.update(overrides)
    backend.attention(**args)


def test_attention_rejects_bad_indices(backend):
    batch = PagedBatch(9, [(2, 20), (1, 5)], 4, 2, 64, 16, "float32")
    num_pages = batch.k_cache.shape[0]
    bad_page = batch.kv_page_indices.clone()
    bad_page[-1] = num_pages
    with pytest.raises(ValueError, match="out of range"):
        _run_with(backend, batch, kv_page_indices=bad_page)
    bad_page[-1] = -1
    with pytest.raises(ValueError, match="out of range"):
        _run_with(backend, batch, kv_page_indices=bad_page)
    with pytest.raises(ValueError, match="q_len"):
        _run_with(backend, batch, kv_lens=torch.tensor([1, 5], dtype=torch.int32))  # kv_len 1 < q_len 2
    with pytest.raises(ValueError, match="pages"):
        _run_with(backend, batch, kv_lens=torch.tensor([20, 500], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        _run_with(backend, batch, qo_indptr=torch.tensor([0, 3, 3], dtype=torch.int32),
                  kv_lens=torch.tensor([20, 5], dtype=torch.int32),
                  kv_page_indptr=torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_tokens"):
        _run_with(backend, batch, qo_indptr=torch.tensor([0, 2, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="qo_indptr"):
        _run_with(backend, batch, qo_indptr=torch.tensor([0, 2, 3], dtype=torch.int64))


def test_attention_rejects_bad_shapes(backend):
    batch = PagedBatch(10, [(2, 20)], 4, 2, 64, 16, "float32")
    with pytest.raises(ValueError, match="multiple"):
        _run_with(backend, batch, query=torch.zeros(2, 3, 64), output=torch.zeros(2, 3, 64))
    with pytest.raises(ValueError, match="k_cache"):
        _run_with(backend, batch, k_cache=batch.k_cache.half(), v_cache=batch.v_cache.half())
    with pytest.raises(ValueError, match="v_cache"):
        _run_with(backend, batch, v_cache=batch.v_cache.bfloat16())
    with pytest.raises(ValueError, match="output"):
        _run_with(backend, batch, output=torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match="kv_lens"):
        _run_with(backend, batch, kv_lens=torch.tensor([20, 20], dtype=torch.int32))
