"""Hierarchical page selection and page statistics against an independent numpy formula: the
selected set exactly, for awkward lengths, GQA ratios 1/4/8, partial last pages, forced pages."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from lserve_testing import assert_close_fp32, assert_exact

_C = pytest.importorskip("lserve._C")
CPU = _C.Backend("cpu", 1)


def numpy_stats(keys_by_page, logical_page_size):
    """keys_by_page: (num_pages, page_size, H, D) with NaN for unwritten slots -> kmax, kmin."""
    num_pages, page_size, num_heads, head_dim = keys_by_page.shape
    grouped = keys_by_page.reshape(num_pages, page_size // logical_page_size, logical_page_size, num_heads, head_dim)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # never-written logical pages are all NaN
        return np.nanmax(grouped, axis=2), np.nanmin(grouped, axis=2)


def numpy_select(query, kmax, kmin, pages, kv_len, page_size, logical, num_select, keep_first, page_score="bound",
                 group_score="sum", spread=0.0, keep_last=1):
    """The rule of ops/page_select.h in float64: logical scores per query head ("blend": the centre
    plus spread x |q| (kmax - kmin) / 2); "sum" adds the heads' scores before the max over logical
    pages, "max" takes the best head's page score, "mass" sums each head's softmax over pages (scale
    1/sqrt(head_dim)). The keep_last newest pages and (keep_first) page 0 are always kept;
    num_select is one count for every KV head or a list of per-head counts."""
    num_qo, head_dim = query.shape
    num_kv = kmax.shape[2]
    group = num_qo // num_kv
    num_pages = len(pages)
    result = []
    for h in range(num_kv):
        head_select = num_select[h] if isinstance(num_select, (list, tuple)) else num_select
        if num_pages <= head_select:
            result.append(list(range(num_pages)))
            continue
        q = query[h * group:(h + 1) * group]  # (group, D)
        head_scores = []  # per page: (group,) each head's max over its logical pages
        scores = []
        for position, page in enumerate(pages):
            n_tokens = min(page_size, kv_len - position * page_size)
            n_logical = -(-n_tokens // logical)
            high, low = kmax[page, :n_logical, h][None].astype(np.float64), kmin[page, :n_logical, h][None]
            if page_score == "center":
                s = q[:, None, :] * ((high + low) / 2)
            elif page_score == "blend":
                s = q[:, None, :] * ((high + low) / 2) + spread * (np.abs(q[:, None, :]) * ((high - low) / 2))
            else:
                s = np.maximum(q[:, None, :] * kmax[page, :n_logical, h][None],
                               q[:, None, :] * kmin[page, :n_logical, h][None])
            scores.append(s.sum(axis=(0, 2)).max())
            head_scores.append(s.sum(axis=2).max(axis=1))
        head_scores = np.asarray(head_scores, dtype=np.float64).T  # (group, num_pages)
        if group_score == "max":
            scores = list(head_scores.max(axis=0))
        elif group_score == "mass":
            weights = np.exp((head_scores - head_scores.max(axis=1, keepdims=True)) / np.sqrt(head_dim))
            scores = list((weights / weights.sum(axis=1, keepdims=True)).sum(axis=0))
        forced = set(range(num_pages - keep_last, num_pages)) | ({0} if keep_first else set())
        rest = sorted((p for p in range(num_pages) if p not in forced), key=lambda p: (-scores[p], p))
        chosen = sorted(list(forced) + rest[:head_select - len(forced)])
        result.append(chosen)
    return result


def random_paged_keys(rng, kv_lens, num_kv, head_dim, page_size, pool):
    """Sequences of kv_lens random keys on shuffled pages of a pool: (pages per sequence, indptr,
    keys by page with NaN where unwritten, key rows, their slots)."""
    pages, indptr = [], [0]
    free = list(rng.permutation(pool))
    for kv_len in kv_lens:
        n = -(-kv_len // page_size)
        pages.append([int(free.pop()) for _ in range(n)])
        indptr.append(indptr[-1] + n)
    keys = np.full((pool, page_size, num_kv, head_dim), np.nan, dtype=np.float32)
    slots = []
    key_rows = []
    for seq_pages, kv_len in zip(pages, kv_lens):
        for t in range(kv_len):
            k = rng.standard_normal((num_kv, head_dim)).astype(np.float32)
            page, offset = seq_pages[t // page_size], t % page_size
            keys[page, offset] = k
            key_rows.append(k)
            slots.append(page * page_size + offset)
    return pages, indptr, keys, np.stack(key_rows), np.array(slots, dtype=np.int64)


@pytest.mark.parametrize("num_qo, num_kv", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_page_select_matches_numpy(num_qo, num_kv, seed):
    rng = np.random.default_rng(seed)
    page_size, logical, head_dim, pool = 64, 16, 32, 64
    kv_lens = [1, 64, 65, 127, 640, 1000, 1153]
    num_select = 4
    pages, indptr, keys, key_rows, slots = random_paged_keys(rng, kv_lens, num_kv, head_dim, page_size, pool)
    kmax = np.full((pool, page_size // logical, num_kv, head_dim), 7.0, dtype=np.float32)  # stale garbage
    kmin = np.full_like(kmax, -7.0)
    CPU.page_stats_append(key_rows, slots, kmax, kmin, page_size)
    ref_max, ref_min = numpy_stats(keys, logical)
    written = ~np.isnan(ref_max)
    assert_close_fp32(kmax[written], ref_max[written], what="kmax", seed=seed)
    assert_close_fp32(kmin[written], ref_min[written], what="kmin", seed=seed)

    query = rng.standard_normal((len(kv_lens), num_qo, head_dim)).astype(np.float32)
    rules = [(keep_first, page_score, group_score) for keep_first in (True, False)
             for page_score in ("bound", "center", "blend") for group_score in ("sum", "max", "mass")]
    spread = 0.25
    chosen_by = {}
    for keep_first, page_score, group_score in rules:
        selected = np.full((len(kv_lens), num_kv, num_select), -1, dtype=np.int32)
        num_selected = np.zeros((len(kv_lens), num_kv), dtype=np.int32)
        CPU.page_select(query, kmax, kmin, np.array(indptr, dtype=np.int32),
                        np.array(sum(pages, []), dtype=np.int32), np.array(kv_lens, dtype=np.int32),
                        selected, num_selected, page_size, keep_first, page_score, group_score, spread=spread)
        chosen_by[(keep_first, page_score, group_score)] = selected.copy()
        for s, (seq_pages, kv_len) in enumerate(zip(pages, kv_lens)):
            expected = numpy_select(query[s], kmax, kmin, seq_pages, kv_len, page_size, logical, num_select, keep_first,
                                    page_score, group_score, spread)
            for h in range(num_kv):
                got = selected[s, h, :num_selected[s, h]].tolist()
                assert_exact(got, expected[h], what=f"seq {s} (len {kv_len}) head {h} keep_first={keep_first} "
                                                   f"{page_score}/{group_score}",
                             seed=seed)
    for keep_first in (True, False):  # the blend is neither of the scores it mixes
        blend = chosen_by[(keep_first, "blend", "max")]
        assert not np.array_equal(blend, chosen_by[(keep_first, "center", "max")])
        assert not np.array_equal(blend, chosen_by[(keep_first, "bound", "max")])
    if num_qo > num_kv:  # the group rules are different rules: some selection tells them apart
        for keep_first in (True, False):
            sums = chosen_by[(keep_first, "center", "sum")]
            assert any(not np.array_equal(sums, chosen_by[(keep_first, "center", other)]) for other in ("max", "mass"))


@pytest.mark.parametrize("num_qo, num_kv", [(4, 4), (12, 4)])
@pytest.mark.parametrize("keep_first", [True, False])
def test_recent_pages_and_per_head_counts_match_numpy(num_qo, num_kv, keep_first):
    """keep_last_pages (the newest pages kept) and head_num_select (a count per KV head, within the
    store's width) against the numpy rule, for every sequence length around the counts."""
    rng = np.random.default_rng(7)
    page_size, logical, head_dim, pool = 16, 4, 16, 160
    kv_lens = [1, 16, 17, 80, 97, 200, 333, 640]
    pages, indptr, _, key_rows, slots = random_paged_keys(rng, kv_lens, num_kv, head_dim, page_size, pool)
    kmax = np.zeros((pool, page_size // logical, num_kv, head_dim), dtype=np.float32)
    kmin = np.zeros_like(kmax)
    CPU.page_stats_append(key_rows, slots, kmax, kmin, page_size)
    query = rng.standard_normal((len(kv_lens), num_qo, head_dim)).astype(np.float32)
    width = 9
    counts = [width, 6, 4, 7][:num_kv]
    indices = np.array(sum(pages, []), dtype=np.int32)
    chosen = {}
    for keep_last in (1, 3):
        for head_counts in (None, counts):
            selected = np.full((len(kv_lens), num_kv, width), -1, dtype=np.int32)
            num_selected = np.zeros((len(kv_lens), num_kv), dtype=np.int32)
            CPU.page_select(query, kmax, kmin, np.array(indptr, dtype=np.int32), indices,
                            np.array(kv_lens, dtype=np.int32), selected, num_selected, page_size, keep_first, "blend",
                            "max", spread=0.25, keep_last_pages=keep_last,
                            head_num_select=None if head_counts is None else np.array(head_counts, dtype=np.int32))
            chosen[(keep_last, head_counts is None)] = selected.copy()
            for s, (seq_pages, kv_len) in enumerate(zip(pages, kv_lens)):
                expected = numpy_select(query[s], kmax, kmin, seq_pages, kv_len, page_size, logical,
                                        width if head_counts is None else head_counts, keep_first, "blend", "max",
                                        0.25, keep_last=keep_last)
                for h in range(num_kv):
                    got = selected[s, h, :num_selected[s, h]].tolist()
                    assert_exact(got, expected[h], what=f"seq {s} (len {kv_len}) head {h} keep_last={keep_last} "
                                                       f"counts={head_counts}", seed=7)
                    if len(seq_pages) > len(got):  # a real selection keeps the newest keep_last pages
                        assert got[-keep_last:] == list(range(len(seq_pages) - keep_last, len(seq_pages)))
    # Each knob changes some selection (else the test could not tell it was applied).
    assert not np.array_equal(chosen[(1, True)], chosen[(3, True)])
    assert not np.array_equal(chosen[(1, True)], chosen[(1, False)])


def test_recent_pages_and_per_head_counts_are_checked():
    q = np.zeros((1, 4, 8), dtype=np.float32)
    stats = np.zeros((4, 4, 2, 8), dtype=np.float32)
    args = (q, stats, stats, np.array([0, 4], np.int32), np.arange(4, dtype=np.int32), np.array([250], np.int32))
    with pytest.raises(ValueError, match="keep_last_pages must be >= 1"):
        CPU.page_select(*args, np.zeros((1, 2, 3), np.int32), np.zeros((1, 2), np.int32), 64, True, keep_last_pages=0)
    with pytest.raises(ValueError, match="num_select 3 must be >= 4"):
        CPU.page_select(*args, np.zeros((1, 2, 3), np.int32), np.zeros((1, 2), np.int32), 64, True, keep_last_pages=3)
    with pytest.raises(ValueError, match="head_num_select"):
        CPU.page_select(*args, np.zeros((1, 2, 3), np.int32), np.zeros((1, 2), np.int32), 64, True,
                        head_num_select=np.array([2, 2, 2], np.int32))
    for counts in ([1, 3], [2, 4]):
        with pytest.raises(ValueError, match=r"KV head \d selects \d pages, outside \[2, 3\]"):
            CPU.page_select(*args, np.zeros((1, 2, 3), np.int32), np.zeros((1, 2), np.int32), 64, True,
                            head_num_select=np.array(counts, np.int32))


def test_recycled_page_resets_statistics():
    page_size, logical, head_dim = 64, 16, 8
    kmax = np.zeros((2, 4, 1, head_dim), dtype=np.float32)
    kmin = np.zeros_like(kmax)
    big = np.full((64, 1, head_dim), 100.0, dtype=np.float32)
    CPU.page_stats_append(big, np.arange(64, dtype=np.int64) + 64, kmax, kmin, page_size)  # page 1, first owner
    small = np.full((20, 1, head_dim), -1.0, dtype=np.float32)
    CPU.page_stats_append(small, np.arange(20, dtype=np.int64) + 64, kmax, kmin, page_size)  # page 1 reused
    assert (kmax[1, 0] == -1.0).all() and (kmin[1, 0] == -1.0).all()
    assert (kmax[1, 1] == -1.0).all()  # tokens 16..19 reset logical page 1 too


def test_bad_arguments():
    q = np.zeros((1, 4, 8), dtype=np.float32)
    stats = np.zeros((2, 4, 2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="num_select"):
        CPU.page_select(q, stats, stats, np.array([0, 1], np.int32), np.array([0], np.int32), np.array([5], np.int32),
                        np.zeros((1, 2, 1), np.int32), np.zeros((1, 2), np.int32), 64, True)
    with pytest.raises(ValueError, match="holds"):
        CPU.page_select(q, stats, stats, np.array([0, 1], np.int32), np.array([0], np.int32), np.array([500], np.int32),
                        np.zeros((1, 2, 4), np.int32), np.zeros((1, 2), np.int32), 64, True)
    with pytest.raises(ValueError, match="multiple"):
        CPU.page_select(q, stats, stats, np.array([0, 1], np.int32), np.array([0], np.int32), np.array([5], np.int32),
                        np.zeros((1, 2, 4), np.int32), np.zeros((1, 2), np.int32), 66, True)
    with pytest.raises(ValueError, match="group_score must be 'sum', 'max' or 'mass'"):
        CPU.page_select(q, stats, stats, np.array([0, 1], np.int32), np.array([0], np.int32), np.array([5], np.int32),
                        np.zeros((1, 2, 4), np.int32), np.zeros((1, 2), np.int32), 64, True, "bound", "median")
    with pytest.raises(ValueError, match="page_score must be 'bound', 'center' or 'blend'"):
        CPU.page_select(q, stats, stats, np.array([0, 1], np.int32), np.array([0], np.int32), np.array([5], np.int32),
                        np.zeros((1, 2, 4), np.int32), np.zeros((1, 2), np.int32), 64, True, "median")
    for spread, pattern in ((1.5, "spread must be in"), (-0.25, "spread must be in"), (float("nan"), "spread must be in"),
                            ("big", "spread must be a real number")):
        with pytest.raises(ValueError, match=pattern):
            CPU.page_select(q, stats, stats, np.array([0, 1], np.int32), np.array([0], np.int32),
                            np.array([5], np.int32), np.zeros((1, 2, 4), np.int32), np.zeros((1, 2), np.int32), 64,
                            True, "blend", spread=spread)
