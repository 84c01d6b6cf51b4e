"""The GPU engine against the CPU engine, end to end: tiny random Llama/Mistral/Qwen2 checkpoints and
SmolLM2-135M's config with random weights (load_format="dummy").

Both engines hold the same weights. In float32 the GPU must match the CPU closely; in bfloat16
(weights, KV cache, and on the GPU the activations between GEMMs) within a bf16-level tolerance.
Teacher-forced: the logits after each prefix of a 32-token continuation (one batch of prefill
requests). Greedy decode: 32 steps compared step by step; the tokens must agree wherever the CPU's
top-1 margin exceeds twice the tolerance (a flip needs both logits to move by half the margin)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cuda_testing import engine_device
from tiny_models import TINY_VARIANTS, make_tiny_model

pytestmark = pytest.mark.cuda
pytest.importorskip("transformers")

from lserve import Engine, SamplingParams  # noqa: E402

SMOLLM2_135M = {
    "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",  # the shipped head pattern applies
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
# max |gpu - cpu| <= REL[dtype] * max |cpu logits|. float32: summation order only. bfloat16: the GPU
# rounds every activation between GEMMs to bf16 where the CPU keeps float32. Measured with the CPU
# computing that rounding itself (2026-11-22): up to 2.1e-2 on the tiny models (weights ~ N(0, 0.15)),
# 7.8e-3 on SmolLM2's config with dummy weights; the bounds leave 2-3x.
REL = {"float32": 1e-4, "bfloat16": 5e-2}
REL_SMOLLM2_BF16 = 2.5e-2
CONTINUATION = 32


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, directory, seed=len(request.param))
    return directory


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smollm2_dummy")
    (directory / "config.json").write_text(json.dumps(SMOLLM2_135M))
    return directory


def _engines(directory, dtype: str, **kwargs):
    common = dict(dtype=dtype, kv_cache_dtype=dtype, capture_logits=True, show_progress=False, seed=3,
                  max_num_batched_tokens=512, **kwargs)
    cpu = Engine(str(directory), device="cpu", num_kv_pages=512, **common)
    gpu = Engine(str(directory), device=engine_device(), **common)
    return cpu, gpu


def _run(engine, prompts, max_tokens: int, first_id: int = 0):
    """Greedy; returns per request the captured logits (steps, vocab) and the tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for offset, ids in enumerate(prompts):
        engine._core.add_request(first_id + offset, list(ids), params.to_core(max_tokens, None))
    logits = {first_id + i: [] for i in range(len(prompts))}
    tokens = {first_id + i: [] for i in range(len(prompts))}
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            if out.logits is not None:
                logits[out.request_id].append(np.asarray(out.logits, dtype=np.float64))
            tokens[out.request_id].extend(out.new_token_ids)
    return [np.stack(logits[k]) for k in sorted(logits)], [tokens[k] for k in sorted(tokens)]


def _margin(row: np.ndarray) -> float:
    top2 = np.partition(row, -2)[-2:]
    return float(top2[1] - top2[0])


def _check_teacher_forced(cpu, gpu, vocab: int, rel: float, prompt_len: int, seed: int, what: str):
    ids = [int(t) for t in np.random.default_rng(seed).integers(3, vocab, size=prompt_len + CONTINUATION)]
    prompts = [ids[:prompt_len + i] for i in range(CONTINUATION)]
    cpu_logits, _ = _run(cpu, prompts, 1)
    gpu_logits, _ = _run(gpu, prompts, 1)
    expected, actual = np.concatenate(cpu_logits), np.concatenate(gpu_logits)
    assert np.isfinite(actual).all(), f"{what}: non-finite GPU logits"
    tol = rel * float(np.abs(expected).max())
    err = np.abs(actual - expected)
    row, col = np.unravel_index(int(np.argmax(err)), err.shape)
    assert err.max() <= tol, (f"{what}: max |gpu - cpu| {err.max():.3e} at prefix {prompt_len + row}, token {col} "
                              f"> {rel:.1e} * max|cpu| = {tol:.3e} (seed={seed})")
    for i in range(CONTINUATION):
        if _margin(expected[i]) > 2 * tol:
            assert int(np.argmax(actual[i])) == int(np.argmax(expected[i])), (
                f"{what}: greedy token differs at prefix {prompt_len + i} with CPU margin "
                f"{_margin(expected[i]):.3e} > 2 * tol {tol:.3e} (seed={seed})")
    return float(err.max() / max(np.abs(expected).max(), 1e-30))


