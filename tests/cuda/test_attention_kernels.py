"""CUDA attention kernels (cuda/attention/) through the standalone library, against an fp32 torch
reference on the expanded mask. Rule (STYLE.md): max error <= 2x a plain torch bf16/fp16
implementation's error + output rounding noise; outputs are poisoned with NaN first, and the cache
holds NaN in every slot no sequence owns (so unmasked or unzeroed reads show up).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from attention_lib import (CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_SUPPORTED, PREFILL_AUTO, PREFILL_SM80,  # noqa: E402
                           PREFILL_SM90, AttentionLib, PagedBatch, build_library, check_attention, reference)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def lib():
    try:
        path = build_library()
    except Exception as e:  # no nvcc / CUTLASS here
        pytest.skip(f"attention library could not be built: {getattr(e, 'stderr', e)}")
    return AttentionLib(path)


def _run_prefill(lib, batch, impl, **sparse):
    out = batch.poisoned_output()
    code = lib.prefill(batch.args(out, **sparse), impl)
    if code == CUDA_ERROR_NOT_SUPPORTED and impl == PREFILL_SM90:
        pytest.skip("Hopper kernel not available for this device or page size")
    assert code == 0, lib.error(code)
    torch.cuda.synchronize()
    return out


# (seqs [(q_len, kv_len)], num_qo_heads, num_kv_heads, head_dim, page_size)
PREFILL_CASES = [
    ([(1, 1), (19, 19), (113, 113), (1023, 1023)], 4, 4, 128, 16),      # GQA 1, whole prompts
    ([(200, 1100), (1, 577), (64, 64), (130, 4096)], 8, 2, 128, 64),    # GQA 4, chunked prefill
    ([(128, 128), (129, 129), (191, 191), (300, 2000)], 8, 1, 128, 64),  # GQA 8, kv % page in {0, 1, 63}
    ([(257, 257), (129, 385), (7, 1000)], 8, 1, 64, 32),                # d64
    ([(300, 300), (1, 700)], 4, 1, 128, 256),                           # pages longer than a KV tile
    ([(100, 333), (65, 65)], 4, 2, 128, 24),                            # page size the TMA path refuses
]


@pytest.mark.parametrize("impl", [PREFILL_SM80, PREFILL_SM90, PREFILL_AUTO], ids=["sm80", "sm90", "auto"])
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_dense(lib, case, impl):
    seqs, hq, hkv, d, page = PREFILL_CASES[case]
    seed = 100 + case
    batch = PagedBatch(seqs, hq, hkv, d, page, torch.bfloat16, seed)
    out = _run_prefill(lib, batch, impl)
    check_attention(out, reference(batch, False), reference(batch, True), torch.bfloat16,
                    f"prefill case {case} impl {impl} seed {seed}")


# The Hopper launcher runs a persistent grid (one CTA per SM walking rounds of work tiles, the K/V ring
# running on across them) up to 20 waves of (128-query tile, head, sequence) work tiles, and one CTA per
# tile beyond (prefill_sm90.cuh). Both with many tiles, empty tiles (short sequences) and chunks.
SCHEDULE_CASES = {
    "persistent": [(2000, 2000), (37, 4000), (1000, 1500), (1, 1), (640, 641)],  # 2560 tiles: ~19 per CTA on 132 SMs
    "one_cta_per_tile": [(2700, 2700), (2700, 3000), (2600, 2600), (2700, 2777), (129, 129), (2700, 2700)],
}


@pytest.mark.parametrize("schedule", list(SCHEDULE_CASES))
def test_prefill_sm90_work_schedules(lib, schedule):
    batch = PagedBatch(SCHEDULE_CASES[schedule], 32, 8, 128, 64, torch.bfloat16, seed=len(schedule))
    out = _run_prefill(lib, batch, PREFILL_SM90)
    check_attention(out, reference(batch, False), reference(batch, True), torch.bfloat16, f"prefill {schedule}")


@pytest.mark.parametrize("impl", [PREFILL_SM80, PREFILL_SM90], ids=["sm80", "sm90"])
def test_prefill_fp16(lib, impl):
    batch = PagedBatch([(333, 333), (64, 1500)], 8, 2, 128, 64, torch.float16, seed=7)
    out = _run_prefill(lib, batch, impl)
    check_attention(out, reference(batch, False), reference(batch, True), torch.float16, f"prefill fp16 impl {impl}")


@pytest.mark.parametrize("impl", [PREFILL_SM80, PREFILL_SM90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("sink, local", [(64, 200), (0, 128), (128, 8192), (5, 1)])
def test_prefill_windows(lib, impl, sink, local):
    """Per-sequence windows (Lambda mask, token-exact) beside sequences without one (window_local <= 0),
    against the expanded mask."""
    batch = PagedBatch([(700, 700), (300, 1500), (5, 900), (1, 1), (64, 640)], 8, 4, 128, 16, torch.bfloat16,
                       seed=sink + local)
    sparse = dict(window_sink=[sink, sink, sink // 2 + 3, sink, sink], window_local=[local, 0, local + 17, local, -5])
    out = _run_prefill(lib, batch, impl, **sparse)
    check_attention(out, reference(batch, False, **sparse), reference(batch, True, **sparse), torch.bfloat16,
                    f"windowed prefill sink {sink} local {local} impl {impl}")


def _run_decode(lib, batch, num_splits=None, **sparse):
    out = batch.poisoned_output()
    args = batch.args(out, **sparse)
    splits = lib.num_splits(args) if num_splits is None else num_splits
    workspace = lib.decode_workspace(args, splits)
    if workspace is not None:
        workspace.fill_(255)  # NaN floats: every partial result must be written
    code = lib.decode(args, splits, workspace)
    assert code == 0, lib.error(code)
    torch.cuda.synchronize()
    return out


# (seqs [(q_len, kv_len)], num_qo_heads, num_kv_heads, head_dim, page_size)
DECODE_CASES = [
    ([(1, 1), (1, 17), (1, 5000), (1, 40000)], 32, 8, 128, 16),  # GQA 4, long contexts
    ([(1, 1023), (1, 64), (1, 65)], 8, 8, 128, 64),                # GQA 1
    ([(2, 3000), (1, 129)], 16, 2, 128, 64),                       # GQA 8, two queries -> 16 rows
    ([(1, 777), (1, 63)], 8, 1, 64, 32),                           # d64, GQA 8
    ([(3, 2000)], 16, 4, 64, 16),                                  # three queries x GQA 4 = 12 rows
    ([(1, 100), (1, 131)], 4, 2, 128, 24),                         # odd page size
]


@pytest.mark.parametrize("splits", [1, None, 7], ids=["nosplit", "heuristic", "split7"])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_dense(lib, case, splits):
    seqs, hq, hkv, d, page = DECODE_CASES[case]
    seed = 200 + case
    batch = PagedBatch(seqs, hq, hkv, d, page, torch.bfloat16, seed)
    out = _run_decode(lib, batch, splits)
    check_attention(out, reference(batch, False), reference(batch, True), torch.bfloat16,
                    f"decode case {case} splits {splits} seed {seed}")


def test_decode_fp16(lib):
    batch = PagedBatch([(1, 3000), (1, 5)], 32, 8, 128, 16, torch.float16, seed=9)
    out = _run_decode(lib, batch)
    check_attention(out, reference(batch, False), reference(batch, True), torch.float16, "decode fp16")


GARBAGE = 10**6  # store entries attention must never read: a page position far beyond any sequence


def _store(batch, seed, num_slots, slots, keep_fraction=0.3, every=False):
    """A selection store: (num_slots, num_kv_heads, capacity) ascending page positions and their
    (num_slots, num_kv_heads) counts. Sequence s's slot slots[s] (None: the sequence has none) holds a
    random subset of its page list (the newest page always, or every page); entries past a count and
    slots no sequence names hold GARBAGE (counts too), which attention must never read."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = [-(-kv // batch.page_size) for _, kv in batch.seqs]
    capacity = max(num_pages) + 3
    selection = torch.full((num_slots, batch.num_kv_heads, capacity), GARBAGE, dtype=torch.int32)
    counts = torch.full((num_slots, batch.num_kv_heads), GARBAGE, dtype=torch.int32)
    for s, n in enumerate(num_pages):
        if slots[s] is None or slots[s] < 0:
            continue
        for h in range(batch.num_kv_heads):
            keep = torch.ones(n, dtype=torch.bool) if every else torch.rand(n, generator=gen) < keep_fraction
            keep[n - 1] = True
            ids = torch.nonzero(keep).flatten()
            selection[slots[s], h, :len(ids)] = ids.to(torch.int32)
            counts[slots[s], h] = len(ids)
    return selection, counts


