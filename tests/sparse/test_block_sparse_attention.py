"""Block-sparse attention (the attention op's block-iterator policy) against an independent float64
reference that expands the masks token by token: causal, the Lambda mask of streaming heads
(sink + local window per sequence) and per-(sequence, KV head) page lists of dense heads at decode.
Awkward lengths, GQA ratios 1, 4 and 8, chunks that start mid-page, and a check that skipped pages
are never read (they hold NaN)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lserve import _C
from lserve_testing import assert_close_fp32, stream_ring_caches

PAGE = 16


def _batch(seed, seqs, num_qo_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(kv / PAGE) for _, kv in seqs]
    num_pages = sum(pages_per_seq) + 2
    order = torch.randperm(num_pages, generator=gen).to(torch.int32)
    b = dict(
        kv_page_indptr=torch.tensor(np.concatenate([[0], np.cumsum(pages_per_seq)]), dtype=torch.int32),
        kv_page_indices=order[:sum(pages_per_seq)].clone(),
        qo_indptr=torch.tensor(np.concatenate([[0], np.cumsum([q for q, _ in seqs])]), dtype=torch.int32),
        kv_lens=torch.tensor([kv for _, kv in seqs], dtype=torch.int32),
        k_cache=torch.randn((num_pages, PAGE, num_kv_heads, head_dim), generator=gen),
        v_cache=torch.randn((num_pages, PAGE, num_kv_heads, head_dim), generator=gen),
        query=torch.randn((sum(q for q, _ in seqs), num_qo_heads, head_dim), generator=gen),
    )
    return b


def _visible(seqs, s, kh, i, b, sink, local, head_pages):
    """Boolean over key positions of sequence s for query row i (KV head kh)."""
    q_len, kv_len = seqs[s]
    pos = kv_len - q_len + i
    j = np.arange(kv_len)
    mask = j <= pos
    if local is not None and local[s] > 0:
        mask &= (j < sink[s]) | (j > pos - local[s])
    if head_pages is not None:
        positions, counts = head_pages
        if counts[s, kh] >= 0:
            allowed = np.zeros(kv_len, dtype=bool)
            for p in positions[s, kh, :counts[s, kh]]:
                allowed[p * PAGE:(p + 1) * PAGE] = True
            mask &= allowed
    return mask


def _reference(seqs, b, sink=None, local=None, head_pages=None):
    num_qo_heads, head_dim = b["query"].shape[1:]
    num_kv_heads = b["k_cache"].shape[2]
    group = num_qo_heads // num_kv_heads
    out = np.zeros(b["query"].shape)
    scale = 1.0 / math.sqrt(head_dim)
    for s, (q_len, kv_len) in enumerate(seqs):
        pages = b["kv_page_indices"][b["kv_page_indptr"][s]:b["kv_page_indptr"][s + 1]].numpy()
        slots = np.array([pages[t // PAGE] * PAGE + t % PAGE for t in range(kv_len)], dtype=np.int64)
        keys = b["k_cache"].reshape(-1, num_kv_heads, head_dim).double().numpy()[slots]
        values = b["v_cache"].reshape(-1, num_kv_heads, head_dim).double().numpy()[slots]
        for i in range(q_len):
            row = int(b["qo_indptr"][s]) + i
            for qh in range(num_qo_heads):
                kh = qh // group
                mask = _visible(seqs, s, kh, i, b, sink, local, head_pages)
                scores = keys[:, kh] @ b["query"][row, qh].double().numpy() * scale
                scores = np.where(mask, scores, -np.inf)
                w = np.exp(scores - scores.max())
                out[row, qh] = (w / w.sum()) @ values[:, kh]
    return out


def _run(backend, b, **policy):
    out = torch.full(b["query"].shape, float("nan"))
    backend.attention(b["query"], b["k_cache"], b["v_cache"], b["qo_indptr"], b["kv_page_indptr"],
                      b["kv_page_indices"], b["kv_lens"], out, 1.0 / math.sqrt(b["query"].shape[2]), **policy)
    return out.numpy()


SEQS = [(1, 1), (17, 17), (40, 100), (1, 161), (33, 70), (5, 47), (1, 64), (16, 129)]


@pytest.fixture(scope="module")
def backend():
    return _C.Backend("cpu", 2)


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("sink, local", [(0, 8), (4, 16), (16, 33), (7, 1)])
def test_lambda_mask(backend, num_qo_heads, num_kv_heads, sink, local):
    b = _batch(sink * 31 + local + num_qo_heads, SEQS, num_qo_heads, num_kv_heads, 32)
    sinks = torch.full((len(SEQS),), sink, dtype=torch.int32)
    locals_ = torch.full((len(SEQS),), local, dtype=torch.int32)
    locals_[2] = 0  # a sequence without a window in the same call
    got = _run(backend, b, window_sink=sinks, window_local=locals_)
    want = _reference(SEQS, b, sinks.numpy(), locals_.numpy())
    assert_close_fp32(got, want, what=f"Lambda sink={sink} local={local} gqa={num_qo_heads // num_kv_heads}")


def test_lambda_skips_pages_outside_the_window(backend):
    """Pages wholly outside sink + window hold NaN: they must never be read."""
    seqs = [(1, 200), (24, 150)]
    b = _batch(5, seqs, 8, 2, 16)
    sink, local = 16, 32
    for s, (q_len, kv_len) in enumerate(seqs):
        pages = b["kv_page_indices"][b["kv_page_indptr"][s]:b["kv_page_indptr"][s + 1]]
        first_query = kv_len - q_len
        for p, page in enumerate(pages.tolist()):
            if p * PAGE >= sink and (p + 1) * PAGE - 1 <= first_query - local:
                b["k_cache"][page] = float("nan")
                b["v_cache"][page] = float("nan")
    sinks = torch.full((2,), sink, dtype=torch.int32)
    locals_ = torch.full((2,), local, dtype=torch.int32)
    got = _run(backend, b, window_sink=sinks, window_local=locals_)
    want = _reference(seqs, b, sinks.numpy(), locals_.numpy())
    assert np.isfinite(got).all()
    assert_close_fp32(got, want, what="Lambda with poisoned skipped pages")


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_head_page_lists(backend, num_qo_heads, num_kv_heads):
    seqs = [(1, 161), (1, 100), (3, 47), (1, 16)]
    b = _batch(num_qo_heads + num_kv_heads, seqs, num_qo_heads, num_kv_heads, 24)
    rng = np.random.default_rng(0)
    max_pages = 6
    positions = np.zeros((len(seqs), num_kv_heads, max_pages), dtype=np.int32)
    counts = np.full((len(seqs), num_kv_heads), -1, dtype=np.int32)
    for s, (_, kv_len) in enumerate(seqs[:2]):  # sequences 2 and 3 stay dense
        num_pages = math.ceil(kv_len / PAGE)
        for kh in range(num_kv_heads):
            chosen = sorted(set(rng.choice(num_pages - 1, size=4, replace=False).tolist()) | {num_pages - 1})
            positions[s, kh, :len(chosen)] = chosen
            counts[s, kh] = len(chosen)
            for p in range(num_pages):  # unlisted pages hold NaN for this head only
                if p not in chosen:
                    page = int(b["kv_page_indices"][b["kv_page_indptr"][s] + p])
                    b["k_cache"][page, :, kh] = float("nan")
                    b["v_cache"][page, :, kh] = float("nan")
    got = _run(backend, b, selection=torch.from_numpy(positions), selection_count=torch.from_numpy(counts))
    want = _reference(seqs, b, head_pages=(positions, counts))
    assert np.isfinite(got).all()
    assert_close_fp32(got, want, what=f"per-head page lists gqa={num_qo_heads // num_kv_heads}")


def test_policy_arguments_are_checked(backend):
    b = _batch(1, [(1, 20)], 4, 2, 8)
    with pytest.raises(ValueError, match="come together"):
        _run(backend, b, window_sink=torch.zeros(1, dtype=torch.int32))
    bad = torch.tensor([[[1, 0]] * 2], dtype=torch.int32)  # not ascending
    with pytest.raises(ValueError, match="ascend"):
        _run(backend, b, selection=bad, selection_count=torch.full((1, 2), 2, dtype=torch.int32))


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(4, 4), (8, 2)])
def test_selection_store_with_slots_and_base(backend, num_qo_heads, num_kv_heads):
    """The page selector's store: sequences read slot select_slot[s] (-1: dense), stored positions
    below select_base[s] plus every page from the base on; a slot whose count is -1 (no selection)
    reads every page. Pages nobody may read hold NaN for that head."""
    seqs = [(1, 161), (1, 100), (1, 47), (1, 130), (2, 90)]
    b = _batch(7 + num_qo_heads, seqs, num_qo_heads, num_kv_heads, 16)
    rng = np.random.default_rng(3)
    num_slots, capacity = 7, 5
    selection = np.full((num_slots, num_kv_heads, capacity), 999, dtype=np.int32)
    counts = np.full((num_slots, num_kv_heads), -1, dtype=np.int32)
    select_slot = np.array([5, 2, -1, 0, 3], dtype=np.int32)     # sequence 2 dense, slot 3 never selected
    num_pages = [math.ceil(kv / PAGE) for _, kv in seqs]
    select_base = np.array([num_pages[0], 4, num_pages[2], 6, num_pages[4]], dtype=np.int32)
    allowed_positions = {}
    for s in (0, 1, 3):
        slot, base = select_slot[s], select_base[s]
        for kh in range(num_kv_heads):
            # A selection made when the sequence had `base` pages (positions < base), padded with
            # positions >= base that a reuse must ignore.
            chosen = sorted(set(rng.choice(base - 1, size=2, replace=False).tolist()) | {base - 1})
            stored = chosen + [p for p in (base, base + 1) if p < num_pages[s]][:capacity - len(chosen)]
            selection[slot, kh, :len(stored)] = stored
            counts[slot, kh] = len(stored)
            allowed = set(chosen) | set(range(base, num_pages[s]))
            allowed_positions[(s, kh)] = allowed
            for p in range(num_pages[s]):
                if p not in allowed:
                    page = int(b["kv_page_indices"][b["kv_page_indptr"][s] + p])
                    b["k_cache"][page, :, kh] = float("nan")
                    b["v_cache"][page, :, kh] = float("nan")
    # The reference's per-(sequence, head) page lists: -1 = every page (dense, or slot 3 never selected).
    max_listed = max(num_pages)
    positions = np.zeros((len(seqs), num_kv_heads, max_listed), dtype=np.int32)
    listed = np.full((len(seqs), num_kv_heads), -1, dtype=np.int32)
    for (s, kh), allowed in allowed_positions.items():
        positions[s, kh, :len(allowed)] = sorted(allowed)
        listed[s, kh] = len(allowed)
    got = _run(backend, b, selection=torch.from_numpy(selection), selection_count=torch.from_numpy(counts),
               select_slot=torch.from_numpy(select_slot), select_base=torch.from_numpy(select_base))
    want = _reference(seqs, b, head_pages=(positions, listed))
    assert np.isfinite(got).all()
    assert_close_fp32(got, want, what=f"selection store gqa={num_qo_heads // num_kv_heads}")


@pytest.mark.parametrize("page_size_sink, local", [(1, 24), (2, 40), (0, 17)])
def test_stream_ring_addresses_pages_arithmetically(backend, page_size_sink, local):
    """A stream ring (sink pages + a ring of pages reused modulo its length) gives what the same keys
    give through a full page list with the Lambda mask; ring pages hold only the window's tokens,
    everything else (evicted tokens) is overwritten by later ones or NaN."""
    num_qo_heads, num_kv_heads, head_dim = 8, 2, 16
    seqs = [(1, 200), (9, 75), (1, 33), (4, 120)]
    b = _batch(11 + local, seqs, num_qo_heads, num_kv_heads, head_dim)
    sink = page_size_sink * PAGE
    sinks = torch.full((len(seqs),), sink, dtype=torch.int32)
    locals_ = torch.full((len(seqs),), local, dtype=torch.int32)
    want = _reference(seqs, b, sinks.numpy(), locals_.numpy())
    ring_k, ring_v, rings = stream_ring_caches(b["k_cache"].numpy(), b["v_cache"].numpy(),
                                               b["kv_page_indices"].numpy(), b["kv_page_indptr"].numpy(), seqs,
                                               page_size_sink, local)
    ring_k, ring_v = torch.from_numpy(ring_k), torch.from_numpy(ring_v)
    ring = torch.from_numpy(rings)
    out = torch.full(b["query"].shape, float("nan"))
    backend.attention(b["query"], ring_k, ring_v, b["qo_indptr"], None, None, b["kv_lens"], out,
                      1.0 / math.sqrt(head_dim), window_sink=sinks, window_local=locals_, stream_ring=ring)
    got = out.numpy()
    assert np.isfinite(got).all()
    assert_close_fp32(got, want, what=f"stream ring sink pages={page_size_sink} local={local}")
    # A ring too short for the chunk's window is refused, not read past.
    short = ring.clone()
    short[1, 3] = 1
    with pytest.raises(ValueError, match="more than its ring"):
        backend.attention(b["query"], ring_k, ring_v, b["qo_indptr"], None, None, b["kv_lens"], out,
                          1.0 / math.sqrt(head_dim), window_sink=sinks, window_local=locals_, stream_ring=short)
    with pytest.raises(ValueError, match="left undefined"):
        backend.attention(b["query"], ring_k, ring_v, b["qo_indptr"], b["kv_page_indptr"], b["kv_page_indices"],
                          b["kv_lens"], out, 1.0, window_sink=sinks, window_local=locals_, stream_ring=ring)
