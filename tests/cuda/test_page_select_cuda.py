"""page_select and page_stats_append on CUDA against the CPU reference on the same Args
(ops/page_select.h). Exact: the kernels sum the page scores in the CPU's order with IEEE-rounded
steps, so the selections (ties included) and the kmax/kmin bits must be identical; bfloat16/float16
queries and keys are compared with the CPU run on the same low-precision values. Outputs start
poisoned on both backends, so an entry only one of them writes shows up; store tests (slots, modes)
start from a sentinel store and check that the rows no fresh sequence names keep it bit for bit.
(The basename differs from tests/sparse/test_page_select.py: pytest's default import mode needs unique ones.)"""
from __future__ import annotations

import re

import numpy as np
import pytest

from cuda_testing import DEVICE, STANDIN, TORCH_DTYPES, ints, on_gpu, on_host, require, torch
from lserve_testing import assert_exact

pytestmark = pytest.mark.cuda

POISON = -12345


def make_select_case(seed: int, kv_lens, num_kv: int, group: int, head_dim: int, page_size: int = 64,
                     logical: int = 16, quantised: bool = False, duplicate_pages: bool = False) -> dict:
    """Host arguments: random kmax/kmin/query over a pool with spare pages, each sequence's pages a
    shuffled draw from the pool. quantised: small half-integers, so many pages score exactly alike;
    duplicate_pages: some list entries repeat a page of the same sequence (identical scores)."""
    rng = np.random.default_rng(seed)
    page_counts = [-(-kv_len // page_size) for kv_len in kv_lens]
    pool = sum(page_counts) + 7
    shape = (pool, page_size // logical, num_kv, head_dim)
    if quantised:
        kmax = rng.integers(-2, 3, shape).astype(np.float32) / 2
        kmin = kmax - rng.integers(0, 3, shape).astype(np.float32) / 2
        query = rng.integers(-1, 2, (len(kv_lens), num_kv * group, head_dim)).astype(np.float32)
    else:
        kmax = rng.standard_normal(shape).astype(np.float32)
        kmin = (kmax - np.abs(rng.standard_normal(shape))).astype(np.float32)
        query = rng.standard_normal((len(kv_lens), num_kv * group, head_dim)).astype(np.float32)
    free = rng.permutation(pool)
    lists, start = [], 0
    for count in page_counts:
        pages = free[start:start + count].copy()
        start += count
        if duplicate_pages and count > 3:
            repeat = rng.integers(0, count, count // 3)
            pages[rng.integers(0, count, count // 3)] = pages[repeat]
        lists.append(pages)
    indptr = np.zeros(len(kv_lens) + 1, np.int32)
    indptr[1:] = np.cumsum(page_counts)
    indices = np.concatenate(lists).astype(np.int32) if lists else np.zeros(0, np.int32)
    return dict(query=query, kmax=kmax, kmin=kmin, kv_page_indptr=indptr, kv_page_indices=indices,
                kv_lens=np.asarray(kv_lens, np.int32), physical_page_size=page_size)


def run_select(backend, host: dict, num_select: int, keep_first_page: bool, page_score: str, on_device: bool,
               strided_query: bool = False, query_dtype: str = "float32", store=None, group_score: str = "sum",
               spread: float = 0.25) -> tuple:
    """The store (selected, num_selected) after page_select. host may hold qo_indptr, select_mode,
    select_slot, keep_last_pages and head_num_select; store: its starting contents (default: POISON, one row per sequence)."""
    num_seqs, num_kv = host["kv_lens"].shape[0], host["kmax"].shape[2]
    args = {}
    for key, value in host.items():
        if isinstance(value, int):  # physical_page_size, keep_last_pages
            args[key] = value
        elif key == "query":  # low precision: rounded on the host (numpy has no bfloat16); same bits on both
            query = value.copy() if query_dtype == "float32" else on_host(value, query_dtype)
            args[key] = torch.as_tensor(query).to(DEVICE) if on_device else query
        elif not on_device:
            args[key] = value.copy()
        else:
            args[key] = on_gpu(value) if value.dtype == np.float32 else ints(value)
    if strided_query and on_device:  # rows inside a wider buffer, at an odd offset: the scalar-load kernel
        num_rows, num_qo, head_dim = host["query"].shape
        wide = torch.full((num_rows, num_qo * head_dim + 3), float("nan"), device=DEVICE,
                          dtype=TORCH_DTYPES[query_dtype])
        wide[:, 1:1 + num_qo * head_dim] = args["query"].reshape(num_rows, -1)
        args["query"] = wide[:, 1:1 + num_qo * head_dim].view(num_rows, num_qo, head_dim)
    if store is None:
        store = (np.full((num_seqs, num_kv, num_select), POISON, np.int32),
                 np.full((num_seqs, num_kv), POISON, np.int32))
    selected, num_selected = (ints(store[0]), ints(store[1])) if on_device else (store[0].copy(), store[1].copy())
    backend.page_select(selected=selected, num_selected=num_selected, keep_first_page=keep_first_page,
                        page_score=page_score, group_score=group_score, spread=spread, **args)
    if on_device:
        return selected.cpu().numpy(), num_selected.cpu().numpy()
    return selected, num_selected


def check_select(cuda_backend, cpu_backend, host: dict, num_select: int, keep_first_page: bool, page_score: str,
                 what: str, seed, strided_query: bool = False, query_dtype: str = "float32", store=None,
                 group_score: str = "sum") -> tuple:
    """CUDA against the CPU on the same Args and the same starting store, exactly; returns the store."""
    expected = run_select(cpu_backend, host, num_select, keep_first_page, page_score, on_device=False,
                          query_dtype=query_dtype, store=store, group_score=group_score)
    actual = run_select(cuda_backend, host, num_select, keep_first_page, page_score, on_device=True,
                        strided_query=strided_query, query_dtype=query_dtype, store=store, group_score=group_score)
    what = (f"{what} num_select={num_select} keep_first={keep_first_page} {page_score}/{group_score} "
            f"query {query_dtype}")
    if store is None:
        assert not (actual[1] == POISON).any(), (
            f"{what}: num_selected unwritten at {np.argwhere(actual[1] == POISON)[:5]}")
    assert_exact(actual[1], expected[1], f"{what}: num_selected", seed)
    assert_exact(actual[0], expected[0], f"{what}: selected", seed)
    return actual


# Lengths: 1 token, exact pages, one past, a partial last page, num_pages around num_select.
KV_LENS = [1, 64, 65, 127, 130, 640, 1000, 1153, 4095, 4096, 4097, 9000]


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_score", ["bound", "center", "blend"])
@pytest.mark.parametrize("group_score", ["sum", "max"])
def test_page_select_matches_cpu(cuda_backend, cpu_backend, group, head_dim, page_score, group_score):
    require(cuda_backend, "page_select", head_dim=head_dim, group_score=group_score)
    seed = 10 * group + head_dim + {"bound": 0, "center": 1, "blend": 2}[page_score]
    host = make_select_case(seed, KV_LENS, num_kv=2, group=group, head_dim=head_dim)
    for num_select in (2, 3, 17, 80):  # up to more than half of the longest sequence's 141 pages
        for keep_first in (True, False):
            check_select(cuda_backend, cpu_backend, host, num_select, keep_first, page_score,
                         f"group {group} head_dim {head_dim}", seed, strided_query=num_select == 17,
                         group_score=group_score)


@pytest.mark.parametrize("group_score", ["sum", "max", "mass"])
def test_page_select_supports_is_truthful(cuda_backend, cpu_backend, group_score):
    """supports() answers for the op as it runs: a group score it refuses (CUDA: 'mass') raises with the
    answer's reason instead of selecting something else; one it accepts selects what the CPU does."""
    host = make_select_case(3, [1000], num_kv=2, group=3, head_dim=64)
    answer = cuda_backend.supports("page_select", head_dim=64, group_score=group_score)
    if not answer:
        assert "'mass'" in answer.reason
        with pytest.raises(ValueError, match=re.escape(answer.reason)):
            run_select(cuda_backend, host, 4, True, "center", on_device=True, group_score=group_score)
        return
    check_select(cuda_backend, cpu_backend, host, 4, True, "center", f"group_score {group_score}", 3,
                 group_score=group_score)


@pytest.mark.parametrize("page_size, logical", [(64, 64), (32, 8), (16, 1)])
def test_page_select_logical_page_sizes(cuda_backend, cpu_backend, page_size, logical):
    """One to sixteen logical pages per physical page; partial last pages cut inside them."""
    seed = 100 + page_size + logical
    kv_lens = [1, page_size, page_size + 1, 7 * page_size - 1, 50 * page_size + logical + 1, 333]
    host = make_select_case(seed, kv_lens, num_kv=3, group=2, head_dim=64, page_size=page_size, logical=logical)
    for num_select in (2, 5, 30):
        for page_score in ("bound", "center"):
            check_select(cuda_backend, cpu_backend, host, num_select, True, page_score, f"pages {page_size}/{logical}",
                         seed)


def bound_scores(host: dict, seq: int, kv_head: int) -> np.ndarray:
    """numpy page scores ("bound") of one (sequence, KV head); exact for quantised inputs."""
    query, kmax, kmin = host["query"][seq], host["kmax"], host["kmin"]
    group = query.shape[0] // kmax.shape[2]
    q = query[kv_head * group:(kv_head + 1) * group]
    begin, end = host["kv_page_indptr"][seq], host["kv_page_indptr"][seq + 1]
    page_size, logical = host["physical_page_size"], host["physical_page_size"] // kmax.shape[1]
    scores = []
    for position, page in enumerate(host["kv_page_indices"][begin:end]):
        num_logical = -(-min(page_size, int(host["kv_lens"][seq]) - position * page_size) // logical)
        high, low = kmax[page, :num_logical, kv_head], kmin[page, :num_logical, kv_head]
        terms = np.maximum(q[:, None] * high, q[:, None] * low)
        scores.append(terms.sum(axis=(0, 2)).max())
    return np.asarray(scores)


@pytest.mark.parametrize("duplicate_pages", [False, True])
def test_page_select_ties(cuda_backend, cpu_backend, duplicate_pages):
    """Quantised statistics: many pages score exactly alike, so the top-k boundary falls inside ties
    (the earlier position wins), also with pages repeated in a sequence's list."""
    seed = 200 + int(duplicate_pages)
    host = make_select_case(seed, [700, 3000, 64 * 200, 5], num_kv=4, group=4, head_dim=64, quantised=True,
                            duplicate_pages=duplicate_pages)
    scores = bound_scores(host, 2, 1)
    assert np.unique(scores).size < scores.size // 3, "the case should be full of tied scores"
    for num_select in (2, 9, 40, 120):
        for keep_first in (True, False):
            for page_score in ("bound", "center"):
                check_select(cuda_backend, cpu_backend, host, num_select, keep_first, page_score, "ties", seed)
    for num_select in (9, 40):  # half-integers are exact in bfloat16: the same ties from a bf16 query
        check_select(cuda_backend, cpu_backend, host, num_select, True, "bound", "ties", seed, query_dtype="bfloat16")


def test_page_select_special_values(cuda_backend, cpu_backend):
    """NaN and infinite statistics (NaN logical scores are ignored, as the CPU's std::max does; inf - inf
    gives NaN), zero queries (+0 and -0 scores rank equal) and pages whose every logical page is NaN."""
    seed = 300
    host = make_select_case(seed, [64 * 60, 64 * 33 + 5, 64 * 90], num_kv=2, group=2, head_dim=64)
    rng = np.random.default_rng(seed)
    kmax, kmin = host["kmax"], host["kmin"]
    pool = kmax.shape[0]
    kmax[rng.integers(0, pool, 20), rng.integers(0, 4, 20), rng.integers(0, 2, 20), rng.integers(0, 64, 20)] = np.nan
    kmax[rng.integers(0, pool, 10), :, 0, rng.integers(0, 64, 10)] = np.nan  # every logical page of a page
    kmax[rng.integers(0, pool, 10), rng.integers(0, 4, 10), 1, rng.integers(0, 64, 10)] = np.inf
    kmin[rng.integers(0, pool, 10), rng.integers(0, 4, 10), 1, rng.integers(0, 64, 10)] = -np.inf
    host["query"][1] = 0.0
    host["query"][2, :, ::2] = -0.0
    for num_select in (3, 25):
        for page_score in ("bound", "center", "blend"):
            check_select(cuda_backend, cpu_backend, host, num_select, True, page_score, "special values", seed)


@pytest.mark.parametrize("group_score", ["sum", "max"])
def test_page_select_recent_pages_and_head_counts(cuda_backend, cpu_backend, group_score):
    """keep_last_pages (the newest pages every selection keeps) and head_num_select (a page count per
    KV head within the store's width, the per-head budgets) bit-identical to the CPU; a count outside
    [forced, width] marks the row -1 on CUDA where the CPU raises."""
    require(cuda_backend, "page_select", head_dim=64, group_score=group_score)
    seed = 450
    host = make_select_case(seed, [1, 16, 17, 100, 300, 1000, 4097], num_kv=3, group=3, head_dim=64, page_size=16,
                            logical=4)
    for keep_last in (1, 2, 5):
        for counts in (None, [12, 7, 9]):
            for keep_first in (True, False):
                case = dict(host, keep_last_pages=keep_last)
                if counts is not None:
                    case["head_num_select"] = np.array(counts, np.int32)
                check_select(cuda_backend, cpu_backend, case, 12, keep_first, "blend",
                             f"keep_last {keep_last} counts {counts}", seed, group_score=group_score)
    if STANDIN:
        return
    bad = dict(host, keep_last_pages=5, head_num_select=np.array([12, 5, 13], np.int32))  # 5 < 6 forced, 13 > 12
    selected, num_selected = run_select(cuda_backend, bad, 12, True, "blend", on_device=True)
    long_rows = host["kv_lens"] > 16 * 12
    assert (num_selected[long_rows][:, 1:] == -1).all() and (num_selected[long_rows][:, 0] == 12).all()
    with pytest.raises(ValueError, match="outside"):
        run_select(cpu_backend, bad, 12, True, "blend", on_device=False)


def test_page_select_large(cuda_backend, cpu_backend):
    """20000 pages in one sequence (1.28M tokens of 64) beside short ones: the 1024-thread selection."""
    seed = 400
    host = make_select_case(seed, [64 * 20000 - 17, 100, 64 * 3000], num_kv=2, group=2, head_dim=64)
    for num_select in (2, 1000, 12000):
        check_select(cuda_backend, cpu_backend, host, num_select, True, "bound", "20000 pages", seed)
    check_select(cuda_backend, cpu_backend, host, 4096, False, "center", "20000 pages", seed)


def test_page_select_invalid_rows(cuda_backend, cpu_backend):
    """CUDA cannot raise without a sync: rows the CPU rejects get num_selected = -1 and nothing else;
    the other rows select as usual."""
    if STANDIN:
        pytest.skip("the CPU stand-in raises instead of writing -1")
    seed = 500
    host = make_select_case(seed, [640, 640, 640, 640, 200, 640], num_kv=2, group=2, head_dim=64)
    pool = host["kmax"].shape[0]
    host["kv_lens"][0] = 641                 # more tokens than its pages hold
    host["kv_lens"][1] = 576                 # a page with no token
    host["kv_page_indices"][25] = pool + 3   # sequence 2: a page id beyond the pool
    host["kv_page_indices"][35] = -1         # sequence 3
    host["kv_page_indices"][41] = pool       # sequence 4: 4 pages <= num_select, not scored: no check
    selected, num_selected = run_select(cuda_backend, host, 6, True, "bound", on_device=True)
    assert_exact(num_selected[:4], np.full((4, 2), -1, np.int32), "invalid rows: num_selected", seed)
    assert_exact(selected[:4], np.full((4, 2, 6), POISON, np.int32), "invalid rows: selected untouched", seed)
    good = dict(host, query=host["query"][4:], kv_lens=host["kv_lens"][4:],
                kv_page_indptr=host["kv_page_indptr"][4:] - host["kv_page_indptr"][4],
                kv_page_indices=host["kv_page_indices"][host["kv_page_indptr"][4]:].copy())
    good["kv_page_indices"][1] = 0  # the CPU skips the check there too; any in-range id
    expected = run_select(cpu_backend, good, 6, True, "bound", on_device=False)
    assert_exact(selected[4:], expected[0], "valid rows beside invalid ones", seed)
    assert_exact(num_selected[4:], expected[1], "valid rows beside invalid ones: num_selected", seed)
    for row in range(4):
        one = dict(host, query=host["query"][row:row + 1], kv_lens=host["kv_lens"][row:row + 1],
                   kv_page_indptr=np.array([0, 10], np.int32),
                   kv_page_indices=host["kv_page_indices"][10 * row:10 * row + 10])
        with pytest.raises(ValueError):
            run_select(cpu_backend, one, 6, True, "bound", on_device=False)


def test_page_select_pages_outside_the_list(cuda_backend):
    """An indptr range past the page list (the CPU would read out of bounds) gives -1, not a crash."""
    if STANDIN:
        pytest.skip("the CPU reference reads out of bounds here")
    host = make_select_case(600, [640, 640], num_kv=1, group=1, head_dim=64)
    host["kv_page_indptr"][2] = 25
    _, num_selected = run_select(cuda_backend, host, 4, True, "bound", on_device=True)
    assert_exact(num_selected[:, 0], np.array([4, -1], np.int32), "indptr past the list", 600)


# ---- the selector's store: slots, modes, query chunks, low-precision queries ----------------------

SELECT_DENSE, SELECT_FRESH, SELECT_REUSE = 0, 1, 2  # SelectMode (ops/page_select.h)


def sentinel_store(seed: int, num_slots: int, num_kv: int, num_select: int) -> tuple:
    """A store full of values no selection writes (positions >= 10**6; counts -1, POISON, 10**6): the
    rows a step does not select for must keep them bit for bit, "no selection" (-1) included."""
    rng = np.random.default_rng(seed + 7)
    selected = rng.integers(10**6, 2 * 10**6, (num_slots, num_kv, num_select)).astype(np.int32)
    num_selected = rng.choice(np.array([-1, POISON, 10**6], np.int32), (num_slots, num_kv))
    return selected, num_selected


def chunked(host: dict, seed: int, q_lens) -> dict:
    """host with sequence s's query row moved to the last row of a chunk of q_lens[s] rows (qo_indptr);
    the other rows hold another random draw, so reading a wrong row changes the scores."""
    rng = np.random.default_rng(seed + 11)
    _, num_qo, head_dim = host["query"].shape
    qo_indptr = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    query = (3 * rng.standard_normal((int(qo_indptr[-1]), num_qo, head_dim))).astype(np.float32)
    for s, q_len in enumerate(q_lens):
        if q_len > 0:
            query[qo_indptr[s + 1] - 1] = host["query"][s]
    return dict(host, query=query, qo_indptr=qo_indptr)


def check_store(actual: tuple, initial: tuple, host: dict, what: str, seed) -> None:
    """Independently of the CPU: rows no fresh sequence names are untouched; the rows fresh sequences
    name hold a selection (1 <= num_selected <= num_select, positions in range)."""
    num_seqs, num_slots, num_select = host["kv_lens"].shape[0], initial[1].shape[0], initial[0].shape[2]
    modes = host.get("select_mode", np.full(num_seqs, SELECT_FRESH, np.int32))
    slots = host.get("select_slot", np.arange(num_seqs, dtype=np.int32))
    fresh = (modes == SELECT_FRESH) & (slots >= 0) & (slots < num_slots)
    written = np.zeros(num_slots, bool)
    written[slots[fresh]] = True
    assert_exact(actual[0][~written], initial[0][~written], f"{what}: store rows of no fresh sequence (selected)", seed)
    assert_exact(actual[1][~written], initial[1][~written], f"{what}: store rows of no fresh sequence (num_selected)",
                 seed)
    counts = actual[1][written]
    assert ((counts >= 1) & (counts <= num_select)).all(), f"{what}: fresh rows hold counts {np.unique(counts)}"


@pytest.mark.parametrize("query_dtype", ["float32", "bfloat16"])
def test_page_select_store_slots(cuda_backend, cpu_backend, query_dtype):
    """More slots than sequences, each sequence writing the slot a permutation gives it."""
    seed = 700 + (query_dtype == "bfloat16")
    kv_lens = [1, 640, 4097, 130, 9000, 65, 1153]
    host = make_select_case(seed, kv_lens, num_kv=2, group=4, head_dim=128)
    num_slots = 12
    host["select_slot"] = np.random.default_rng(seed).permutation(num_slots)[:len(kv_lens)].astype(np.int32)
    for num_select in (2, 17, 80):
        store = sentinel_store(seed + num_select, num_slots, 2, num_select)
        what = f"{num_slots} slots {host['select_slot'].tolist()}"
        actual = check_select(cuda_backend, cpu_backend, host, num_select, True, "bound", what, seed,
                              strided_query=num_select == 17, query_dtype=query_dtype, store=store)
        check_store(actual, store, host, what, seed)


def test_page_select_mixed_modes(cuda_backend, cpu_backend):
    """Dense, fresh and reuse sequences in one step: only the fresh ones' rows change; a dense sequence
    may name no slot (-1); two fresh sequences naming one slot leave the later one's selection there."""
    seed = 710
    kv_lens = [640, 4097, 1, 9000, 1153, 130, 3000, 64, 2000, 700]
    host = make_select_case(seed, kv_lens, num_kv=3, group=2, head_dim=64)
    num_slots = 13
    host["select_mode"] = np.array([1, 0, 1, 2, 1, 2, 0, 1, 1, 2], np.int32)
    host["select_slot"] = np.array([4, -1, 9, 0, 2, 7, 3, 12, 9, 4], np.int32)  # seq 8 follows seq 2 in slot 9
    for num_select, keep_first in ((3, True), (40, False)):
        for page_score in ("bound", "center"):
            store = sentinel_store(seed + num_select, num_slots, 3, num_select)
            what = f"modes {host['select_mode'].tolist()} slots {host['select_slot'].tolist()}"
            actual = check_select(cuda_backend, cpu_backend, host, num_select, keep_first, page_score, what, seed,
                                  store=store)
            check_store(actual, store, host, what, seed)
    no_fresh = dict(host, select_mode=np.array([0, 2, 2, 0, 0, 2, 0, 2, 2, 0], np.int32))
    store = sentinel_store(seed, num_slots, 3, 5)
    actual = run_select(cuda_backend, no_fresh, 5, True, "bound", on_device=True, store=store)
    assert_exact(actual[0], store[0], "a step with no fresh sequence: selected untouched", seed)
    assert_exact(actual[1], store[1], "a step with no fresh sequence: num_selected untouched", seed)


@pytest.mark.parametrize("strided", [False, True])
def test_page_select_query_chunks(cuda_backend, cpu_backend, strided):
    """The step's whole query tensor with qo_indptr: sequence s scores with its chunk's last row."""
    seed = 720 + int(strided)
    kv_lens = [700, 3000, 64 * 200, 5, 1153]
    host = chunked(make_select_case(seed, kv_lens, num_kv=2, group=4, head_dim=128), seed, [1, 7, 33, 5, 16])
    for num_select in (2, 9, 40):
        check_select(cuda_backend, cpu_backend, host, num_select, True, "bound", "chunks", seed, strided_query=strided)
    # With a store, slots and modes: a reused sequence may have an empty chunk (it is not scored).
    host = chunked(make_select_case(seed + 1, kv_lens, num_kv=2, group=4, head_dim=128), seed, [3, 0, 1, 9, 2])
    host["select_mode"] = np.array([1, 2, 1, 1, 0], np.int32)
    host["select_slot"] = np.array([6, 1, 0, 3, 2], np.int32)
    store = sentinel_store(seed, 8, 2, 9)
    actual = check_select(cuda_backend, cpu_backend, host, 9, False, "center", "chunks and store", seed,
                          strided_query=strided, store=store)
    check_store(actual, store, host, "chunks and store", seed)


@pytest.mark.parametrize("query_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("page_score", ["bound", "center", "blend"])
def test_page_select_low_precision_query(cuda_backend, cpu_backend, query_dtype, page_score):
    """bfloat16/float16 queries (the step's activations, read as they are): the CPU computes on the
    same values converted to float32, exactly, so the selections must match bit for bit."""
    require(cuda_backend, "page_select", dtype=query_dtype)
    seed = 730 + 2 * (query_dtype == "float16") + (page_score == "center")
    host = make_select_case(seed, KV_LENS, num_kv=2, group=4, head_dim=128)
    host = chunked(host, seed, [1 + s % 4 for s in range(len(KV_LENS))])
    for num_select in (2, 17, 80):
        for keep_first in (True, False):
            check_select(cuda_backend, cpu_backend, host, num_select, keep_first, page_score, "low-precision query",
                         seed, strided_query=num_select == 17, query_dtype=query_dtype)


def test_page_select_invalid_fresh_rows_in_store(cuda_backend, cpu_backend):
    """Rows the CPU rejects, in the store: a fresh sequence without a query row (empty chunk) gets -1
    in its slot row and nothing else; a fresh sequence naming a slot outside the store writes nothing;
    a dense sequence with inconsistent lengths is not checked and its row keeps the sentinel."""
    if STANDIN:
        pytest.skip("the CPU stand-in raises instead of writing -1")
    seed = 740
    host = make_select_case(seed, [640, 640, 640, 640, 640], num_kv=2, group=2, head_dim=64)
    host = chunked(host, seed, [1, 0, 2, 1, 3])
    host["kv_lens"][2] = 641                                # more tokens than its pages hold
    host["select_mode"] = np.array([1, 1, 0, 1, 1], np.int32)
    host["select_slot"] = np.array([5, 2, 0, 7, 3], np.int32)  # slot 7 is outside the 7 slots
    store = sentinel_store(seed, 7, 2, 6)
    actual = run_select(cuda_backend, host, 6, True, "bound", on_device=True, store=store)
    accepted = dict(host, select_mode=np.array([1, 0, 0, 0, 1], np.int32))
    expected = run_select(cpu_backend, accepted, 6, True, "bound", on_device=False, store=store)
    expected[1][2] = -1
    assert_exact(actual[1], expected[1], "invalid fresh rows in the store: num_selected", seed)
    assert_exact(actual[0], expected[0], "invalid fresh rows in the store: selected", seed)
    for mode in ([0, 1, 0, 0, 0], [0, 0, 0, 1, 0]):
        with pytest.raises(ValueError):
            run_select(cpu_backend, dict(host, select_mode=np.array(mode, np.int32)), 6, True, "bound",
                       on_device=False, store=store)


# ---- page_stats_append ------------------------------------------------------------------------

def make_stats_case(seed: int, num_kv: int, head_dim: int, page_size: int, logical: int, num_pages: int):
    """Slots mixing prefill runs (resets), decode tokens mid-page, skipped tokens (-1), tokens of one
    logical page far apart in the batch and one slot written twice; keys with NaN, +0 and -0."""
    rng = np.random.default_rng(seed)
    slots = []
    for page in rng.choice(num_pages, 6, replace=False):  # prefill runs from a page's start
        slots += list(page * page_size + np.arange(int(rng.integers(1, 3 * page_size // 2))))
    slots = [s for s in slots if s < num_pages * page_size]
    for _ in range(40):  # decode tokens anywhere
        slots.append(int(rng.integers(0, num_pages * page_size)))
    slots += [-1, -5]
    order = rng.permutation(len(slots))  # half shuffled, half in order (runs stay partly contiguous)
    slots = list(np.asarray(slots)[np.concatenate([order[:len(order) // 2], np.sort(order[len(order) // 2:])])])
    base = int(rng.integers(0, num_pages)) * page_size
    slots += [base + 3, base + logical + 1, base + 1, base, base + 2, base + 3]  # a reset inside, a slot twice
    slots = np.asarray(slots, np.int64)
    keys = rng.standard_normal((slots.size, num_kv, head_dim)).astype(np.float32)
    keys[rng.integers(0, slots.size, 10), rng.integers(0, num_kv, 10), rng.integers(0, head_dim, 10)] = np.nan
    keys[rng.integers(0, slots.size, 30), rng.integers(0, num_kv, 30), rng.integers(0, head_dim, 30)] = 0.0
    keys[rng.integers(0, slots.size, 30), rng.integers(0, num_kv, 30), rng.integers(0, head_dim, 30)] = -0.0
    shape = (num_pages, page_size // logical, num_kv, head_dim)
    kmax = np.round(rng.standard_normal(shape)).astype(np.float32)  # stale rows, zeros of both signs
    kmin = -np.abs(kmax)
    kmax[0, 0, 0, :4] = np.nan
    return keys, slots, kmax, kmin


def run_stats(backend, keys, slots, kmax, kmin, page_size: int, on_device: bool, strided_keys: bool = False):
    """keys: a float32 numpy array, or a CPU torch tensor (bfloat16/float16: numpy has none) whose bits
    the device gets as they are."""
    if not on_device:
        kmax, kmin = kmax.copy(), kmin.copy()
        backend.page_stats_append(keys, slots, kmax, kmin, page_size)
        return kmax, kmin
    key_t = torch.as_tensor(keys).to(DEVICE)
    if strided_keys:  # rows inside a wider buffer
        wide = torch.full((keys.shape[0], keys.shape[1] + 2, keys.shape[2]), float("nan"), device=DEVICE,
                          dtype=key_t.dtype)
        wide[:, 1:1 + keys.shape[1]] = key_t
        key_t = wide[:, 1:1 + keys.shape[1]]
    kmax_t, kmin_t = on_gpu(kmax), on_gpu(kmin)
    backend.page_stats_append(key_t, ints(slots), kmax_t, kmin_t, page_size)
    return kmax_t.cpu().numpy(), kmin_t.cpu().numpy()


def low_precision(array: np.ndarray, dtype: str, seed: int, num_payload_nans: int = 0) -> "torch.Tensor":
    """A CPU tensor of `array` rounded to dtype, plus NaNs with a sign and a payload (which the float32
    statistics must keep bit for bit, as the CPU's conversion does)."""
    tensor = on_host(array, dtype)
    if num_payload_nans:
        bits = {"bfloat16": [0xFFC1, 0x7F81, 0xFFFF], "float16": [0xFE01, 0x7C01, 0xFFFF]}[dtype]
        bits = np.array(bits, np.uint16).view(np.int16)
        rng = np.random.default_rng(seed + 3)
        flat = tensor.view(torch.int16).view(-1)
        for n, i in enumerate(rng.choice(flat.numel(), num_payload_nans, replace=False)):
            flat[int(i)] = int(bits[n % len(bits)])
    return tensor


def assert_same_bits(actual, expected, what: str, seed) -> None:
    """Bitwise: NaN equals NaN, -0 differs from +0."""
    assert_exact(np.ascontiguousarray(actual).view(np.uint32), np.ascontiguousarray(expected).view(np.uint32),
                 what, seed)


@pytest.mark.parametrize("page_size, logical, head_dim", [(64, 16, 128), (16, 16, 64), (32, 4, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_page_stats_append_matches_cpu(cuda_backend, cpu_backend, page_size, logical, head_dim, seed):
    require(cuda_backend, "page_stats_append", head_dim=head_dim)
    keys, slots, kmax, kmin = make_stats_case(seed, 3, head_dim, page_size, logical, num_pages=12)
    expected = run_stats(cpu_backend, keys, slots, kmax, kmin, page_size, on_device=False)
    actual = run_stats(cuda_backend, keys, slots, kmax, kmin, page_size, on_device=True, strided_keys=seed == 1)
    what = f"page_stats_append pages {page_size}/{logical} head_dim {head_dim}"
    assert_same_bits(actual[0], expected[0], f"{what}: kmax", seed)
    assert_same_bits(actual[1], expected[1], f"{what}: kmin", seed)


@pytest.mark.parametrize("key_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("strided", [False, True])
def test_page_stats_append_low_precision_keys(cuda_backend, cpu_backend, key_dtype, strided):
    """bfloat16/float16 keys (the activations after RoPE): float32 statistics of the same values, bit
    for bit (NaN with its sign and payload, +0 and -0 survive the conversion)."""
    require(cuda_backend, "page_stats_append", dtype=key_dtype)
    seed = 20 + 2 * (key_dtype == "float16") + int(strided)
    keys, slots, kmax, kmin = make_stats_case(seed, 3, 64, 32, 8, num_pages=12)
    keys = low_precision(keys, key_dtype, seed, num_payload_nans=12)
    expected = run_stats(cpu_backend, keys, slots, kmax, kmin, 32, on_device=False)
    actual = run_stats(cuda_backend, keys, slots, kmax, kmin, 32, on_device=True, strided_keys=strided)
    what = f"page_stats_append {key_dtype} keys"
    assert_same_bits(actual[0], expected[0], f"{what}: kmax", seed)
    assert_same_bits(actual[1], expected[1], f"{what}: kmin", seed)


def test_page_stats_append_long_prefill(cuda_backend, cpu_backend):
    """A long prefill chunk of several sequences (some continuing a partial logical page), then decode."""
    seed = 7
    rng = np.random.default_rng(seed)
    page_size, logical, num_kv, head_dim, num_pages = 64, 16, 2, 64, 400
    pages = rng.permutation(num_pages)
    slots = np.concatenate([pages[0] * page_size + np.arange(5, 64),  # continues a partial page
                            (pages[1:40, None] * page_size + np.arange(page_size)).ravel(),
                            pages[40] * page_size + np.arange(23)]).astype(np.int64)
    keys = rng.standard_normal((slots.size, num_kv, head_dim)).astype(np.float32)
    kmax = rng.standard_normal((num_pages, page_size // logical, num_kv, head_dim)).astype(np.float32)
    kmin = kmax - 1.0
    expected = run_stats(cpu_backend, keys, slots, kmax, kmin, page_size, on_device=False)
    actual = run_stats(cuda_backend, keys, slots, kmax, kmin, page_size, on_device=True)
    assert_same_bits(actual[0], expected[0], "long prefill: kmax", seed)
    assert_same_bits(actual[1], expected[1], "long prefill: kmin", seed)


def test_page_stats_append_skips_slots_beyond_the_pages(cuda_backend, cpu_backend):
    """The CPU raises on a slot beyond the pages; CUDA (no sync to raise) skips it and nothing else."""
    if STANDIN:
        pytest.skip("the CPU stand-in raises")
    seed = 8
    keys, slots, kmax, kmin = make_stats_case(seed, 2, 64, 64, 16, num_pages=6)
    bad = slots.copy()
    bad[[3, 10]] = [6 * 64, 10**12]
    actual = run_stats(cuda_backend, keys, bad, kmax, kmin, 64, on_device=True)
    skipped = bad.copy()
    skipped[[3, 10]] = -1
    expected = run_stats(cpu_backend, keys, skipped, kmax, kmin, 64, on_device=False)
    assert_same_bits(actual[0], expected[0], "slots beyond the pages: kmax", seed)
    assert_same_bits(actual[1], expected[1], "slots beyond the pages: kmin", seed)
    with pytest.raises(ValueError, match="beyond"):
        run_stats(cpu_backend, keys, bad, kmax, kmin, 64, on_device=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_then_select_on_device(cuda_backend, cpu_backend, dtype):
    """The decode path: statistics built by page_stats_append on each backend from keys in the activation
    dtype, then page_select on a query chunk of that dtype."""
    seed = 9
    rng = np.random.default_rng(seed)
    page_size, logical, num_kv, group, head_dim = 64, 16, 2, 4, 128
    kv_lens = [3000, 64 * 20 + 1, 17]
    counts = [-(-n // page_size) for n in kv_lens]
    pages = rng.permutation(sum(counts) + 3)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    positions = [np.arange(kv_len) for kv_len in kv_lens]
    slots = np.concatenate([pages[indptr[s] + t // page_size] * page_size + t % page_size
                            for s, t in enumerate(positions)]).astype(np.int64)
    keys = rng.standard_normal((slots.size, num_kv, head_dim)).astype(np.float32)
    shape = (pages.size, page_size // logical, num_kv, head_dim)
    kmax, kmin = np.full(shape, 9.0, np.float32), np.full(shape, -9.0, np.float32)
    query = rng.standard_normal((len(kv_lens), num_kv * group, head_dim)).astype(np.float32)
    keys = keys if dtype == "float32" else low_precision(keys, dtype, seed)
    ref_max, ref_min = run_stats(cpu_backend, keys, slots, kmax, kmin, page_size, on_device=False)
    dev_max, dev_min = on_gpu(kmax), on_gpu(kmin)
    cuda_backend.page_stats_append(torch.as_tensor(keys).to(DEVICE), ints(slots), dev_max, dev_min, page_size)
    host = chunked(dict(query=query, kmax=ref_max, kmin=ref_min, kv_page_indptr=indptr,
                        kv_page_indices=pages[:indptr[-1]].astype(np.int32), kv_lens=np.asarray(kv_lens, np.int32),
                        physical_page_size=page_size), seed, [1, 4, 2])
    expected = run_select(cpu_backend, host, 8, True, "bound", on_device=False, query_dtype=dtype)
    selected = torch.full((len(kv_lens), num_kv, 8), POISON, dtype=torch.int32, device=DEVICE)
    num_selected = torch.full((len(kv_lens), num_kv), POISON, dtype=torch.int32, device=DEVICE)
    query_t = torch.as_tensor(host["query"] if dtype == "float32" else on_host(host["query"], dtype)).to(DEVICE)
    cuda_backend.page_select(query_t, dev_max, dev_min, ints(indptr),
                             ints(host["kv_page_indices"]), ints(host["kv_lens"]), selected, num_selected, page_size,
                             True, "bound", qo_indptr=ints(host["qo_indptr"]))
    assert_exact(selected.cpu().numpy(), expected[0], f"stats then select ({dtype}): selected", seed)
    assert_exact(num_selected.cpu().numpy(), expected[1], f"stats then select ({dtype}): num_selected", seed)
