"""Automatic prefix caching and n > 1 on one prefill (issue 14): the same tokens as without them.

A tiny random Llama on the CPU (fp32): each case runs the same requests on an engine with prefix
caching and on one without, and compares the tokens (greedy, and seeded sampling), while the
engine statistics show that the cached part was not computed again.
"""
from __future__ import annotations

import numpy as np
import pytest

from lserve_testing import assert_exact
from tiny_models import make_tiny_model

pytest.importorskip("torch")
from lserve import Engine, SamplingParams, SparsityConfig  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_tokens=12, ignore_eos=True, seed=11)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_prefix")
    make_tiny_model("llama", directory, seed=5)
    return directory


def tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 211, size=n)]


def engine(llama_dir, caching: bool, **kwargs) -> Engine:
    options = dict(max_model_len=512, page_size=8, show_progress=False, enable_prefix_caching=caching)
    options.update(kwargs)
    return Engine(str(llama_dir), **options)


def run(eng: Engine, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in eng.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("prefix_len", [64, 61, 200], ids=["page_edge", "inside_page", "past_chunk"])
def test_second_request_reuses_prefix(llama_dir, params, prefix_len):
    """A second request sharing a prefix (ending on a page edge, inside a page, or longer than the
    prefill chunk) computes only its own part and gives the tokens of an uncached engine."""
    prefix = tokens(1, prefix_len)
    first, second = prefix + tokens(2, 9), prefix + tokens(3, 23)
    cached = engine(llama_dir, True, max_num_batched_tokens=64)
    plain = engine(llama_dir, False, max_num_batched_tokens=64)
    for prompt in (first, second):
        before = cached.stats().num_prompt_tokens_computed
        out = cached.generate([prompt], params, use_tqdm=False)[0]
        computed = cached.stats().num_prompt_tokens_computed - before
        assert_exact(out.outputs[0].token_ids, run(plain, [prompt], params)[0], what=f"prefix {prefix_len}")
        if prompt is second:
            full_pages = (prefix_len // 8) * 8
            assert out.num_cached_tokens == full_pages
            assert computed == len(second) - full_pages
        else:
            assert out.num_cached_tokens == 0 and computed == len(first)
    stats = cached.stats()
    assert stats.prefix_caching and stats.prefix_cache_hits == (prefix_len // 8) * 8
    assert stats.prefix_cache_queries == len(first) + len(second)
    assert plain.stats().prefix_cache_hits == 0 and not plain.stats().prefix_caching


def test_whole_prompt_cached_still_computes_last_token(llama_dir):
    prompt = tokens(4, 48)  # 6 full pages: the last token is computed for its logits
    cached = engine(llama_dir, True)
    a = cached.generate([prompt], GREEDY, use_tqdm=False)[0]
    b = cached.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert b.num_cached_tokens == 40
    assert_exact(b.outputs[0].token_ids, a.outputs[0].token_ids, what="identical prompt twice")


def check_joining_a_prefix_being_prefilled(make_engine, prompts, steps_before_join: int) -> None:
    """prompts[0] runs alone for steps_before_join steps (part-way through its prefix), then the others
    join: every request gives the uncached engine's tokens and the joiners find cached tokens."""
    cached = make_engine(True)
    ids = [cached.add_request(None, prompts[0], GREEDY)]
    for _ in range(steps_before_join):
        cached.step()
    ids += [cached.add_request(None, p, GREEDY) for p in prompts[1:]]
    results = {}
    while cached.has_unfinished_requests():
        for out in cached.step():
            if out.finished:
                results[out.request_id] = out
    expected = run(make_engine(False), prompts, GREEDY)
    for index, request_id in enumerate(ids):
        assert_exact(results[request_id].outputs[0].token_ids, expected[index], what=f"request {index}")
    assert all(results[request_id].num_cached_tokens > 0 for request_id in ids[1:])


def test_concurrent_requests_share_a_prefix_being_prefilled(llama_dir):
    """Requests that arrive while the shared prefix is still being prefilled (small chunks) pick up
    the pages as they are computed, and all give the uncached tokens."""
    prefix = tokens(5, 150)
    prompts = [prefix + tokens(10 + i, 5 + 3 * i) for i in range(4)]
    check_joining_a_prefix_being_prefilled(lambda caching: engine(llama_dir, caching, max_num_batched_tokens=32),
                                           prompts, steps_before_join=2)


def test_preemption_with_shared_pages(llama_dir):
    """A pool too small for everyone: requests holding shared pages are preempted, recomputed (hitting
    the cache again) and finish with the roomy engine's tokens; every page comes back."""
    prefix = tokens(6, 40)
    prompts = [prefix + tokens(20 + i, 10 + 7 * i) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    expected = run(engine(llama_dir, False, num_kv_pages=512), prompts, params)
    tight = engine(llama_dir, True, max_model_len=128, num_kv_pages=24, max_num_batched_tokens=32)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be too small"
    assert stats.prefix_cache_hits > 0
    for index, (out, ref) in enumerate(zip(outputs, expected)):
        assert_exact(out.outputs[0].token_ids, ref, what=f"prompt {index} under preemption")
    assert stats.num_free_pages == stats.num_total_pages
    assert stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.parametrize("prompt_len", [37, 40], ids=["partial_last_page", "page_edge"])
@pytest.mark.parametrize("caching", [True, False], ids=["caching", "no_caching"])
def test_n_samples_one_prefill(llama_dir, prompt_len, caching):
    """n = 4 prefills the prompt once; each sample equals the same seed run alone."""
    prompt = tokens(7, prompt_len)
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3, n=4)
    eng = engine(llama_dir, caching)
    out = eng.generate([prompt], params, use_tqdm=False)[0]
    stats = eng.stats()
    assert stats.num_prompt_tokens_computed == prompt_len, "the prompt was prefilled more than once"
    assert stats.num_forked_samples == 3
    alone = engine(llama_dir, False)
    for index, sample in enumerate(out.outputs):
        one = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3 + index)
        assert_exact(sample.token_ids, run(alone, [prompt], one)[0], what=f"sample {index}")
    assert len({tuple(s.token_ids) for s in out.outputs}) > 1, "the samples should differ"
    assert stats.num_free_pages == stats.num_total_pages


def test_n_samples_fall_back_when_no_room(llama_dir):
    """With max_num_seqs = 2, two of four samples cannot fork at once: they prefill later on their own."""
    prompt = tokens(8, 30)
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=9, n=4)
    eng = engine(llama_dir, False, max_num_seqs=2)
    out = eng.generate([prompt], params, use_tqdm=False)[0]
    assert eng.stats().num_forked_samples == 1
    alone = engine(llama_dir, False)
    for index, sample in enumerate(out.outputs):
        one = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=9 + index)
        assert_exact(sample.token_ids, run(alone, [prompt], one)[0], what=f"sample {index}")


