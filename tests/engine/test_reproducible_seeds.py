"""Reproducible seeds (issue 15, item 2) on the CPU engine: a seeded request draws the same tokens
alone, in a mixed batch where half the requests ask for logprobs (with prefix hits and chunked
prefill), after recompute preemption, and as a forked sample of a group (n > 1).

Exact token equality needs two things, both checked here: one sampler whose draw depends only on
(logits, params, seed, tokens so far) (the sample op, Philox keyed by (seed, offset)), and logits
that do not depend on the batch (the CPU GEMM sums each element in one order; see
docs/ARCHITECTURE.md, Reproducibility). The logprobs the engine reports are compared with a numpy
log-softmax of the captured logits."""
from __future__ import annotations

import numpy as np
import pytest

from lserve_testing import assert_close_fp32, assert_exact
from tiny_models import TINY_COMMON, make_tiny_model

pytest.importorskip("torch")
from lserve import Engine, _C  # noqa: E402

VOCAB = TINY_COMMON["vocab_size"]
NUM_REQUESTS = 200
GROUP = 4  # requests 4g .. 4g+3 share a prompt: a group for the fork run, prefix hits for the others
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_seeds")
    make_tiny_model("llama", directory, seed=21)
    return directory


def _requests():
    """200 seeded requests: temperature, top-k/top-p/min-p, penalties, min_tokens with stop ids."""
    rng = np.random.default_rng(2026)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(1, 40)))]
               for _ in range(NUM_REQUESTS // GROUP)]
    requests = []
    for index in range(NUM_REQUESTS):
        params = _C.SamplingParams(
            temperature=float(rng.choice([0.0, 0.6, 1.0, 1.5])), top_k=int(rng.choice([0, 5, 40])),
            top_p=float(rng.choice([1.0, 0.9, 0.5])), min_p=float(rng.choice([0.0, 0.05])),
            repetition_penalty=float(rng.choice([1.0, 1.3, 0.9])),
            presence_penalty=float(rng.choice([0.0, 0.5, -0.3])),
            frequency_penalty=float(rng.choice([0.0, 0.4])),
            min_tokens=int(rng.choice([0, 3])), stop_token_ids=[int(t) for t in rng.integers(3, VOCAB, 2)],
            max_tokens=MAX_TOKENS, ignore_eos=True, seed=int(rng.integers(0, 2**40)))
        requests.append((prompts[index // GROUP], params))
    return requests


def _engine(model_dir, **kwargs) -> Engine:
    defaults = dict(max_model_len=64, num_kv_pages=512, page_size=8, show_progress=False)
    defaults.update(kwargs)
    return Engine(str(model_dir), **defaults)


def _drain(engine: Engine, results: dict) -> None:
    core = engine._core
    while core.has_unfinished_requests():
        for out in core.step():
            assert out.error in (None, ""), out.error
            result = results[out.request_id]
            result["tokens"] += list(out.new_token_ids)
            result["logprobs"] += [(lp.logprob, list(lp.top_logprobs)) for lp in out.new_logprobs]
            if out.logits is not None and len(out.logits):
                result["logits"].append(np.array(out.logits))


def _empty(ids) -> dict:
    return {i: dict(tokens=[], logprobs=[], logits=[]) for i in ids}


def _with_logprobs(params, num_top: int):
    copy = _C.SamplingParams(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
        repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, min_tokens=params.min_tokens,
        stop_token_ids=list(params.stop_token_ids), max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
        seed=params.seed, logprobs=num_top)
    return copy


@pytest.fixture(scope="module")
def alone(model_dir):
    """Each request alone in its engine's batch, no prefix cache: the reference tokens."""
    requests = _requests()
    engine = _engine(model_dir, enable_prefix_caching=False, capture_logits=True)
    results = _empty(range(NUM_REQUESTS))
    for index, (prompt, params) in enumerate(requests):
        engine._core.add_request(index, prompt, params)
        _drain(engine, results)
    return [results[i] for i in range(NUM_REQUESTS)]


def _assert_same_as_alone(results: dict, alone: list, how: str) -> None:
    """Tokens exact, and the logits each token was drawn from bit for bit (the stronger claim: a
    batch-dependent logit a few ulps off would rarely move a token, so tokens alone prove little)."""
    for index in range(NUM_REQUESTS):
        assert_exact(results[index]["tokens"], alone[index]["tokens"], f"request {index} {how} vs alone: tokens")
        assert len(results[index]["logits"]) == len(alone[index]["logits"]), f"request {index} {how}"
        for position, (logits, reference) in enumerate(zip(results[index]["logits"], alone[index]["logits"])):
            assert_exact(logits, reference, f"request {index} {how} vs alone: logits of token {position}")


def test_mixed_batch_with_logprobs_and_prefix_hits(model_dir, alone):
    requests = _requests()
    engine = _engine(model_dir, capture_logits=True, max_num_batched_tokens=48)
    core = engine._core
    num_tops = {}
    for index, (prompt, params) in enumerate(requests):
        if index % 2 == 0:  # half the batch asks for logprobs, 0 to 20 of them
            num_tops[index] = index % 21
            params = _with_logprobs(params, num_tops[index])
        core.add_request(index, prompt, params)
    results = _empty(range(NUM_REQUESTS))
    _drain(engine, results)
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0, "requests sharing a prompt should hit the prefix cache"
    _assert_same_as_alone(results, alone, "in a mixed batch")
    for index, num_top in num_tops.items():
        result = results[index]
        assert len(result["logprobs"]) == len(result["tokens"]) == len(result["logits"])
        for position, (token_id, logits, (logprob, top)) in enumerate(
                zip(result["tokens"], result["logits"], result["logprobs"])):
            what = f"request {index}, token {position}"
            shifted = logits.astype(np.float64) - logits.max()
            reference = shifted - np.log(np.exp(shifted).sum())
            assert_close_fp32(logprob, reference[token_id], f"{what}: sampled logprob")
            best = np.lexsort((np.arange(logits.size), -logits))[:num_top]  # ties: lower id first
            assert_exact([t for t, _ in top], best, f"{what}: top ids")
            if num_top:
                assert_close_fp32([v for _, v in top], reference[best], f"{what}: top logprobs")
    for index in range(1, NUM_REQUESTS, 2):
        assert results[index]["logprobs"] == [], f"request {index} asked for no logprobs"


def test_after_preemption(model_dir, alone):
    requests = _requests()
    # 12 pages of 8 tokens: far below what 200 requests of up to 47 tokens need at once.
    engine = _engine(model_dir, num_kv_pages=12, max_num_batched_tokens=32, enable_prefix_caching=False,
                     capture_logits=True)
    for index, (prompt, params) in enumerate(requests):
        engine._core.add_request(index, prompt, params)
    results = _empty(range(NUM_REQUESTS))
    _drain(engine, results)
    assert engine.stats().num_preemptions > 0, "the pool was meant to be too small"
    _assert_same_as_alone(results, alone, "under preemption")


def test_forked_samples_of_a_group(model_dir, alone):
    requests = _requests()
    engine = _engine(model_dir, max_num_batched_tokens=64, capture_logits=True)
    for group in range(NUM_REQUESTS // GROUP):
        ids = list(range(group * GROUP, (group + 1) * GROUP))
        engine._core.add_request_group(ids, requests[ids[0]][0], [requests[i][1] for i in ids])
    results = _empty(range(NUM_REQUESTS))
    _drain(engine, results)
    assert engine.stats().num_forked_samples > 0
    _assert_same_as_alone(results, alone, "as a sample of a group")


def test_seed_changes_the_draw(model_dir, alone):
    """The comparison above can fail: another seed gives other tokens for the sampled requests."""
    requests = _requests()
    engine = _engine(model_dir, enable_prefix_caching=False)
    changed = 0
    for index in range(0, 40):
        prompt, params = requests[index]
        if params.temperature == 0.0:
            continue
        params.seed = params.seed + 1
        engine._core.add_request(index, prompt, params)
        results = _empty([index])
        _drain(engine, results)
        changed += results[index]["tokens"] != alone[index]["tokens"]
    assert changed > 0