def _check_greedy_decode(cpu, gpu, vocab: int, rel: float, prompt_len: int, seed: int, what: str):
    ids = [int(t) for t in np.random.default_rng(seed).integers(3, vocab, size=prompt_len)]
    (cpu_logits,), (cpu_tokens,) = _run(cpu, [ids], CONTINUATION, first_id=1000)
    (gpu_logits,), (gpu_tokens,) = _run(gpu, [ids], CONTINUATION, first_id=1000)
    assert len(gpu_tokens) == CONTINUATION and np.isfinite(gpu_logits).all(), f"{what}: bad GPU generation"
    tol = rel * float(np.abs(cpu_logits).max())
    for step in range(CONTINUATION):
        err = float(np.abs(gpu_logits[step] - cpu_logits[step]).max())
        assert err <= tol, f"{what}: step {step} max |gpu - cpu| {err:.3e} > tol {tol:.3e} (seed={seed})"
        if gpu_tokens[step] != cpu_tokens[step]:
            margin = _margin(cpu_logits[step])
            assert margin <= 2 * tol, (f"{what}: greedy tokens differ at step {step} although the CPU margin "
                                       f"{margin:.3e} exceeds 2 * tol {tol:.3e} (seed={seed})")
            return step  # the continuations differ from here on: nothing left to compare
    return CONTINUATION


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_models(tiny_dir, dtype):
    cpu, gpu = _engines(tiny_dir, dtype, max_model_len=512)
    vocab = cpu._core.model_config.vocab_size
    for prompt_len, seed in ((1, 1), (17, 2), (40, 3)):
        what = f"{tiny_dir.name} {dtype} prompt {prompt_len}"
        _check_teacher_forced(cpu, gpu, vocab, REL[dtype], prompt_len, seed, what)
        _check_greedy_decode(cpu, gpu, vocab, REL[dtype], prompt_len, seed + 10, what)


def test_tiny_chunked_prefill_and_batching(tiny_dir):
    """Chunks of 7 tokens and a batch of prompts of mixed lengths: the GPU matches the CPU."""
    cpu, gpu = _engines(tiny_dir, "float32", max_model_len=512)
    gpu_chunked = Engine(str(tiny_dir), device=engine_device(), dtype="float32", kv_cache_dtype="float32",
                         capture_logits=True, show_progress=False, max_num_batched_tokens=7, max_model_len=512)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 200, size=n)] for n in (1, 16, 17, 31, 64)]
    expected, expected_tokens = _run(cpu, prompts, 6)
    for engine, label in ((gpu, "batched"), (gpu_chunked, "chunked by 7")):
        actual, tokens = _run(engine, prompts, 6)
        for i, (a, e) in enumerate(zip(actual, expected)):
            scale = float(np.abs(e).max())
            assert np.abs(a - e).max() <= REL["float32"] * scale, f"{tiny_dir.name} {label} prompt {i}"
        assert tokens == expected_tokens, f"{tiny_dir.name} {label}: greedy tokens differ"


def test_smollm2_dummy_bf16(smollm2_dir):
    cpu, gpu = _engines(smollm2_dir, "bfloat16", max_model_len=2048, load_format="dummy")
    vocab = SMOLLM2_135M["vocab_size"]
    for prompt_len, seed in ((5, 21), (100, 22)):
        what = f"SmolLM2 dummy bf16 prompt {prompt_len}"
        _check_teacher_forced(cpu, gpu, vocab, REL_SMOLLM2_BF16, prompt_len, seed, what)
        _check_greedy_decode(cpu, gpu, vocab, REL_SMOLLM2_BF16, prompt_len, seed + 10, what)


def test_kv_cache_sized_from_gpu_memory(smollm2_dir):
    """Without kv_cache_memory the KV cache takes what gpu_memory_utilization leaves, capped by need."""
    device = engine_device()
    if device == "cpu":
        pytest.skip("standing in: the CPU has no device memory")
    small = Engine(str(smollm2_dir), device=device, load_format="dummy", max_model_len=8192, max_num_seqs=256,
                   gpu_memory_utilization=0.5, show_progress=False)
    # 8192 tokens x 256 sequences need far more than half of any GPU: the budget decides.
    assert small._core.stats().num_total_pages * 16 >= 8192
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Engine(str(smollm2_dir), device=device, load_format="dummy", max_model_len=8192, gpu_memory_utilization=0.001,
               show_progress=False)


def test_sparsity_is_refused_on_cuda(smollm2_dir):
    device = engine_device()
    if device == "cpu":
        pytest.skip("standing in: the CPU runs sparse attention")
    with pytest.raises(ValueError, match="sparse attention runs on the CPU backend only"):
        Engine(str(smollm2_dir), device=device, load_format="dummy", max_model_len=2048, sparsity="lserve",
               show_progress=False)


