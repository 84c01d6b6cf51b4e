"""Prefix caching in KvCacheManager (cpp/src/kv/page_pool.cpp) against a Python model of ownership
and page contents.

A hypothesis state machine admits sequences whose prompts share random prefixes, computes their
tokens chunk by chunk (naming full pages), releases them (finish, abort or preemption), squeezes
the pool so that cached pages must be evicted, and resets the cache. After every step: reference
counts equal owner counts, no page is owned twice by one sequence, the free count is exactly the
unowned pages, a cached page is evicted only when nobody owns it, a hit maps pages whose contents
(the tokens that wrote them) are the request's own, and when every sequence has ended the pool is
empty but for its cache (and empty after reset_prefix_cache).
"""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lserve import _C

# A few shared stems so that prompts really share prefixes (page_size up to 4, stems of 0-12 tokens).
STEMS = [[], [5, 6, 7, 8], [5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1, 2, 3]]


class PrefixCacheMachine(RuleBasedStateMachine):
    @initialize(num_pages=st.integers(min_value=2, max_value=24), page_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_pages: int, page_size: int) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        self.kv = _C.KvCacheManager(num_pages, page_size, enable_prefix_caching=True, prefix_cache_salt=7)
        self.tokens: dict[int, list[int]] = {}     # live sequence -> its tokens
        self.computed: dict[int, int] = {}         # live sequence -> tokens whose K/V are written
        self.content: dict[int, tuple] = {}        # page -> the tokens (with position) written into it
        self.next_id = 0

    # ---- model helpers ----------------------------------------------------------------------
    def owners(self) -> list[int]:
        counts = [0] * self.num_pages
        for seq in self.tokens:
            for page in self.kv.pages(seq):
                counts[page] += 1
        return counts

    def page_key(self, tokens: list[int], page: int) -> tuple:
        # What a page's K/V depend on: every token up to its end (the causal prefix).
        return tuple(tokens[: (page + 1) * self.page_size])

    # ---- rules ------------------------------------------------------------------------------
    @rule(stem=st.sampled_from(STEMS), tail=st.lists(st.integers(0, 3), max_size=9))
    def admit(self, stem, tail) -> None:
        tokens = list(stem) + list(tail)
        if not tokens:
            tokens = [0]
        seq = self.next_id
        self.next_id += 1
        owners_before = self.owners()
        matched = self.kv.match_prefix(seq, tokens, len(tokens) - 1)
        assert matched % self.page_size == 0 and 0 <= matched <= len(tokens) - 1
        pages = self.kv.pages(seq)
        assert len(pages) == matched // self.page_size
        for index, page in enumerate(pages):
            # A hit is a page holding exactly this prefix's K/V.
            assert self.content.get(page) == self.page_key(tokens, index), (page, index, tokens)
        if not self.kv.reserve(seq, len(tokens)):
            self.kv.release(seq)  # give the hit back; the request waits
            assert self.owners() == owners_before
            return
        new_pages = self.kv.pages(seq)[len(pages):]
        for page in new_pages:
            assert owners_before[page] == 0, f"page {page} handed out while owned"
            self.content.pop(page, None)  # evicted or fresh: its old contents are gone
        self.tokens[seq] = tokens
        self.computed[seq] = matched

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def compute(self, data) -> None:
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[seq]
        start = self.computed[seq]
        if start >= len(tokens):
            return
        end = data.draw(st.integers(start + 1, len(tokens)))
        pages = self.kv.pages(seq)
        for position in range(start, end):
            page = pages[position // self.page_size]
            if position % self.page_size == self.page_size - 1 or position == end - 1:
                # The page now holds the prefix up to its last written token; shared pages are
                # full pages below start, so this page is the sequence's own.
                self.content[page] = tuple(tokens[: position + 1])
        self.computed[seq] = end
        self.kv.cache_full_pages(seq, tokens, end)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def release(self, data) -> None:  # finish, abort or preemption: the same to the cache
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.release(seq)
        del self.tokens[seq], self.computed[seq]

    @rule()
    def squeeze(self) -> None:
        """Takes every free page (evicting cached ones), then gives them back uncached."""
        hog = -1 - self.next_id
        self.next_id += 1
        free = self.kv.num_free_pages()
        owners_before = self.owners()
        assert self.kv.reserve(hog, free * self.page_size)
        for page in self.kv.pages(hog):
            assert owners_before[page] == 0, f"page {page} evicted while owned"
            self.content.pop(page, None)
        assert self.kv.num_free_pages() == 0
        self.kv.release(hog)

    @rule()
    def reset(self) -> None:
        self.kv.reset_prefix_cache()
        assert self.kv.pool().num_cached() == 0

    # ---- invariants -------------------------------------------------------------------------
    @invariant()
    def ownership(self) -> None:
        if not hasattr(self, "kv"):
            return
        owners = self.owners()
        pool = self.kv.pool()
        for page in range(self.num_pages):
            assert pool.refcount(page) == owners[page], (page, pool.refcount(page), owners[page])
        for seq in self.tokens:
            pages = self.kv.pages(seq)
            assert len(set(pages)) == len(pages), f"sequence {seq} owns a page twice"
        unowned = sum(1 for count in owners if count == 0)
        assert self.kv.num_free_pages() == unowned
        evictable = sum(1 for page in range(self.num_pages) if owners[page] == 0 and pool.is_cached(page))
        assert pool.num_evictable() == evictable

    @invariant()
    def empty_plus_cache(self) -> None:
        if not hasattr(self, "kv") or self.tokens:
            return
        assert self.kv.num_free_pages() == self.num_pages
        assert self.kv.pool().num_evictable() == self.kv.pool().num_cached()


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_hit_miss_and_eviction_order():
    kv = _C.KvCacheManager(4, 2, enable_prefix_caching=True)
    prompt = [1, 2, 3, 4, 5]
    assert kv.match_prefix(0, prompt, 4) == 0 and not kv.has(0)
    assert kv.reserve(0, 5)
    kv.cache_full_pages(0, prompt, 5)  # pages of [1, 2] and [3, 4]; [5] is partial
    assert kv.pool().num_cached() == 2
    kv.release(0)
    assert kv.num_free_pages() == 4 and kv.pool().num_evictable() == 2
    # The same prompt finds both full pages; a different second page finds only the first.
    assert kv.match_prefix(1, prompt, 4) == 4
    assert kv.match_prefix(2, [1, 2, 9, 9, 9], 4) == 2
    assert kv.pages(2)[0] == kv.pages(1)[0] and kv.pool().refcount(kv.pages(1)[0]) == 2
    kv.release(1)
    kv.release(2)
    # Capped by max_tokens: a 4-token prompt may take only 1 full page of 2 (its last token is computed).
    assert kv.match_prefix(3, [1, 2, 3, 4], 3) == 2
    kv.release(3)
    # Uncached free pages go first; cached ones only when nothing else is left, least recent first.
    assert kv.reserve(4, 4)
    assert kv.pool().num_cached() == 2
    assert kv.reserve(5, 2)
    assert kv.pool().num_cached() == 1 and kv.pool().num_evictions() == 1
    kv.release(4)
    kv.release(5)
    kv.reset_prefix_cache()
    assert kv.pool().num_cached() == 0 and kv.match_prefix(6, prompt, 4) == 0


def test_salt_and_position_separate_pages():
    """The same tokens under another salt, or at another depth, are different pages."""
    kv = _C.KvCacheManager(8, 2, enable_prefix_caching=True, prefix_cache_salt=1)
    assert kv.reserve(0, 4)
    kv.cache_full_pages(0, [7, 7, 7, 7], 4)
    assert kv.match_prefix(1, [7, 7, 7, 7, 7, 7, 1], 6) == 4  # the third page [7, 7] sits deeper: a miss
    other = _C.KvCacheManager(8, 2, enable_prefix_caching=True, prefix_cache_salt=2)
    assert other.reserve(0, 4)
    other.cache_full_pages(0, [7, 7, 7, 7], 4)
    assert other.match_prefix(1, [7, 7, 7, 7, 1], 4) == 4
    off = _C.KvCacheManager(8, 2)
    assert off.reserve(0, 4)
    off.cache_full_pages(0, [7, 7, 7, 7], 4)
    assert off.match_prefix(1, [7, 7, 7, 7, 1], 4) == 0 and off.pool().num_cached() == 0


def test_match_on_existing_sequence_is_an_error():
    kv = _C.KvCacheManager(4, 2, enable_prefix_caching=True)
    assert kv.reserve(0, 2)
    with pytest.raises(ValueError, match="already holds pages"):
        kv.match_prefix(0, [1, 2, 3], 2)
