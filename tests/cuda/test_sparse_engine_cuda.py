"""The GPU engine with LServe sparse attention against the CPU engine with the same sparsity, end to end
(the engine on CUDA with sparsity is experimental until these pass on a device: it is switched on by
LSERVE_EXPERIMENTAL_CUDA_SPARSITY=1, see cpp/src/engine.cpp).

A tiny random Llama (2 layers, GQA 4, one streaming KV head per layer) with windows and a budget small
enough that everything bites: prompts longer than the prefill window prefill in chunks through the
prefill ring, decode steps read sink + decode ring and a page selection reused for several steps.
float32 (weights, KV, activations) compares the whole pipeline at fp32 tolerance: the GPU's
page_select is bit-identical to the CPU's on the same inputs, and the inputs differ only by summation
order. bfloat16 runs the GPU's low-precision path (bf16 queries into page_select, bf16 keys into the
statistics) and is checked for finite logits and a bf16-level distance."""
from __future__ import annotations

import numpy as np
import pytest

from cuda_testing import engine_device
from tiny_models import make_tiny_model

pytestmark = pytest.mark.cuda
pytest.importorskip("transformers")

from lserve import Engine, SamplingParams  # noqa: E402
from lserve.sparsity import SparsityConfig  # noqa: E402

REL = {"float32": 1e-4, "bfloat16": 5e-2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_sparse_cuda")
    make_tiny_model("llama", directory, seed=11)
    return directory


@pytest.fixture(autouse=True)
def _experimental(monkeypatch):
    monkeypatch.setenv("LSERVE_EXPERIMENTAL_CUDA_SPARSITY", "1")


def _sparsity(**overrides):
    settings = dict(streaming_heads=[[0], [1]], prefill_sink_tokens=8, prefill_local_tokens=40, decode_sink_tokens=8,
                    decode_local_tokens=24, physical_page_size=16, logical_page_size=4, decode_token_budget=64,
                    selection_reuse_interval=3)
    settings.update(overrides)
    return SparsityConfig(**settings)


def _run(engine, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine._core.add_request(i, list(ids), params.to_core(max_tokens, None))
    logits = {i: [] for i in range(len(prompts))}
    tokens = {i: [] for i in range(len(prompts))}
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            if out.logits is not None:
                logits[out.request_id].append(np.asarray(out.logits, dtype=np.float64))
            tokens[out.request_id].extend(out.new_token_ids)
    return [np.stack(logits[i]) for i in range(len(prompts))], [tokens[i] for i in range(len(prompts))]


# The selection knobs of round 4: a recent window of 2 pages and per-head budgets from the scores (the
# pattern streams the same heads as streaming_heads=[[0], [1]]: 6 and 4 pages for the two dense heads).
POLICIES = {"plain": {}, "recent_and_head_budgets": dict(
    streaming_heads=None, head_pattern=[[0.1, 0.9], [0.3, 0.2]], select_recent_tokens=20, head_budget_skew=1.0)}


@pytest.mark.parametrize("dtype, policy", [("float32", "plain"), ("bfloat16", "plain"),
                                           ("float32", "recent_and_head_budgets")])
def test_sparse_engine_matches_cpu(tiny, dtype, policy):
    device = engine_device()
    common = dict(dtype=dtype, kv_cache_dtype=dtype, capture_logits=True, show_progress=False, seed=3,
                  max_num_batched_tokens=37, max_model_len=512, sparsity=_sparsity(**POLICIES[policy]))
    cpu = Engine(str(tiny), device="cpu", num_kv_pages=96, **common)
    gpu = Engine(str(tiny), device=device, **common)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 211, size=n)] for n in (170, 30, 120)]
    cpu_logits, cpu_tokens = _run(cpu, prompts, 40)
    gpu_logits, gpu_tokens = _run(gpu, prompts, 40)
    stats = gpu._core.stats()
    assert stats.num_prefill_rings == 1 and stats.last_step_pages_selected < stats.last_step_pages_total
    for i, (expected, actual) in enumerate(zip(cpu_logits, gpu_logits)):
        assert np.isfinite(actual).all(), f"request {i}: non-finite GPU logits"
        tol = REL[dtype] * float(np.abs(expected).max())
        if dtype == "float32":
            # Teacher forcing is implicit: identical greedy tokens keep both on the same sequence.
            assert gpu_tokens[i] == cpu_tokens[i], f"request {i}: greedy tokens differ"
            err = np.abs(actual - expected)
            assert err.max() <= tol, f"request {i}: max |gpu - cpu| {err.max():.3e} > {tol:.3e}"
        else:
            err = np.abs(actual[0] - expected[0])  # the first token's logits: same prompt on both
            assert err.max() <= tol, f"request {i}: first-token max |gpu - cpu| {err.max():.3e} > {tol:.3e}"
    # After the first decode steps the GPU's workspaces have grown; nothing else allocates in a layer.
    assert gpu._core.stats().num_free_prefill_rings == 1


def test_sparse_engine_is_still_refused_without_the_switch(tiny, monkeypatch):
    device = engine_device()
    if device == "cpu":
        pytest.skip("standing in: the CPU runs sparse attention")
    monkeypatch.delenv("LSERVE_EXPERIMENTAL_CUDA_SPARSITY")
    with pytest.raises(ValueError, match="sparse attention runs on the CPU backend only"):
        Engine(str(tiny), device=device, max_model_len=512, sparsity=_sparsity(), show_progress=False)


def test_sparse_decode_graphs_match_eager(tiny):
    """Decode steps with sparsity replayed from CUDA graphs (fresh, reused and dense rows from the plan
    in the step's block) give what eager steps give, over a batch that grows and shrinks."""
    device = engine_device()
    if device == "cpu":
        pytest.skip("standing in: no graphs on the CPU")
    common = dict(dtype="bfloat16", kv_cache_dtype="bfloat16", capture_logits=True, show_progress=False, seed=3,
                  max_num_batched_tokens=64, max_model_len=512, max_num_seqs=8, sparsity=_sparsity())
    eager = Engine(str(tiny), device=device, enforce_eager=True, **common)
    graphs = Engine(str(tiny), device=device, enforce_eager=False, **common)
    assert graphs._core.stats().graph_batch_sizes, "no decode graphs were captured with sparsity"
    rng = np.random.default_rng(8)
    prompts = [[int(t) for t in rng.integers(3, 211, size=n)] for n in (150, 20, 90, 130, 45)]
    eager_logits, eager_tokens = _run(eager, prompts, 30)
    graph_logits, graph_tokens = _run(graphs, prompts, 30)
    assert graphs._core.stats().num_graph_replays > 0
    # The graphs fix the decode attention's split count for max_model_len, eager picks it per step: the
    # same logits within bf16 noise, and the same tokens until a step whose eager top-1 margin is
    # within twice that noise (after such a flip the two runs decode different sequences).
    for i, (e, g) in enumerate(zip(eager_logits, graph_logits)):
        assert np.isfinite(g).all()
        tol = 1e-2 * float(np.abs(e).max())
        for step in range(len(e)):
            err = float(np.abs(g[step] - e[step]).max())
            assert err <= tol, f"request {i} step {step}: graphs vs eager {err:.3e} > {tol:.3e}"
            if graph_tokens[i][step] != eager_tokens[i][step]:
                top2 = np.partition(e[step], -2)[-2:]
                assert top2[1] - top2[0] <= 2 * tol, f"request {i} step {step}: token differs with a clear margin"
                break