def test_32k_prompt_runs(tmp_path):
    """A 32K-token prompt through chunked prefill (the tensor-core prefill) and a few decode steps
    (split-KV decode): finite logits, the requested tokens, pages back in the pool after."""
    device = engine_device()
    if device == "cpu":
        pytest.skip("standing in: 32K tokens on the CPU take minutes")
    config = dict(SMOLLM2_135M, max_position_embeddings=40960, num_hidden_layers=4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine = Engine(str(tmp_path), device=device, load_format="dummy", max_model_len=33000,
                    max_num_batched_tokens=8192, capture_logits=True, show_progress=False)
    prompt = [int(t) for t in np.random.default_rng(5).integers(3, config["vocab_size"], 32768)]
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    tokens, logits = [], []
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            tokens.extend(out.new_token_ids)
            if out.logits is not None:
                logits.append(np.asarray(out.logits))
    assert len(tokens) == 8 and len(logits) == 8
    assert all(np.isfinite(row).all() for row in logits)
    stats = engine._core.stats()
    assert stats.num_free_pages == stats.num_total_pages


def test_decode_graphs_match_eager(smollm2_dir):
    """Decode steps replay CUDA graphs captured at start-up (batch sizes 1, 2, 4, 8, then multiples
    of 8, up to max_num_seqs; smaller batches are padded). A batch of five requests with different
    prompt and output lengths (decode batches shrink from 5 to 1, prefill chunks run eagerly in
    between) gives the same logits as enforce_eager=True within the bf16 tolerance (the graphs fix
    the attention's split count for max_model_len, eager picks it per step), and the same greedy
    tokens wherever the eager top-1 margin exceeds twice that tolerance."""
    device = engine_device()
    if device == "cpu":
        pytest.skip("standing in: the CPU has no graphs")
    common = dict(device=device, load_format="dummy", dtype="bfloat16", kv_cache_dtype="bfloat16",
                  max_model_len=2048, max_num_seqs=20, max_num_batched_tokens=256, capture_logits=True,
                  show_progress=False, seed=3)
    graphs = Engine(str(smollm2_dir), **common)
    eager = Engine(str(smollm2_dir), enforce_eager=True, **common)
    assert list(graphs._core.stats().graph_batch_sizes) == [1, 2, 4, 8, 16, 20]
    assert list(eager._core.stats().graph_batch_sizes) == []
    rng = np.random.default_rng(7)
    lengths, max_tokens = (3, 70, 129, 500, 1000), (24, 9, 17, 3, 12)
    prompts = [[int(t) for t in rng.integers(3, SMOLLM2_135M["vocab_size"], size=n)] for n in lengths]

    def run(engine):
        for i, (ids, count) in enumerate(zip(prompts, max_tokens)):
            params = SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True)
            engine._core.add_request(i, ids, params.to_core(count, None))
        logits, tokens = {i: [] for i in range(len(prompts))}, {i: [] for i in range(len(prompts))}
        while engine._core.has_unfinished_requests():
            for out in engine._core.step():
                logits[out.request_id].append(np.asarray(out.logits, dtype=np.float64))
                tokens[out.request_id].extend(out.new_token_ids)
        return logits, tokens

    graph_logits, graph_tokens = run(graphs)
    eager_logits, eager_tokens = run(eager)
    # Every step once the prompts are in (~1700 tokens in chunks of 256) is a pure decode batch.
    assert graphs._core.stats().num_graph_replays >= max(max_tokens) - 8
    assert eager._core.stats().num_graph_replays == 0
    for i in range(len(prompts)):
        assert len(graph_tokens[i]) == max_tokens[i]
        tol = REL_SMOLLM2_BF16 * float(np.abs(np.stack(eager_logits[i])).max())
        for step, (g, e) in enumerate(zip(graph_logits[i], eager_logits[i])):
            err = float(np.abs(g - e).max())
            assert err <= tol, f"request {i} step {step}: max |graph - eager| {err:.3e} > {tol:.3e}"
            if graph_tokens[i][step] != eager_tokens[i][step]:
                assert _margin(e) <= 2 * tol, f"request {i} step {step}: tokens differ at margin {_margin(e):.3e}"
                break


def _generate(engine, prompts, params):
    """Token lists per prompt through the public API (no captured logits: sampling on the device)."""
    return [out.outputs[0].token_ids for out in engine.generate(prompts, params)]


