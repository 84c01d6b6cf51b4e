"""Per-request sampling inside the engine (cpp/src/engine.cpp calling the backend's sample and
logprobs ops) on a tiny random Llama, and the KV pool sized from a memory budget.

The ops themselves are checked against numpy in tests/ops/test_sample.py and test_logprobs.py; here
every token the engine samples is replayed through the sample op, one row alone, from the step's
captured logits (same params, token history, eos ids, seed, and offset = tokens so far), which pins
that each request gets its own parameters and Philox stream in a mixed batch. Stop ids, eos, min_tokens, ignore_eos, max_tokens and logprobs are checked on the
outputs, vLLM-style.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from lserve_testing import assert_close_fp32, assert_exact
from tiny_models import TINY_COMMON, make_tiny_model

pytest.importorskip("torch")
from lserve import Engine, SamplingParams, _C  # noqa: E402

EOS = TINY_COMMON["eos_token_id"]
VOCAB = TINY_COMMON["vocab_size"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_sampling")
    make_tiny_model("llama", directory, seed=11)
    return directory


def _engine(directory, **kwargs) -> Engine:
    defaults = dict(max_model_len=96, num_kv_pages=96, page_size=8, show_progress=False)
    defaults.update(kwargs)
    return Engine(str(directory), **defaults)


def _prompt(length: int, seed: int) -> list:
    return [int(t) for t in np.random.default_rng(seed).integers(3, VOCAB, size=length)]


def _with_eos(model_dir, tmp_path, eos_ids: list):
    """A copy of the checkpoint whose config names other eos ids (the weights are unchanged)."""
    for name in ("model.safetensors", "config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _run_core(engine: Engine, requests: dict) -> dict:
    """requests: core id -> (prompt ids, _C.SamplingParams). Returns core id -> dict of the sampled
    tokens, the logits row each was sampled from, the per-token logprobs and the finish reason."""
    results = {core_id: dict(tokens=[], logits=[], logprobs=[], finish_reason=None) for core_id in requests}
    for core_id, (prompt, params) in requests.items():
        engine._core.add_request(core_id, prompt, params)
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            result = results[out.request_id]
            assert len(out.new_token_ids) == 1 and out.logits is not None
            result["tokens"] += out.new_token_ids
            result["logits"].append(np.array(out.logits))
            result["logprobs"] += [(lp.logprob, list(lp.top_logprobs)) for lp in out.new_logprobs]
            if out.finished:
                result["finish_reason"] = out.finish_reason
    return results


MIXED = [
    dict(temperature=0.0),
    dict(temperature=0.8, seed=1),
    dict(temperature=1.3, top_k=5, seed=2),
    dict(temperature=1.0, top_p=0.7, seed=3),
    dict(temperature=1.0, min_p=0.2, seed=4),
    dict(temperature=0.9, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.7, seed=5),
    dict(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, logprobs=5, seed=6),
    dict(temperature=0.0, logprobs=0, repetition_penalty=0.8),
    dict(temperature=2.0, min_tokens=10, stop_token_ids=[5, 6, 7], seed=8),
]


def replay(cpu, logits, params, prompt, outputs, eos=(EOS,)):
    """The token the sample op draws for one row alone, and the logprobs op's answer for it."""
    penalised = params.repetition_penalty != 1 or params.presence_penalty != 0 or params.frequency_penalty != 0
    args = dict(logits=np.array(logits, np.float32)[None].copy(),
                temperature=np.array([params.temperature], np.float32), top_k=np.array([params.top_k], np.int32),
                top_p=np.array([params.top_p], np.float32), min_p=np.array([params.min_p], np.float32),
                seed=np.array([params.seed or 0], np.int64),  # unseeded rows here are greedy, which draws nothing
                offset=np.array([len(outputs)], np.int64), output=np.full(1, -9, np.int32))
    if penalised:
        history = list(prompt) + list(outputs)
        args.update(history_indptr=np.array([0, len(history)], np.int32),
                    history_token_ids=np.array(history, np.int32),
                    num_prompt_tokens=np.array([len(prompt)], np.int32),
                    repetition_penalty=np.array([params.repetition_penalty], np.float32),
                    presence_penalty=np.array([params.presence_penalty], np.float32),
                    frequency_penalty=np.array([params.frequency_penalty], np.float32),
                    workspace=np.zeros(_C.sample_workspace_bytes(1, len(logits)), np.uint8))
    if len(outputs) < params.min_tokens:
        banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos))
        args.update(banned_indptr=np.array([0, len(banned)], np.int32), banned_token_ids=np.array(banned, np.int32))
    cpu.sample(**args)
    token_id = int(args["output"][0])
    if params.logprobs is None:
        return token_id, None
    num_top = params.logprobs
    logprob, top_ids, top_logprobs = np.zeros(1, np.float32), np.zeros((1, num_top), np.int32), np.zeros(
        (1, num_top), np.float32)
    cpu.logprobs(np.array(logits, np.float32)[None], np.zeros(1, np.int32), np.array([token_id], np.int32), logprob,
                 top_ids, top_logprobs)
    return token_id, (float(logprob[0]), [(int(t), float(v)) for t, v in zip(top_ids[0], top_logprobs[0])])