def test_abort_leader_releases_samples(llama_dir):
    prompt = tokens(9, 100)
    eng = engine(llama_dir, False, max_num_batched_tokens=16)
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=1, n=3)
    request_id = eng.add_request(None, prompt, params)
    eng.step()
    assert eng.abort_request(request_id)
    while eng.has_unfinished_requests():
        eng.step()
    stats = eng.stats()
    assert stats.num_free_pages == stats.num_total_pages and stats.num_running == 0 and stats.num_waiting == 0


def test_reset_prefix_cache(llama_dir):
    prompt = tokens(11, 80)
    eng = engine(llama_dir, True)
    eng.generate([prompt], GREEDY, use_tqdm=False)
    # Generated tokens' pages are cached too (a multi-turn chat resends them): 80 + 12 tokens, the
    # last one never computed, fill 11 pages of 8.
    assert eng.stats().num_cached_pages == (80 + 12 - 1) // 8
    eng.reset_prefix_cache()
    assert eng.stats().num_cached_pages == 0
    assert eng.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


SPARSE = SparsityConfig(streaming_heads=[[1], [0]], prefill_sink_tokens=8, prefill_local_tokens=32,
                        decode_sink_tokens=8, decode_local_tokens=32, decode_token_budget=32,
                        selection_reuse_interval=2, physical_page_size=16, logical_page_size=8)


