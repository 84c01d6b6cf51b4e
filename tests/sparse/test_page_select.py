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
                 group_score="sum", spread=0.0):
    """The rule of ops/page_select.h in float64: logical scores per query head ("blend": the centre
    plus spread x |q| (kmax - kmin) / 2); "sum" adds the heads' scores before the max over logical
    pages, "max" takes the best head's page score, "mass" sums each head's softmax over pages (scale
    1/sqrt(head_dim))."""
    num_qo, head_dim = query.shape
    num_kv = kmax.shape[2]
    group = num_qo // num_kv
    num_pages = len(pages)
    result = []
    for h in range(num_kv):
        if num_pages <= num_select:
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
        forced = {num_pages - 1} | ({0} if keep_first else set())
        rest = sorted((p for p in range(num_pages) if p not in forced), key=lambda p: (-scores[p], p))
        chosen = sorted(list(forced) + rest[:num_select - len(forced)])
        result.append(chosen)
    return result


@pytest.mark.parametrize("num_qo, num_kv", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_page_select_matches_numpy(num_qo, num_kv, seed):
    rng = np.random.default_rng(seed)
    page_size, logical, head_dim, pool = 64, 16, 32, 64
    kv_lens = [1, 64, 65, 127, 640, 1000, 1153]
    num_select = 4
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
    kmax = np.full((pool, page_size // logical, num_kv, head_dim), 7.0, dtype=np.float32)  # stale garbage
    kmin = np.full_like(kmax, -7.0)
    CPU.page_stats_append(np.stack(key_rows), np.array(slots, dtype=np.int64), kmax, kmin, page_size)
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
