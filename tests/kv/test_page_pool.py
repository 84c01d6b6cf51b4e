"""PagePool and KvCacheManager (cpp/src/kv/page_pool.cpp) against a pure-Python ownership model.

A hypothesis state machine runs random reserve / append / fork / release / preempt sequences and
checks after every step: no page leaked or owned twice, refcounts equal owner counts, the free
list holds exactly the unowned pages, page counts are ceil(tokens / page_size), a failed reserve
changes nothing, and slots are right across page boundaries.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lserve import _C

SEQ_IDS = st.integers(min_value=0, max_value=5)


def boundary_positions(num_tokens: int, page_size: int) -> list[int]:
    """Positions around every page boundary below num_tokens: p*ps - 1, p*ps, p*ps + 1."""
    positions = set()
    for page in range(num_tokens // page_size + 1):
        for delta in (-1, 0, 1):
            position = page * page_size + delta
            if 0 <= position < num_tokens:
                positions.add(position)
    positions.add(num_tokens - 1)
    return sorted(p for p in positions if p >= 0)


class KvCacheMachine(RuleBasedStateMachine):
    """Model: seq_id -> (expected page list, reserved tokens). Pages are identified by what the
    manager returned; the model checks where they came from and who owns them."""

    @initialize(num_pages=st.integers(min_value=1, max_value=16), page_size=st.sampled_from([1, 2, 3, 4, 16]))
    def setup(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.kv = _C.KvCacheManager(num_pages, page_size)
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}

    # ---- model helpers ----------------------------------------------------------------------
    def owners(self) -> list[int]:
        counts = [0] * self.num_pages
        for table in self.tables.values():
            for page in table:
                counts[page] += 1
        return counts

    def free_pages(self) -> set[int]:
        return {page for page, count in enumerate(self.owners()) if count == 0}

    def expected_needed(self, seq_id: int, num_tokens: int) -> int:
        return max(0, math.ceil(num_tokens / self.page_size) - len(self.tables.get(seq_id, [])))

    def check_reserve(self, seq_id: int, num_tokens: int) -> None:
        needed = self.expected_needed(seq_id, num_tokens)
        assert self.kv.pages_needed(seq_id, num_tokens) == needed
        free_before = self.free_pages()
        old_table = list(self.tables.get(seq_id, []))
        existed = seq_id in self.tables
        ok = self.kv.reserve(seq_id, num_tokens)
        assert ok == (needed <= len(free_before)), (seq_id, num_tokens, needed, len(free_before))
        table = self.kv.pages(seq_id)
        if not ok:
            # Atomic failure: nothing changed, not even a table for a new sequence.
            assert self.kv.has(seq_id) == existed
            assert table == old_table
            return
        assert table[: len(old_table)] == old_table, "reserve must keep the pages a sequence holds"
        new_pages = table[len(old_table):]
        assert len(new_pages) == needed
        assert len(set(new_pages)) == needed and set(new_pages) <= free_before, (new_pages, free_before)
        self.tables[seq_id] = table
        self.tokens[seq_id] = max(self.tokens.get(seq_id, 0), num_tokens)

    # ---- rules --------------------------------------------------------------------------------
    @rule(seq_id=SEQ_IDS, num_tokens=st.integers(min_value=0, max_value=70))
    def reserve(self, seq_id: int, num_tokens: int) -> None:
        self.check_reserve(seq_id, num_tokens)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def append_token(self, data) -> None:
        """A decode step: one more token, crossing a page boundary every page_size steps."""
        seq_id = data.draw(st.sampled_from(sorted(self.tables)))
        self.check_reserve(seq_id, self.tokens[seq_id] + 1)

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), dst_seq_id=st.integers(min_value=0, max_value=7), extra=st.integers(0, 20))
    def fork(self, data, dst_seq_id: int, extra: int) -> None:
        src_seq_id = data.draw(st.sampled_from(sorted(self.tables)))
        capacity = len(self.tables[src_seq_id]) * self.page_size
        num_tokens = data.draw(st.integers(min_value=0, max_value=capacity + extra))
        num_shared = num_tokens // self.page_size
        if dst_seq_id in self.tables:
            with pytest.raises(ValueError, match="already exists"):
                self.kv.fork(src_seq_id, dst_seq_id, num_tokens)
        elif num_shared > len(self.tables[src_seq_id]):
            with pytest.raises(ValueError, match="fewer than"):
                self.kv.fork(src_seq_id, dst_seq_id, num_tokens)
            assert not self.kv.has(dst_seq_id)
        else:
            self.kv.fork(src_seq_id, dst_seq_id, num_tokens)
            assert self.kv.pages(dst_seq_id) == self.tables[src_seq_id][:num_shared]
            self.tables[dst_seq_id] = self.kv.pages(dst_seq_id)
            self.tokens[dst_seq_id] = num_shared * self.page_size

    @rule(seq_id=SEQ_IDS)
    def release(self, seq_id: int) -> None:
        self.kv.release(seq_id)  # no-op for an unknown sequence
        self.tables.pop(seq_id, None)
        self.tokens.pop(seq_id, None)
        assert not self.kv.has(seq_id)
        assert self.kv.pages(seq_id) == []

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def preempt(self, data) -> None:
        """Recompute-style preemption: release everything, later reserve the same length again."""
        seq_id = data.draw(st.sampled_from(sorted(self.tables)))
        num_tokens = self.tokens[seq_id]
        self.release(seq_id)
        self.check_reserve(seq_id, num_tokens)

    # ---- invariants ---------------------------------------------------------------------------
    @invariant()
    def ownership(self) -> None:
        owners = self.owners()
        pool = self.kv.pool()
        assert [pool.refcount(page) for page in range(self.num_pages)] == owners
        assert self.kv.num_free_pages() == owners.count(0) == pool.num_free()
        assert self.kv.num_total_pages() == self.num_pages
        # The free list holds exactly the unowned pages, each once: drain a copy of the pool.
        drained = [pool.allocate() for _ in range(pool.num_free())]
        assert sorted(drained) == sorted(self.free_pages()), (drained, owners)
        assert pool.allocate() == -1
        assert self.kv.num_free_pages() == owners.count(0), "pool() must be a copy"

    @invariant()
    def tables_match(self) -> None:
        assert self.kv.num_seqs() == len(self.tables)
        for seq_id, table in self.tables.items():
            assert self.kv.has(seq_id)
            assert self.kv.pages(seq_id) == table
            assert len(set(table)) == len(table), f"seq {seq_id} holds a page twice: {table}"
            assert len(table) >= math.ceil(self.tokens[seq_id] / self.page_size)
            assert self.kv.pages_needed(seq_id, self.tokens[seq_id]) == 0

    @invariant()
    def slots(self) -> None:
        ps = self.page_size
        for seq_id, table in self.tables.items():
            capacity = len(table) * ps
            for position in boundary_positions(capacity, ps):
                assert self.kv.slot(seq_id, position) == table[position // ps] * ps + position % ps
            with pytest.raises(ValueError, match="outside"):
                self.kv.slot(seq_id, capacity)


KvCacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                            derandomize=True)
TestKvCacheMachine = KvCacheMachine.TestCase


# ---- direct cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("pages_full", [0, 1, 3])
@pytest.mark.parametrize("remainder", ["zero", "one", "ps-1"])
def test_page_counts_and_slots_at_boundaries(page_size, pages_full, remainder):
    extra = {"zero": 0, "one": 1, "ps-1": page_size - 1}[remainder]
    num_tokens = pages_full * page_size + extra
    kv = _C.KvCacheManager(8, page_size)
    kv.reserve(7, 3)  # another sequence first, so seq 0's pages do not start at page 0
    assert kv.pages_needed(0, num_tokens) == math.ceil(num_tokens / page_size)
    assert kv.reserve(0, num_tokens)
    pages = kv.pages(0)
    assert len(pages) == math.ceil(num_tokens / page_size)
    slots = [kv.slot(0, position) for position in range(num_tokens)]
    expected = [pages[position // page_size] * page_size + position % page_size for position in range(num_tokens)]
    assert slots == expected
    assert len(set(slots) | {kv.slot(7, p) for p in range(3)}) == num_tokens + 3, "slots overlap"
    # Growing by one token needs a new page exactly when the last page is full.
    assert kv.pages_needed(0, num_tokens + 1) == (1 if num_tokens % page_size == 0 else 0)


def test_pool_basics():
    pool = _C.PagePool(3)
    assert (pool.num_pages(), pool.num_free()) == (3, 3)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.allocate() == -1
    pool.incref(1)
    assert pool.refcount(1) == 2
    pool.decref(1)
    assert pool.refcount(1) == 1 and pool.num_free() == 0
    pool.decref(2)
    pool.decref(0)
    assert pool.allocate() == 0, "LIFO: the page freed last is reused first"
    assert pool.allocate() == 2


def test_release_then_reserve_reuses_pages_in_order():
    kv = _C.KvCacheManager(6, 4)
    assert kv.reserve(1, 4) and kv.reserve(2, 12)
    pages = kv.pages(2)
    kv.release(2)
    assert kv.reserve(3, 12)
    assert kv.pages(3) == pages


def test_fork_shares_whole_pages_and_frees_on_last_owner():
    kv = _C.KvCacheManager(8, 4)
    assert kv.reserve(0, 10)  # 3 pages, the last one partly filled
    kv.fork(0, 1, 10)  # shares the 2 full pages only
    assert kv.pages(1) == kv.pages(0)[:2]
    assert [kv.pool().refcount(p) for p in kv.pages(0)] == [2, 2, 1]
    assert kv.reserve(1, 10)  # the fork's own third page
    assert kv.pages(1)[2] not in kv.pages(0)
    kv.release(0)
    assert kv.num_free_pages() == 8 - 3
    kv.release(1)
    assert kv.num_free_pages() == 8


def test_reserve_fails_atomically():
    kv = _C.KvCacheManager(4, 2)
    assert kv.reserve(0, 5)  # 3 pages
    assert not kv.reserve(1, 3)  # needs 2, 1 free
    assert not kv.has(1) and kv.num_free_pages() == 1
    assert not kv.reserve(0, 9)  # needs 2 more
    assert len(kv.pages(0)) == 3 and kv.num_free_pages() == 1
    assert kv.reserve(0, 8) and kv.num_free_pages() == 0
    assert kv.reserve(0, 3), "shrinking requests are satisfied without change"
    assert len(kv.pages(0)) == 4


def test_reserve_zero_tokens_creates_an_empty_table():
    kv = _C.KvCacheManager(2, 4)
    assert kv.reserve(5, 0)
    assert kv.has(5) and kv.pages(5) == [] and kv.num_seqs() == 1
    with pytest.raises(ValueError, match="outside"):
        kv.slot(5, 0)


def test_huge_token_count_fails_cleanly():
    kv = _C.KvCacheManager(4, 1)
    assert kv.pages_needed(0, 2**62) == 2**31 - 1
    assert not kv.reserve(0, 2**62)
    assert kv.num_free_pages() == 4


@pytest.mark.parametrize("call, match", [
    (lambda: _C.PagePool(0), "num_pages must be >= 1"),
    (lambda: _C.KvCacheManager(0, 16), "num_pages must be >= 1"),
    (lambda: _C.KvCacheManager(4, 0), "page_size must be >= 1"),
    (lambda: _C.KvCacheManager(4, -3), "page_size must be >= 1"),
])
def test_constructor_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pool_errors():
    pool = _C.PagePool(2)
    for page in (-1, 2):
        for method in (pool.refcount, pool.incref, pool.decref):
            with pytest.raises(ValueError, match="out of range"):
                method(page)
    with pytest.raises(ValueError, match="decref of free page 1"):
        pool.decref(1)
    with pytest.raises(ValueError, match="incref of free page 0"):
        pool.incref(0)
    page = pool.allocate()
    pool.decref(page)
    with pytest.raises(ValueError, match="decref of free page"):
        pool.decref(page)  # double free
    assert pool.num_free() == 2
    assert issubclass(_C.Error, ValueError)


def test_manager_errors():
    kv = _C.KvCacheManager(4, 4)
    assert kv.reserve(0, 8)
    assert kv.reserve(1, 4)
    with pytest.raises(ValueError, match="destination sequence 1 already exists"):
        kv.fork(0, 1, 4)
    with pytest.raises(ValueError, match="already exists"):
        kv.fork(0, 0, 4)
    with pytest.raises(ValueError, match="unknown source sequence 9"):
        kv.fork(9, 2, 0)
    with pytest.raises(ValueError, match="fewer than"):
        kv.fork(0, 2, 12)
    for call in (lambda: kv.reserve(0, -1), lambda: kv.pages_needed(0, -1), lambda: kv.fork(0, 3, -1)):
        with pytest.raises(ValueError, match="num_tokens must be >= 0"):
            call()
    with pytest.raises(ValueError, match="unknown sequence 9"):
        kv.slot(9, 0)
    with pytest.raises(ValueError, match="outside"):
        kv.slot(0, -1)
    # Nothing above changed the state.
    assert kv.num_seqs() == 2 and kv.num_free_pages() == 1
    assert not kv.has(2) and not kv.has(3)
    kv.release(42)  # unknown: no-op
    assert kv.pages(42) == []
