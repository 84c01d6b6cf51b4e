"""page_select and page_stats_append on CUDA against the CPU reference on the same Args
(ops/page_select.h). Exact: the kernels sum the page scores in the CPU's order with IEEE-rounded
steps, so the selections (ties included) and the kmax/kmin bits must be identical. Outputs start
poisoned on both backends, so an entry only one of them writes shows up.
(The basename differs from tests/sparse/test_page_select.py: pytest's default import mode needs unique ones.)"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_testing import DEVICE, STANDIN, ints, on_gpu, torch
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
               strided_query: bool = False) -> tuple:
    num_seqs, num_kv = host["query"].shape[0], host["kmax"].shape[2]
    args = {}
    for key, value in host.items():
        if key == "physical_page_size" or not on_device:
            args[key] = value.copy() if isinstance(value, np.ndarray) else value
        else:
            args[key] = on_gpu(value) if value.dtype == np.float32 else ints(value)
    if strided_query and on_device:  # rows inside a wider buffer, at an odd offset: the scalar-load kernel
        num_qo, head_dim = host["query"].shape[1:]
        wide = torch.full((num_seqs, num_qo * head_dim + 3), float("nan"), device=DEVICE)
        wide[:, 1:1 + num_qo * head_dim] = args["query"].reshape(num_seqs, -1)
        args["query"] = wide[:, 1:1 + num_qo * head_dim].view(num_seqs, num_qo, head_dim)
    if on_device:
        selected = torch.full((num_seqs, num_kv, num_select), POISON, dtype=torch.int32, device=DEVICE)
        num_selected = torch.full((num_seqs, num_kv), POISON, dtype=torch.int32, device=DEVICE)
    else:
        selected = np.full((num_seqs, num_kv, num_select), POISON, np.int32)
        num_selected = np.full((num_seqs, num_kv), POISON, np.int32)
    backend.page_select(selected=selected, num_selected=num_selected, keep_first_page=keep_first_page,
                        page_score=page_score, **args)
    if on_device:
        return selected.cpu().numpy(), num_selected.cpu().numpy()
    return selected, num_selected


def check_select(cuda_backend, cpu_backend, host: dict, num_select: int, keep_first_page: bool, page_score: str,
                 what: str, seed, strided_query: bool = False) -> None:
    expected = run_select(cpu_backend, host, num_select, keep_first_page, page_score, on_device=False)
    actual = run_select(cuda_backend, host, num_select, keep_first_page, page_score, on_device=True,
                        strided_query=strided_query)
    what = f"{what} num_select={num_select} keep_first={keep_first_page} {page_score}"
    assert not (actual[1] == POISON).any(), f"{what}: num_selected unwritten at {np.argwhere(actual[1] == POISON)[:5]}"
    assert_exact(actual[1], expected[1], f"{what}: num_selected", seed)
    assert_exact(actual[0], expected[0], f"{what}: selected", seed)


# Lengths: 1 token, exact pages, one past, a partial last page, num_pages around num_select.
KV_LENS = [1, 64, 65, 127, 130, 640, 1000, 1153, 4095, 4096, 4097, 9000]


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page_score", ["bound", "center"])
def test_page_select_matches_cpu(cuda_backend, cpu_backend, group, head_dim, page_score):
    seed = 10 * group + head_dim + (1 if page_score == "center" else 0)
    host = make_select_case(seed, KV_LENS, num_kv=2, group=group, head_dim=head_dim)
    for num_select in (2, 3, 17, 80):  # up to more than half of the longest sequence's 141 pages
        for keep_first in (True, False):
            check_select(cuda_backend, cpu_backend, host, num_select, keep_first, page_score,
                         f"group {group} head_dim {head_dim}", seed, strided_query=num_select == 17)


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
        for page_score in ("bound", "center"):
            check_select(cuda_backend, cpu_backend, host, num_select, True, page_score, "special values", seed)


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
    if not on_device:
        kmax, kmin = kmax.copy(), kmin.copy()
        backend.page_stats_append(keys, slots, kmax, kmin, page_size)
        return kmax, kmin
    key_t = on_gpu(keys)
    if strided_keys:  # rows inside a wider buffer
        wide = torch.full((keys.shape[0], keys.shape[1] + 2, keys.shape[2]), float("nan"), device=DEVICE)
        wide[:, 1:1 + keys.shape[1]] = key_t
        key_t = wide[:, 1:1 + keys.shape[1]]
    kmax_t, kmin_t = on_gpu(kmax), on_gpu(kmin)
    backend.page_stats_append(key_t, ints(slots), kmax_t, kmin_t, page_size)
    return kmax_t.cpu().numpy(), kmin_t.cpu().numpy()


def assert_same_bits(actual, expected, what: str, seed) -> None:
    """Bitwise: NaN equals NaN, -0 differs from +0."""
    assert_exact(np.ascontiguousarray(actual).view(np.uint32), np.ascontiguousarray(expected).view(np.uint32),
                 what, seed)


@pytest.mark.parametrize("page_size, logical, head_dim", [(64, 16, 128), (16, 16, 64), (32, 4, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_page_stats_append_matches_cpu(cuda_backend, cpu_backend, page_size, logical, head_dim, seed):
    keys, slots, kmax, kmin = make_stats_case(seed, 3, head_dim, page_size, logical, num_pages=12)
    expected = run_stats(cpu_backend, keys, slots, kmax, kmin, page_size, on_device=False)
    actual = run_stats(cuda_backend, keys, slots, kmax, kmin, page_size, on_device=True, strided_keys=seed == 1)
    what = f"page_stats_append pages {page_size}/{logical} head_dim {head_dim}"
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


def test_stats_then_select_on_device(cuda_backend, cpu_backend):
    """The decode path: statistics built by page_stats_append on each backend, then page_select."""
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
    ref_max, ref_min = run_stats(cpu_backend, keys, slots, kmax, kmin, page_size, on_device=False)
    dev_max, dev_min = on_gpu(kmax), on_gpu(kmin)
    cuda_backend.page_stats_append(on_gpu(keys), ints(slots), dev_max, dev_min, page_size)
    host = dict(query=query, kmax=ref_max, kmin=ref_min, kv_page_indptr=indptr,
                kv_page_indices=pages[:indptr[-1]].astype(np.int32), kv_lens=np.asarray(kv_lens, np.int32),
                physical_page_size=page_size)
    expected = run_select(cpu_backend, host, 8, True, "bound", on_device=False)
    selected = torch.full((len(kv_lens), num_kv, 8), POISON, dtype=torch.int32, device=DEVICE)
    num_selected = torch.full((len(kv_lens), num_kv), POISON, dtype=torch.int32, device=DEVICE)
    cuda_backend.page_select(on_gpu(query), dev_max, dev_min, ints(indptr), ints(host["kv_page_indices"]),
                             ints(host["kv_lens"]), selected, num_selected, page_size, True, "bound")
    assert_exact(selected.cpu().numpy(), expected[0], "stats then select: selected", seed)
    assert_exact(num_selected.cpu().numpy(), expected[1], "stats then select: num_selected", seed)
