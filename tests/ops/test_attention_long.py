"""attention at long contexts (thousands of keys, many KV tiles) against a float64 numpy reference
with the token-exact mask, and the batch invariance contract: a query row's output is bit-identical
whatever else shares its call (other sequences, other rows of its chunk, how its prompt was
chunked, decode vs prefill, page placement, thread count). Lengths are awkward on purpose:
kv_len % 16 in {0, 1, 15}, chunks that are no multiple of the 32-key tile or the query block,
GQA groups 1, 3 and 4, head_dim 64 and 128, and streaming rings that wrapped many times."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_cpu_backend

from lserve_testing import assert_close_fp32, assert_exact, stream_ring_caches

PAGE = 16
TORCH_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Sequences:
    """Per-sequence float32 query/key/value streams; calls lay chosen chunks of them on shuffled pages."""

    def __init__(self, seed, total_lens, num_qo_heads, num_kv_heads, head_dim, cache_dtype="float32"):
        rng = np.random.default_rng(seed)
        self.seed, self.head_dim, self.cache_dtype = seed, head_dim, cache_dtype
        self.num_qo_heads, self.num_kv_heads = num_qo_heads, num_kv_heads
        self.query = [rng.standard_normal((n, num_qo_heads, head_dim)).astype(np.float32) for n in total_lens]
        # keys/values rounded to the cache dtype once, so the reference sees what the kernel reads
        self.keys = [self._round(rng.standard_normal((n, num_kv_heads, head_dim))) for n in total_lens]
        self.values = [self._round(rng.standard_normal((n, num_kv_heads, head_dim))) for n in total_lens]

    def _round(self, array):
        return torch.from_numpy(array.astype(np.float32)).to(TORCH_DTYPE[self.cache_dtype]).float().numpy()

    def run(self, backend, chunks, layout_seed, window=None):
        """chunks: [(seq, q_start, q_end)]: rows [q_start, q_end) of sequence seq over its first q_end
        keys. Pages are shuffled by layout_seed; unused slots and pages hold NaN (never read).
        window: (sink, local) for every sequence. Returns the output rows of each chunk."""
        rng = np.random.default_rng(layout_seed)
        pages_per_chunk = [math.ceil(q_end / PAGE) for _, _, q_end in chunks]
        num_pages = sum(pages_per_chunk) + 3
        order = rng.permutation(num_pages).astype(np.int32)
        shape = (num_pages, PAGE, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
        indptr = np.concatenate([[0], np.cumsum(pages_per_chunk)]).astype(np.int32)
        for c, (s, _, q_end) in enumerate(chunks):
            for lp, page in enumerate(order[indptr[c]:indptr[c + 1]]):
                tokens = slice(lp * PAGE, min(q_end, (lp + 1) * PAGE))
                count = tokens.stop - tokens.start
                k_cache[page, :count] = self.keys[s][tokens]
                v_cache[page, :count] = self.values[s][tokens]
        query = np.concatenate([self.query[s][a:b] for s, a, b in chunks])
        qo_indptr = np.concatenate([[0], np.cumsum([b - a for _, a, b in chunks])]).astype(np.int32)
        output = torch.full(query.shape, float("nan"))
        policy = {}
        if window is not None:
            policy = dict(window_sink=torch.full((len(chunks),), window[0], dtype=torch.int32),
                          window_local=torch.full((len(chunks),), window[1], dtype=torch.int32))
        dtype = TORCH_DTYPE[self.cache_dtype]
        backend.attention(torch.from_numpy(query), torch.from_numpy(k_cache).to(dtype),
                          torch.from_numpy(v_cache).to(dtype), torch.from_numpy(qo_indptr),
                          torch.from_numpy(indptr), torch.from_numpy(order[:indptr[-1]].copy()),
                          torch.tensor([b for _, _, b in chunks], dtype=torch.int32), output,
                          1.0 / math.sqrt(self.head_dim), **policy)
        out = output.numpy()
        return [out[qo_indptr[c]:qo_indptr[c + 1]].copy() for c in range(len(chunks))]

    def reference(self, s, q_start, q_end, window=None):
        """float64 softmax attention of rows [q_start, q_end) of sequence s, token-exact mask."""
        group = self.num_qo_heads // self.num_kv_heads
        keys, values = self.keys[s][:q_end].astype(np.float64), self.values[s][:q_end].astype(np.float64)
        pos = np.arange(q_start, q_end)[:, None]
        key_pos = np.arange(q_end)[None, :]
        mask = key_pos <= pos
        if window is not None and window[1] > 0:
            mask &= (key_pos < window[0]) | (key_pos > pos - window[1])
        out = np.zeros((q_end - q_start, self.num_qo_heads, self.head_dim))
        for h in range(self.num_qo_heads):
            q = self.query[s][q_start:q_end, h].astype(np.float64)
            scores = q @ keys[:, h // group].T / math.sqrt(self.head_dim)
            scores = np.where(mask, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[:, h] = (probs / probs.sum(axis=1, keepdims=True)) @ values[:, h // group]
        return out


def bits(array):
    return np.ascontiguousarray(array, np.float32).view(np.uint32)


# (q_start, q_end) per sequence: decode rows and chunks over 1K-4K keys, kv_len % 16 in {1, 15, 0},
# chunk lengths 19, 113 and 250 (no multiple of the 32-key tile or the 32-row query block).
LONG_CHUNKS = [(4096, 4097), (2044, 2063), (2207, 2320), (950, 1200)]


@pytest.mark.parametrize("isa, cache_dtype, head_dim, num_qo_heads, num_kv_heads", [
    (isa, dtype, head_dim, qo, kv) for dtype in ["float32", "bfloat16"] for head_dim in [64, 128]
    for qo, kv in [(4, 4), (9, 3), (8, 2)] for isa in ["auto"] + (["generic"] if head_dim == 64 and qo == 9 else [])])
def test_long_context_matches_reference(isa, cache_dtype, head_dim, num_qo_heads, num_kv_heads):
    seed = 3000 + head_dim + 10 * num_qo_heads + num_kv_heads
    data = Sequences(seed, [end for _, end in LONG_CHUNKS], num_qo_heads, num_kv_heads, head_dim, cache_dtype)
    chunks = [(s, a, b) for s, (a, b) in enumerate(LONG_CHUNKS)]
    got = data.run(make_cpu_backend(isa, 2), chunks, seed)
    for s, a, b in chunks:
        assert_close_fp32(got[s], data.reference(s, a, b), f"long attention seq {s} rows [{a}, {b}) {cache_dtype} "
                          f"d={head_dim} heads={num_qo_heads}/{num_kv_heads}", seed)


@pytest.mark.parametrize("sink_pages, sink, local", [(1, 4, 100), (2, 32, 257), (0, 0, 31)])
def test_long_stream_ring_that_wrapped(any_isa_backend, sink_pages, sink, local):
    """Streaming heads at long context: rings of a few pages reused many times over thousands of
    tokens; evicted tokens are overwritten or NaN and must never reach the output."""
    seed = 4000 + local
    seqs = [(1, 3001), (70, 2500), (33, 1043)]  # (q_len, kv_len)
    data = Sequences(seed, [kv for _, kv in seqs], 8, 2, 64)
    # the full page layout, then the same tokens written into rings
    page_counts = [math.ceil(kv / PAGE) for _, kv in seqs]
    indptr = np.concatenate([[0], np.cumsum(page_counts)]).astype(np.int32)
    k_full = np.zeros((indptr[-1], PAGE, 2, 64), np.float32)
    v_full = np.zeros_like(k_full)
    for s, (_, kv) in enumerate(seqs):
        k_full[indptr[s]:indptr[s + 1]].reshape(-1, 2, 64)[:kv] = data.keys[s]
        v_full[indptr[s]:indptr[s + 1]].reshape(-1, 2, 64)[:kv] = data.values[s]
    ring_k, ring_v, rings = stream_ring_caches(k_full, v_full, np.arange(indptr[-1]), indptr, seqs, sink_pages, local)
    assert (2 * rings[:, 3] * PAGE < np.array([kv for _, kv in seqs])).all()  # every ring wrapped twice or more
    query = np.concatenate([data.query[s][kv - q:kv] for s, (q, kv) in enumerate(seqs)])
    output = torch.full(query.shape, float("nan"))
    num = len(seqs)
    any_isa_backend.attention(
        torch.from_numpy(query), torch.from_numpy(ring_k), torch.from_numpy(ring_v),
        torch.tensor(np.concatenate([[0], np.cumsum([q for q, _ in seqs])]), dtype=torch.int32), None, None,
        torch.tensor([kv for _, kv in seqs], dtype=torch.int32), output, 1.0 / 8.0,
        window_sink=torch.full((num,), sink, dtype=torch.int32), window_local=torch.full((num,), local, dtype=torch.int32),
        stream_ring=torch.from_numpy(rings))
    got, row = output.numpy(), 0
    for s, (q, kv) in enumerate(seqs):
        assert_close_fp32(got[row:row + q], data.reference(s, kv - q, kv, (sink, local)),
                          f"stream ring seq {s} sink={sink} local={local}", seed)
        row += q


@pytest.mark.parametrize("isa", ["auto", "generic"])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, (4, 100)])
def test_batch_invariance(isa, cache_dtype, window):
    """Sequence 0's 600-row prompt computed alone in one chunk is the reference bit pattern. The same
    rows must come out bit-identical when the prompt is split into chunks of other sizes, shares its
    call with other sequences (decode rows and prefill chunks), sits on other pages, runs on 1 or 3
    threads, or a row is computed as a decode row."""
    seed = 700 + (window is not None) + 2 * (cache_dtype == "bfloat16")
    data = Sequences(seed, [600, 900, 333], 9, 3, 64, cache_dtype)
    two = make_cpu_backend(isa, 2)
    alone = data.run(two, [(0, 0, 600)], layout_seed=1, window=window)[0]
    assert np.isfinite(alone).all()
    assert_close_fp32(alone, data.reference(0, 0, 600, window), "alone vs float64", seed)
    what = f"{isa} {cache_dtype} window={window}"

    for threads in (1, 3):
        backend = make_cpu_backend(isa, threads)
        got = data.run(backend, [(1, 899, 900), (0, 0, 600), (2, 0, 333)], layout_seed=2 + threads, window=window)
        assert_exact(bits(got[1]), bits(alone), f"{what}: in a batch, {threads} threads", seed)

    # other chunkings of the same prompt, each chunk in a call with other sequences
    for cuts in ([37, 287, 600], [1, 2, 333, 599, 600], [250, 600]):
        start, pieces = 0, []
        for index, end in enumerate(cuts):
            chunks = [(2, 300 + index, 301 + index), (0, start, end), (1, 0, 45 + index)]
            pieces.append(data.run(two, chunks, layout_seed=10 + end, window=window)[1])
            start = end
        assert_exact(bits(np.concatenate(pieces)), bits(alone), f"{what}: chunked at {cuts}", seed)

    # single rows as decode steps, next to prefill chunks of other sequences
    for position in (0, 31, 32, 400, 599):
        got = data.run(two, [(1, 0, 77), (0, position, position + 1), (2, 100, 333)], layout_seed=position,
                       window=window)
        assert_exact(bits(got[1]), bits(alone[position:position + 1]), f"{what}: decode row {position}", seed)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["auto", "generic"])
def test_eight_thousand_token_prefill(isa):
    """An 8000-token prompt in two chunks (the engine's budget), 9/3 heads as SmolLM2-135M."""
    seed = 8000
    data = Sequences(seed, [8000], 9, 3, 64)
    backend = make_cpu_backend(isa, 2)
    first, second = (data.run(backend, [(0, a, b)], layout_seed=a)[0] for a, b in [(0, 4096), (4096, 8000)])
    rows = np.r_[0:40, 4000:4200, 7900:8000]
    got = np.concatenate([first, second])[rows]
    want = np.concatenate([data.reference(0, r, r + 1) for r in rows])
    assert_close_fp32(got, want, "8000-token prefill", seed)