@pytest.mark.parametrize("page_size", [16, 64, 128])
def test_decode_selection_and_windows(lib, page_size):
    """The sparse decode policy on every backend's vocabulary (ops/attention.h), against the expanded
    mask: a store with more slots than sequences; stored positions below base plus the pages from base
    on (also stored positions >= base, which must be ignored); "dense" (slot < 0) and "no selection"
    (count < 0) sequences and heads falling back to their window or to every page; a selected head of a
    windowed sequence reading its selection under its window's Lambda mask (the intersection, as the
    CPU reference does); a count of 0 reading only the new pages. Pages of 16 put 4 pages in a 64-key
    tile, 128 spread a page over 2 tiles."""
    seqs = [(1, 5000), (1, 70), (2, 2500), (1, 3000), (1, 1), (1, 1000)]
    batch = PagedBatch(seqs, 16, 4, 128, page_size, torch.bfloat16, seed=page_size)
    num_pages = [-(-kv // page_size) for _, kv in seqs]
    slots = [5, 0, 3, -1, 2, 7]
    selection, counts = _store(batch, page_size, num_slots=9, slots=slots)
    counts[5, 1] = -1  # sequence 0, KV head 1: no selection (its window applies)
    counts[7, 2] = -1  # sequence 5, KV head 2: no selection (no window: every page)
    counts[0, 3] = 0   # sequence 1, KV head 3: nothing stored, only the pages from base on
    bases = [num_pages[0] - 2, max(num_pages[1] - 1, 0), num_pages[2], 0, 0, num_pages[5] // 2]
    sparse = dict(selection=selection, selection_count=counts, select_slot=slots, select_base=bases,
                  window_sink=[64, 0, 64, 32, 0, 0], window_local=[300, 0, 100, 500, 0, 0])
    out = _run_decode(lib, batch, None, **sparse)
    check_attention(out, reference(batch, False, **sparse), reference(batch, True, **sparse), torch.bfloat16,
                    f"decode selection and windows, pages of {page_size}")
    split = _run_decode(lib, batch, 7, **sparse)
    check_attention(split, reference(batch, False, **sparse), reference(batch, True, **sparse), torch.bfloat16,
                    f"decode selection and windows, pages of {page_size}, 7 splits")


def test_decode_selection_one_row_per_sequence(lib):
    """Without select_slot/select_base: slot s, base = the page count (only stored positions)."""
    batch = PagedBatch([(1, 4000), (1, 33), (1, 640)], 32, 8, 128, 16, torch.bfloat16, seed=12)
    selection, counts = _store(batch, 12, num_slots=3, slots=[0, 1, 2], keep_fraction=0.2)
    sparse = dict(selection=selection, selection_count=counts)
    out = _run_decode(lib, batch, None, **sparse)
    check_attention(out, reference(batch, False, **sparse), reference(batch, True, **sparse), torch.bfloat16,
                    "decode selection, one store row per sequence")


def test_decode_every_page_selected_matches_dense(lib):
    """Every page selected, "dense" (select_slot < 0) and "no selection" (count < 0) all read every page."""
    batch = PagedBatch([(1, 4000), (1, 33)], 32, 8, 128, 16, torch.bfloat16, seed=11)
    dense = _run_decode(lib, batch)
    ref = reference(batch, False)
    bound = 2 * (dense.float() - ref).abs().max() + 1e-3
    selection, counts = _store(batch, 0, num_slots=2, slots=[0, 1], every=True)
    num_pages = [-(-kv // 16) for _, kv in batch.seqs]
    variants = {
        "every page selected": dict(selection=selection, selection_count=counts),
        "dense slots": dict(selection=selection, selection_count=counts, select_slot=[-1, -1], select_base=num_pages),
        "no selection": dict(selection=selection, selection_count=torch.full_like(counts, -1)),
    }
    for what, sparse in variants.items():
        out = _run_decode(lib, batch, None, **sparse)
        check_attention(out, ref, reference(batch, True), torch.bfloat16, what)
        err = (out.float() - dense.float()).abs().max()
        assert err <= bound, f"{what}: differs from the dense kernel by {err:.3e} > {bound:.3e}"


def _launch_code(lib, batch, prefill, **sparse):
    out = batch.poisoned_output()
    args = batch.args(out, **sparse)
    code = lib.prefill(args, PREFILL_SM80) if prefill else lib.decode(args, 1, None)
    torch.cuda.synchronize()
    return code, out


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_sparsity_refused(lib, prefill):
    """What the launchers cannot honour they refuse (cudaErrorInvalidValue) and write nothing: a store at
    prefill, and the fields AttentionArgs pairs given alone. (Stream rings are read since PageTable:
    tests/cuda/test_sparse_ops_cuda.py.)"""
    batch = PagedBatch([(1, 300), (1, 70)], 8, 2, 128, 16, torch.bfloat16, seed=13)
    selection, counts = _store(batch, 13, num_slots=2, slots=[0, 1])
    cases = {
        "window_sink alone": dict(window_sink=[4, 4]),
        "window_local alone": dict(window_local=[64, 64]),
        "selection alone": dict(selection=selection),
        "select_slot without select_base": dict(selection=selection, selection_count=counts, select_slot=[0, 1]),
        "select_slot without a store": dict(select_slot=[0, 1], select_base=[1, 1]),
        "a store of 3 rows for 2 sequences without select_slot": dict(
            selection=torch.cat([selection, selection[:1]]), selection_count=torch.cat([counts, counts[:1]])),
    }
    if prefill:
        cases["a store at prefill"] = dict(selection=selection, selection_count=counts)
    for what, sparse in cases.items():
        code, out = _launch_code(lib, batch, prefill, **sparse)
        assert code == CUDA_ERROR_INVALID_VALUE, f"{what}: launcher returned {code} ({lib.error(code)})"
        assert out.isnan().all(), f"{what}: refused, yet the output was written"


def test_decode_rejects_too_many_rows(lib):
    batch = PagedBatch([(3, 100)], 16, 2, 128, 16, torch.bfloat16, seed=1)  # 3 x 8 = 24 rows > 16
    out = batch.poisoned_output()
    assert lib.decode(batch.args(out), 1, None) != 0