def sparse_engine(llama_dir, caching: bool, **kwargs) -> Engine:
    options = dict(max_model_len=512, show_progress=False, sparsity=SPARSE, enable_prefix_caching=caching)
    options.update(kwargs)
    return Engine(str(llama_dir), **options)


def test_sparse_n_samples_fork_the_streaming_slot(llama_dir):
    """With sparse attention (streaming heads, page selection), n = 4 forks the decode slot too:
    each sample equals its seed run alone."""
    prompt = tokens(12, 150)
    eng = sparse_engine(llama_dir, False)
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=4, n=4)
    out = eng.generate([prompt], params, use_tqdm=False)[0]
    assert eng.stats().num_forked_samples == 3
    assert eng.stats().num_prompt_tokens_computed == len(prompt)
    alone = sparse_engine(llama_dir, False)
    for index, sample in enumerate(out.outputs):
        one = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=4 + index)
        assert_exact(sample.token_ids, run(alone, [prompt], one)[0], what=f"sparse sample {index}")


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("prefix_len,budget", [(200, 64), (200, 512), (40, 512), (100, 16), (192, 64)],
                         ids=["prefill_ring", "one_chunk", "in_slot", "small_chunks", "page_edge"])
def test_sparse_prefix_hit_equals_miss(llama_dir, params, prefix_len, budget):
    """Sparse attention with prefix caching: the streaming heads' sinks and windows come back from
    shadow pages, so a request hitting a cached prefix (longer than the streaming window and the
    prefill chunk, or within the decode slot) gives the tokens of an uncached engine, and skips the
    cached part's computation."""
    prefix = tokens(13, prefix_len)
    first, second = prefix + tokens(14, 11), prefix + tokens(15, 27)
    cached = sparse_engine(llama_dir, True, max_num_batched_tokens=budget)
    plain = sparse_engine(llama_dir, False, max_num_batched_tokens=budget)
    assert cached.stats().prefix_caching and not plain.stats().prefix_caching
    assert cached.stats().num_shadow_pages > 0 and plain.stats().num_shadow_pages == 0
    # Between the two, an unrelated prompt runs in the same decode slot and prefill ring: whatever
    # the hit needs of the streaming heads must come from the shadows, not from what is left there.
    other = tokens(16, prefix_len + 20)
    for prompt in (first, other, second):
        before = cached.stats().num_prompt_tokens_computed
        out = cached.generate([prompt], params, use_tqdm=False)[0]
        computed = cached.stats().num_prompt_tokens_computed - before
        assert_exact(out.outputs[0].token_ids, run(plain, [prompt], params)[0],
                     what=f"sparse prefix {prefix_len}, budget {budget}")
        if prompt is second:
            assert out.num_cached_tokens == (prefix_len // 16) * 16
            assert computed == len(second) - out.num_cached_tokens
    assert cached.stats().isolation_violations == 0


def test_sparse_prefix_cache_under_pressure(llama_dir):
    """Many prompts over a few shared prefixes with a tight pool (preemption, eviction of pages and
    shadows): every request gets the uncached engine's tokens and every page comes back."""
    stems = [tokens(30 + k, 70 + 40 * k) for k in range(3)]
    prompts = [stems[i % 3] + tokens(40 + i, 5 + 3 * i) for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = run(sparse_engine(llama_dir, False, num_kv_pages=256), prompts, params)
    tight = sparse_engine(llama_dir, True, max_model_len=256, num_kv_pages=24, max_num_batched_tokens=48,
                          max_num_seqs=4)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    for index, (out, ref) in enumerate(zip(outputs, expected)):
        assert_exact(out.outputs[0].token_ids, ref, what=f"prompt {index}")
    assert stats.num_free_pages == stats.num_total_pages and stats.num_running == 0


def test_sparse_concurrent_requests_share_a_prefix_being_prefilled(llama_dir):
    """Sparse: requests arriving while the shared prefix is still being prefilled (small chunks, a
    prefill ring) take its finished pages and their shadows as they appear."""
    prefix = tokens(50, 180)
    prompts = [prefix + tokens(60 + i, 4 + 5 * i) for i in range(3)]
    check_joining_a_prefix_being_prefilled(
        lambda caching: sparse_engine(llama_dir, caching, max_num_batched_tokens=48), prompts, steps_before_join=3)