def test_device_sampling(smollm2_dir):
    """Without capture_logits or logprobs the GPU engine samples on the device and copies back only
    token ids: greedy equals the host sampler's greedy (same logits, lowest id on ties); seeded
    sampling with temperature/top-k/top-p/min-p/penalties repeats under the same seeds and changes
    with them; min_tokens masks a stop token on the device."""
    device = engine_device()
    if device == "cpu":
        pytest.skip("standing in: the CPU engine samples on the host")
    common = dict(device=device, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=8,
                  show_progress=False, seed=3)
    device_engine = Engine(str(smollm2_dir), **common)
    host_engine = Engine(str(smollm2_dir), capture_logits=True, **common)
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(3, SMOLLM2_135M["vocab_size"], size=n)] for n in (5, 40, 200)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert _generate(device_engine, prompts, greedy) == _generate(host_engine, prompts, greedy)

    def sampled(seed):
        params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                                presence_penalty=0.2, frequency_penalty=0.1, max_tokens=16, ignore_eos=True,
                                seed=seed)
        return _generate(device_engine, prompts, params)

    first, again, other = sampled(1), sampled(1), sampled(2)
    assert first == again, "the same seeds drew different tokens"
    assert first != other, "different seeds drew the same 48 tokens"
    assert all(len(tokens) == 16 and all(0 <= t < SMOLLM2_135M["vocab_size"] for t in tokens) for tokens in first)

    banned = _generate(device_engine, prompts[:1], greedy)[0][0]
    params = SamplingParams(temperature=0.0, max_tokens=3, min_tokens=2, stop_token_ids=[banned], ignore_eos=True)
    tokens = _generate(device_engine, prompts[:1], params)[0]
    assert tokens[0] != banned and len(tokens) >= 2, f"min_tokens did not mask the stop token: {tokens}"


def _collect(engine):
    """Steps until idle; per request id the captured logits (steps, vocab), tokens and cached-token count."""
    logits, tokens, cached = {}, {}, {}
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            if out.logits is not None:
                logits.setdefault(out.request_id, []).append(np.asarray(out.logits, dtype=np.float64))
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
    return {k: np.stack(v) for k, v in logits.items()}, tokens, cached


def test_prefix_cache_hit_and_fork_match_cpu(tiny_dir):
    """Prefix caching on the device (on by default): a prompt sharing four full pages with a finished one
    maps them and computes only its tail, and its logits match the CPU computing it cold; n = 4 greedy
    samples of one prefill (full pages shared, the partial last page copied on the device) decode what the
    CPU decodes alone. Pages all return to the pool after."""
    common = dict(dtype="float32", kv_cache_dtype="float32", capture_logits=True, show_progress=False, seed=3,
                  max_num_batched_tokens=512, max_model_len=512)
    cpu = Engine(str(tiny_dir), device="cpu", num_kv_pages=512, enable_prefix_caching=False, **common)
    gpu = Engine(str(tiny_dir), device=engine_device(), **common)
    rng = np.random.default_rng(11)
    stem = [int(t) for t in rng.integers(3, 200, size=70)]
    first = stem + [int(t) for t in rng.integers(3, 200, size=20)]
    second = stem + [int(t) for t in rng.integers(3, 200, size=13)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True).to_core(6, None)
    expected = {}
    for rid, ids in ((1, first), (2, second)):
        cpu._core.add_request(rid, ids, greedy)
        expected.update(_collect(cpu)[0])
    for rid, ids in ((1, first), (2, second)):
        gpu._core.add_request(rid, ids, greedy)
        logits, _, cached = _collect(gpu)
        assert cached[rid] == (0 if rid == 1 else 64), f"{tiny_dir.name}: request {rid} cached {cached[rid]} tokens"
        scale = float(np.abs(expected[rid]).max())
        err = float(np.abs(logits[rid] - expected[rid]).max())
        assert err <= REL["float32"] * scale, f"{tiny_dir.name}: request {rid} (cached prefix) max err {err:.3e}"

    # n = 4 on one prefill: a prompt ending inside a page, so each fork copies the partial page.
    prompt = stem + [int(t) for t in rng.integers(3, 200, size=7)]
    cpu._core.add_request(10, prompt, greedy)
    want_logits, want_tokens, _ = _collect(cpu)
    gpu._core.add_request_group([20, 21, 22, 23], prompt, [greedy] * 4)
    got_logits, got_tokens, _ = _collect(gpu)
    scale = float(np.abs(want_logits[10]).max())
    for rid in (20, 21, 22, 23):
        err = float(np.abs(got_logits[rid] - want_logits[10]).max())
        assert err <= REL["float32"] * scale, f"{tiny_dir.name}: fork {rid} max err {err:.3e}"
        assert got_tokens[rid] == want_tokens[10], f"{tiny_dir.name}: fork {rid} tokens differ"
    stats = gpu._core.stats()
    assert stats.num_forked_samples == 3
    assert stats.num_free_pages == stats.num_total_pages