def test_mixed_batch_replays_through_the_sample_op(model_dir):
    engine = _engine(model_dir, capture_logits=True, max_num_batched_tokens=24)
    cpu = _C.Backend("cpu", 1)
    requests = {}
    for index, kwargs in enumerate(MIXED):
        params = _C.SamplingParams(max_tokens=14, **kwargs)
        requests[index] = (_prompt(3 + 7 * index, seed=index), params)
    results = _run_core(engine, requests)
    for core_id, (prompt, params) in requests.items():
        result = results[core_id]
        what = f"request {core_id} {MIXED[core_id]}"
        for position, (token_id, logits) in enumerate(zip(result["tokens"], result["logits"])):
            expected, logprobs = replay(cpu, logits, params, prompt, result["tokens"][:position])
            assert token_id == expected, f"{what}: token {position} is {token_id}, the sample op says {expected}"
            if params.logprobs is not None:
                assert result["logprobs"][position] == logprobs, f"{what}: logprobs at {position}"
        assert len(result["logprobs"]) == (len(result["tokens"]) if params.logprobs is not None else 0), what
        ended_on_stop = result["tokens"][-1] in [EOS] + list(params.stop_token_ids)
        if result["finish_reason"] == "stop":
            assert ended_on_stop and len(result["tokens"]) >= params.min_tokens, what
        else:
            assert result["finish_reason"] == "length" and len(result["tokens"]) == params.max_tokens, what
        stops = [EOS] + list(params.stop_token_ids)
        assert not np.isin(result["tokens"][:params.min_tokens], stops).any(), f"{what}: stop inside min_tokens"
    assert engine.stats().num_free_pages == engine.stats().num_total_pages


def test_seed_reproduces_across_batches_and_n(model_dir):
    prompt = _prompt(20, seed=99)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True, seed=1234)
    alone = _engine(model_dir).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = [_prompt(n, seed=n) for n in (1, 40, 9, 33)]
    busy = _engine(model_dir, max_num_batched_tokens=16)
    mixed = busy.generate(crowd[:2] + [prompt] + crowd[2:],
                          [SamplingParams(temperature=1.0, max_tokens=24, seed=s) for s in (1, 2)] + [params]
                          + [SamplingParams(temperature=0.7, max_tokens=24) for _ in range(2)], use_tqdm=False)
    assert_exact(mixed[2].outputs[0].token_ids, alone, "seeded request in a chunked mixed batch vs alone")
    again = busy.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert_exact(again, alone, "same seed, second run")
    other = busy.generate([prompt], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True,
                                                   seed=1235), use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone, "another seed gives another continuation"
    # n > 1: continuation i uses seed + i, so continuation 0 equals the n=1 request.
    many = busy.generate([prompt], SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True,
                                                  seed=1234), use_tqdm=False)[0].outputs
    assert_exact(many[0].token_ids, alone, "n=3, continuation 0")
    assert len({tuple(c.token_ids) for c in many}) == 3


