"""Property test of recompute preemption: for random request mixes, KV pools between one sequence of
max_model_len and a little more, token budgets and batch sizes, every request finishes with exactly
the tokens (greedy or seeded sampling) that a roomy engine produces, and every page comes back.
tests/kv/test_page_pool.py checks the allocator itself; tests/engine/test_preemption.py a fixed case.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from lserve_testing import assert_exact
from tiny_models import TINY_COMMON, make_tiny_model

pytest.importorskip("torch")
from lserve import Engine, SamplingParams  # noqa: E402

MAX_MODEL_LEN = 48
PAGE_SIZES = (4, 8)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_preempt_property")
    make_tiny_model("llama", directory, seed=13)
    return directory


@pytest.fixture(scope="module")
def roomy(llama_dir):
    """Per page size (paged attention sums pages in order), an engine that never preempts."""
    return {page_size: Engine(str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_pages=1024, page_size=page_size,
                              show_progress=False) for page_size in PAGE_SIZES}


REQUEST = st.tuples(
    st.integers(min_value=1, max_value=MAX_MODEL_LEN - 1),  # prompt length
    st.integers(min_value=1, max_value=MAX_MODEL_LEN - 1),  # max_tokens (capped at max_model_len)
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**16)),  # None: greedy; else a sampling seed
    st.integers(min_value=0, max_value=2**16),  # prompt seed
)


def _params(max_tokens: int, seed) -> SamplingParams:
    if seed is None:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=1.0, top_k=50, max_tokens=max_tokens, ignore_eos=True, seed=seed)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(REQUEST, min_size=1, max_size=8), page_size=st.sampled_from(PAGE_SIZES),
       extra_pages=st.integers(min_value=0, max_value=4), budget=st.integers(min_value=1, max_value=40),
       max_num_seqs=st.integers(min_value=1, max_value=8))
def test_tight_pool_finishes_every_request_exactly(llama_dir, roomy, requests, page_size, extra_pages, budget,
                                                   max_num_seqs):
    vocab_size = TINY_COMMON["vocab_size"]
    prompts = [[int(t) for t in np.random.default_rng(prompt_seed).integers(3, vocab_size, size=length)]
               for length, _, _, prompt_seed in requests]
    params = [_params(max_tokens, seed) for _, max_tokens, seed, _ in requests]
    expected = [o.outputs[0].token_ids for o in roomy[page_size].generate(prompts, params, use_tqdm=False)]

    num_kv_pages = -(-MAX_MODEL_LEN // page_size) + extra_pages  # one full-length sequence and a few pages
    tight = Engine(str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_pages=num_kv_pages, page_size=page_size,
                   max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, show_progress=False)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.stats()
    event(f"preempted: {stats.num_preemptions > 0}")
    target(float(stats.num_preemptions))  # steers the search towards mixes that preempt
    setup = f"page_size={page_size} num_kv_pages={num_kv_pages} budget={budget} max_num_seqs={max_num_seqs}"
    for index, (out, ref) in enumerate(zip(outputs, expected)):
        completion = out.outputs[0]
        assert completion.finish_reason == "length", f"request {index}: {completion.finish_reason} ({setup})"
        assert_exact(completion.token_ids, ref, what=f"request {index} of {requests} ({setup}, "
                                                     f"{stats.num_preemptions} preemptions)")
    assert stats.num_free_pages == stats.num_total_pages == num_kv_pages, f"pages leaked ({setup})"
    assert stats.num_running == 0 and stats.num_waiting == 0


SHARED_REQUEST = st.tuples(
    st.integers(min_value=0, max_value=2),   # which shared stem the prompt starts with
    st.integers(min_value=1, max_value=12),  # tail length
    st.integers(min_value=1, max_value=16),  # max_tokens
    st.one_of(st.none(), st.integers(min_value=0, max_value=2**16)),  # None: greedy; else a sampling seed
    st.integers(min_value=1, max_value=2),   # n
    st.integers(min_value=0, max_value=2**16),  # tail seed
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(SHARED_REQUEST, min_size=1, max_size=7), page_size=st.sampled_from(PAGE_SIZES),
       extra_pages=st.integers(min_value=0, max_value=6), budget=st.integers(min_value=1, max_value=40),
       max_num_seqs=st.integers(min_value=1, max_value=8), abort_at=st.lists(st.integers(0, 30), max_size=3))
def test_prefix_cache_under_preemption_and_aborts(llama_dir, requests, page_size, extra_pages, budget, max_num_seqs,
                                                  abort_at):
    """Prompts sharing stems, n = 1 or 2, a tight pool with prefix caching, and aborts at random steps:
    every request that is not aborted gets the tokens of an uncached roomy engine, and the pool ends
    empty but for the cache (and fully empty after reset_prefix_cache)."""
    vocab_size = TINY_COMMON["vocab_size"]
    stems = [[int(t) for t in np.random.default_rng(100 + k).integers(3, vocab_size, size=6 + 9 * k)] for k in range(3)]
    prompts, params = [], []
    for stem, tail_len, max_tokens, seed, n, tail_seed in requests:
        tail = [int(t) for t in np.random.default_rng(tail_seed).integers(3, vocab_size, size=tail_len)]
        prompts.append(stems[stem] + tail)
        base = _params(max_tokens, seed)
        params.append(SamplingParams(temperature=base.temperature, top_k=base.top_k, max_tokens=max_tokens,
                                     ignore_eos=True, seed=seed, n=n if seed is not None else 1))
    plain = Engine(str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_pages=1024, page_size=page_size,
                   show_progress=False, enable_prefix_caching=False)
    expected = [[c.token_ids for c in o.outputs] for o in plain.generate(prompts, params, use_tqdm=False)]

    num_kv_pages = -(-MAX_MODEL_LEN // page_size) + extra_pages
    tight = Engine(str(llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_pages=num_kv_pages, page_size=page_size,
                   max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, show_progress=False)
    ids = [tight.add_request(None, prompt, p) for prompt, p in zip(prompts, params)]
    aborted, finished, step = set(), {}, 0
    while tight.has_unfinished_requests():
        for index in abort_at:
            if index == step and index < len(ids) and ids[index] not in finished:
                tight.abort_request(ids[index])
                aborted.add(ids[index])
        for out in tight.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
    stats = tight.stats()
    event(f"preempted: {stats.num_preemptions > 0}, hits: {stats.prefix_cache_hits > 0}")
    target(float(stats.prefix_cache_hits + stats.num_preemptions))
    setup = f"page_size={page_size} num_kv_pages={num_kv_pages} budget={budget} max_num_seqs={max_num_seqs}"
    for index, request_id in enumerate(ids):
        if request_id in aborted:
            continue
        got = [c.token_ids for c in finished[request_id].outputs]
        assert_exact(got, expected[index], what=f"request {index} of {requests} ({setup})")
    assert stats.num_free_pages == stats.num_total_pages == num_kv_pages, f"pages leaked ({setup})"
    assert stats.num_running == 0 and stats.num_waiting == 0
    tight.reset_prefix_cache()
    assert tight.stats().num_cached_pages == 0 and tight.stats().num_free_pages == num_kv_pages