def _first_fresh_token(tokens: list, start: int = 3) -> int:
    """Position of the first token at or after `start` that did not occur before it."""
    for position in range(start, len(tokens)):
        if tokens[position] not in tokens[:position]:
            return position
    pytest.fail(f"no fresh token in {tokens}")


def test_stop_ids_min_tokens_and_max_tokens(model_dir):
    engine = _engine(model_dir)
    prompt = _prompt(11, seed=5)
    greedy = dict(temperature=0.0, ignore_eos=True)
    ref = engine.generate([prompt], SamplingParams(max_tokens=24, **greedy), use_tqdm=False)[0].outputs[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 24 and ref.stop_reason is None
    k = _first_fresh_token(ref.token_ids)
    stop = ref.token_ids[k]

    out = engine.generate([prompt], SamplingParams(max_tokens=24, stop_token_ids=[stop], **greedy),
                          use_tqdm=False)[0].outputs[0]
    assert_exact(out.token_ids, ref.token_ids[:k + 1], "stops on (and includes) the stop id")
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)

    out = engine.generate([prompt], SamplingParams(max_tokens=24, min_tokens=k + 3, stop_token_ids=[stop], **greedy),
                          use_tqdm=False)[0].outputs[0]
    assert_exact(out.token_ids[:k], ref.token_ids[:k], "identical before the masked position")
    assert stop not in out.token_ids[:k + 3], "the stop id is masked for min_tokens tokens"
    assert len(out.token_ids) >= k + 3
    assert out.finish_reason == "length" or (out.finish_reason, out.token_ids[-1]) == ("stop", stop)

    for max_tokens in (1, 2, 7):
        out = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, **greedy), use_tqdm=False)[0].outputs[0]
        assert_exact(out.token_ids, ref.token_ids[:max_tokens], f"max_tokens={max_tokens}")
        assert out.finish_reason == "length"
    # max_tokens=None: up to max_model_len.
    out = engine.generate([prompt], SamplingParams(max_tokens=None, **greedy), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 96 - len(prompt) and out.finish_reason == "length"


def test_eos_ignore_eos_and_min_tokens(model_dir, tmp_path):
    prompt = _prompt(11, seed=5)
    plain = _engine(model_dir)
    ref = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    k = _first_fresh_token(ref)
    # A checkpoint whose eos ids are [some unused id, the token greedy decoding reaches at k]: the
    # second eos id must stop generation and be masked by min_tokens just like the first.
    unused = next(t for t in range(3, VOCAB) if t not in ref)
    engine = _engine(_with_eos(model_dir, tmp_path, [unused, ref[k]]))

    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert_exact(out.token_ids, ref[:k + 1], "stops at eos")
    assert (out.finish_reason, out.stop_reason) == ("stop", None)

    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    assert_exact(out.token_ids, ref, "ignore_eos runs to max_tokens")
    assert out.finish_reason == "length"

    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, min_tokens=k + 3),
                          use_tqdm=False)[0].outputs[0]
    assert_exact(out.token_ids[:k], ref[:k], "identical before the masked eos")
    assert ref[k] not in out.token_ids[:k + 3] and unused not in out.token_ids[:k + 3], "eos masked by min_tokens"
    assert len(out.token_ids) >= k + 3


def test_params_that_mask_every_token_are_rejected_on_arrival(model_dir):
    engine = _engine(model_dir)
    prompt = _prompt(5, seed=1)
    everything = [t for t in range(VOCAB) if t != EOS]
    with pytest.raises(ValueError, match="mask all"):
        engine.add_request(None, prompt, SamplingParams(min_tokens=1, max_tokens=4, stop_token_ids=everything))
    assert not engine.has_unfinished_requests()
    out = engine.generate([prompt], SamplingParams(min_tokens=1, max_tokens=4, stop_token_ids=everything,
                                                   ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] == EOS, "eos is the one token left under ignore_eos"


@pytest.mark.parametrize("num_top", [0, 3])
def test_logprobs_in_outputs(model_dir, num_top):
    engine = _engine(model_dir)
    prompt = _prompt(17, seed=3)
    for params in (SamplingParams(temperature=0.0, max_tokens=10, logprobs=num_top, ignore_eos=True),
                   SamplingParams(temperature=1.0, max_tokens=10, logprobs=num_top, ignore_eos=True, seed=3)):
        out = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert len(out.logprobs) == len(out.token_ids) == 10
        total = 0.0
        for position, (token_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None)
            assert [rank for rank, _, _ in ranked] == list(range(1, num_top + 1)), (position, entry)
            values = [value for _, _, value in ranked]
            assert values == sorted(values, reverse=True) and all(v <= 0.0 for v in values)
            assert token_id in entry and entry[token_id].logprob <= 0.0
            assert len(entry) in (num_top, num_top + 1)
            if params.temperature == 0.0 and num_top:
                assert ranked[0][1] == token_id, "greedy picks the rank-1 token"
            total += entry[token_id].logprob
        assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-9, abs_tol=1e-9)
    no_logprobs = engine.generate([prompt], SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert no_logprobs.logprobs is None


def test_logprobs_are_log_softmax_of_the_logits(model_dir):
    engine = _engine(model_dir, capture_logits=True)
    prompt = _prompt(9, seed=8)
    params = _C.SamplingParams(temperature=0.7, max_tokens=6, logprobs=4, repetition_penalty=1.3, seed=4)
    result = _run_core(engine, {0: (prompt, params)})[0]
    for position, (token_id, logits, (logprob, top)) in enumerate(
            zip(result["tokens"], result["logits"], result["logprobs"])):
        shifted = logits.astype(np.float64) - logits.max()
        reference = shifted - np.log(np.exp(shifted).sum())
        assert_close_fp32(logprob, reference[token_id], f"sampled logprob at {position}")
        best = np.lexsort((np.arange(logits.size), -logits))[:4]
        assert_exact([t for t, _ in top], best, f"top ids at {position}")
        assert_close_fp32([lp for _, lp in top], reference[best], f"top logprobs at {position}")


def test_kv_pool_sized_from_memory_budget(model_dir):
    layers, kv_heads = TINY_COMMON["num_hidden_layers"], TINY_COMMON["num_key_value_heads"]
    head_dim = TINY_COMMON["hidden_size"] // TINY_COMMON["num_attention_heads"]
    page_size = 8
    for kv_cache_dtype, dtype_bytes in (("float32", 4), ("bfloat16", 2)):
        page_bytes = 2 * layers * kv_heads * head_dim * dtype_bytes * page_size  # K and V
        for num_pages in (12, 37):
            budget = num_pages * page_bytes + page_bytes - 1  # a partial page is not a page
            engine = _engine(model_dir, kv_cache_memory=budget, kv_cache_dtype=kv_cache_dtype, num_kv_pages=None,
                             page_size=page_size)
            stats = engine.stats()
            assert (stats.num_total_pages, stats.num_free_pages, stats.page_size) == (num_pages, num_pages, page_size)
    # Too small for one sequence of max_model_len (96 tokens = 12 pages).
    with pytest.raises(ValueError, match="max_model_len"):
        _engine(model_dir, kv_cache_memory=11 * 2 * layers * kv_heads * head_dim * 4 * page_size, num_kv_pages=None)
    # No budget: capped at what max_num_seqs sequences of max_model_len need.
    stats = _engine(model_dir, num_kv_pages=None, max_num_seqs=3).stats()
    assert stats.num_total_pages == 3 * 12
