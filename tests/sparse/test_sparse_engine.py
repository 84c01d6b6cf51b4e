"""LServe sparse attention end to end on tiny random models, against an independent torch reference
(tests/sparse/sparse_reference.py) and against dense lserve.

- windows and budget covering the context: sparse == dense, in prefill and decode;
- streaming heads (Lambda mask) in prefill, chunked prefill included, and at decode;
- dense heads' page selection at decode, fresh every step and reused for several steps;
- a ring buffer far past the window: constant streaming memory, exact sink + local behaviour;
- a recycled page's statistics are reset (a request on reused pages equals a fresh engine's).
"""
from __future__ import annotations

import numpy as np
import pytest

from lserve_testing import assert_exact, assert_rel_close
from tiny_models import make_tiny_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lserve import Engine, SamplingParams, _C  # noqa: E402
from lserve.sparsity import SparsityConfig  # noqa: E402
from sparse_reference import SparseSpec, use_reference  # noqa: E402

STREAMING = [[True, False], [False, True]]  # tiny llama: 2 layers x 2 KV heads (GQA 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_sparse")
    make_tiny_model("llama", directory, seed=11)
    return directory


def _hf(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _prompt(length: int, seed: int) -> list:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 211, size=length)]


def _config(**overrides) -> SparsityConfig:
    settings = dict(streaming_heads=[[h for h, s in enumerate(row) if s] for row in STREAMING],
                    prefill_sink_tokens=8, prefill_local_tokens=40, decode_sink_tokens=8, decode_local_tokens=24,
                    physical_page_size=16, logical_page_size=4, decode_token_budget=64, selection_reuse_interval=1)
    settings.update(overrides)
    return SparsityConfig(**settings)


def _spec(config: SparsityConfig) -> SparseSpec:
    return SparseSpec(streaming=STREAMING, prefill_sink=config.prefill_sink_tokens,
                      prefill_local=config.prefill_local_tokens, decode_sink=config.decode_sink_tokens,
                      decode_local=config.decode_local_tokens, page_size=config.physical_page_size,
                      logical_page_size=config.logical_page_size, budget=config.decode_token_budget,
                      reuse_interval=config.selection_reuse_interval,
                      keep_first_page=config.always_select_sink_page, page_score=config.page_score,
                      page_score_spread=config.page_score_spread,
                      recent_pages=max(1, -(-config.select_recent_tokens // config.physical_page_size)),
                      head_budgets=(config.head_token_budgets(np.asarray(STREAMING)).tolist()
                                    if config.head_budget_skew > 0 else None))


def _engine(directory, sparsity, **kwargs) -> Engine:
    defaults = dict(max_model_len=512, show_progress=False, capture_logits=True, num_kv_pages=96)
    defaults.update(kwargs)
    return Engine(str(directory), sparsity=sparsity, **defaults)


def _run(engine: Engine, ids: list, max_tokens: int):
    """Greedy tokens and the logits of every sampled row."""
    engine.add_request("r", ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    tokens, logits = [], []
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            tokens.extend(out.new_token_ids)
            if out.logits is not None:
                logits.append(np.asarray(out.logits))
    engine._requests.clear()
    return tokens, np.stack(logits)


def _reference(directory, config: SparsityConfig, ids: list, tokens: list):
    """The reference's logits on the same token sequence (teacher forcing with HF's cache)."""
    model = _hf(directory)
    spec = _spec(config)
    use_reference(model, spec)
    logits = []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits.append(out.logits[0, -1].numpy())
        past = out.past_key_values
        for token in tokens[:-1]:
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].numpy())
    return np.stack(logits), spec


def test_sparse_equals_dense_when_everything_fits(tiny):
    ids = _prompt(150, seed=1)
    wide = _config(prefill_local_tokens=1024, decode_local_tokens=1024, decode_token_budget=1024)
    dense_tokens, dense_logits = _run(_engine(tiny, None), ids, 24)
    sparse_tokens, sparse_logits = _run(_engine(tiny, wide), ids, 24)
    assert_rel_close(sparse_logits, dense_logits, 1e-5, what="sparse (everything fits) vs dense")
    assert_exact(sparse_tokens, dense_tokens, what="greedy tokens")


@pytest.mark.parametrize("chunk", [2048, 37])
def test_streaming_heads_and_selection_match_reference(tiny, chunk):
    config = _config()
    ids = _prompt(170, seed=2)  # > prefill window: the Lambda mask bites in prefill
    engine = _engine(tiny, config, max_num_batched_tokens=chunk)
    tokens, logits = _run(engine, ids, 40)  # 170 + 40 tokens: 11-14 pages, budget 4 pages
    expected, spec = _reference(tiny, config, ids, tokens)
    assert spec.selections, "the reference never selected pages: the budget does not bite"
    assert_rel_close(logits, expected, 1e-4, what=f"sparse engine vs reference (chunk {chunk})")
    stats = engine._core.stats()
    assert stats.last_step_pages_selected < stats.last_step_pages_total


@pytest.mark.parametrize("page_score", ["bound", "center", "blend"])
def test_selection_reuse_matches_reference(tiny, page_score):
    config = _config(selection_reuse_interval=4, always_select_sink_page=False, page_score=page_score)
    ids = _prompt(120, seed=3)
    tokens, logits = _run(_engine(tiny, config), ids, 60)
    expected, spec = _reference(tiny, config, ids, tokens)
    assert spec.selections
    assert_rel_close(logits, expected, 1e-4, what="reused selections vs reference")


def test_recent_pages_and_head_budgets_match_reference(tiny):
    """select_recent_tokens (the newest pages every selection keeps) and head_budget_skew (per-head
    budgets from the head pattern's scores) against the reference, with reuse."""
    scores = [[0.1, 0.9], [0.3, 0.2]]  # dense heads: (0, 1) scores 0.9, (1, 0) 0.3
    config = _config(streaming_heads=None, head_pattern=scores, streaming_fraction=0.5, selection_reuse_interval=3,
                     select_recent_tokens=20, head_budget_skew=1.0, decode_token_budget=96)
    budgets = config.head_token_budgets(np.asarray(STREAMING))
    # 6 pages x 0.9 / 0.6 = 9, and 6 x 0.3 / 0.6 = 3 raised to 4 (2 recent pages, the sink page, one scored)
    assert budgets.tolist() == [[0, 144], [64, 0]], budgets
    ids = _prompt(130, seed=5)
    tokens, logits = _run(_engine(tiny, config), ids, 50)
    expected, spec = _reference(tiny, config, ids, tokens)
    assert {(layer, h) for layer, h, _ in spec.selections} == {(0, 1), (1, 0)}
    assert_rel_close(logits, expected, 1e-4, what="recent pages + per-head budgets vs reference")
    _, plain_logits = _run(_engine(tiny, _config(selection_reuse_interval=3, decode_token_budget=96)), ids, 50)
    assert not np.allclose(plain_logits[:len(logits)], logits, atol=1e-3), "the two knobs changed nothing"


def test_sparse_differs_from_dense_when_budget_bites(tiny):
    """Guards against a sparse path that silently runs dense."""
    ids = _prompt(200, seed=4)
    _, dense_logits = _run(_engine(tiny, None), ids, 8)
    _, sparse_logits = _run(_engine(tiny, _config()), ids, 8)
    assert np.abs(sparse_logits - dense_logits).max() > 1e-3


def test_ring_buffer_far_past_the_window(tmp_path):
    """Over a thousand decode steps past the window: streaming memory stays constant and the
    streaming heads see exactly sink + local tokens (reference recomputed on the full context)."""
    import transformers

    from tiny_models import TINY_COMMON

    config = transformers.LlamaConfig(**{**TINY_COMMON, "max_position_embeddings": 2048, "num_hidden_layers": 1,
                                         "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                                         "num_key_value_heads": 2})
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    streaming = [[True, True]]
    sparsity = SparsityConfig(streaming_heads=[[0, 1]], prefill_sink_tokens=4, prefill_local_tokens=20,
                              decode_sink_tokens=4, decode_local_tokens=20, physical_page_size=8,
                              logical_page_size=4, decode_token_budget=64)
    engine = Engine(str(tmp_path), sparsity=sparsity, max_model_len=2048, show_progress=False, capture_logits=True,
                    num_kv_pages=300, max_num_batched_tokens=64)
    ids = _prompt(30, seed=6)
    engine.add_request("r", ids, SamplingParams(temperature=0.0, max_tokens=1200, ignore_eos=True))
    tokens, logits, stream_bytes = [], [], set()
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            tokens.extend(out.new_token_ids)
            logits.append(np.asarray(out.logits))
        stream_bytes.add(engine._core.stats().streaming_kv_bytes_in_use)
    engine._requests.clear()
    assert len(tokens) == 1200
    assert len(stream_bytes - {0}) == 1, f"streaming memory changed with the context: {sorted(stream_bytes)}"

    spec = SparseSpec(streaming=streaming, prefill_sink=4, prefill_local=20, decode_sink=4, decode_local=20,
                      page_size=8, logical_page_size=4, budget=64)
    use_reference(model, spec)
    check_at = set(range(0, 1200, 97)) | {1199}
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        for step, token in enumerate(tokens[:-1], start=1):
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            if step in check_at:
                assert_rel_close(logits[step], out.logits[0, -1].numpy(), 1e-4, what=f"decode step {step}")


def test_recycled_pages_reset_statistics(tiny):
    """Request B on pages request A used must equal B on a fresh engine (kmax/kmin reset on reuse)."""
    config = _config()
    a_ids, b_ids = _prompt(180, seed=7), _prompt(150, seed=8)
    engine = _engine(tiny, config, num_kv_pages=16, max_model_len=256)  # B reuses A's pages
    _run(engine, a_ids, 30)
    b_tokens, b_logits = _run(engine, b_ids, 30)
    fresh_tokens, fresh_logits = _run(_engine(tiny, config, num_kv_pages=16, max_model_len=256), b_ids, 30)
    assert_rel_close(b_logits, fresh_logits, 1e-6, what="B after A vs B alone")
    assert_exact(b_tokens, fresh_tokens, what="B greedy tokens")


def test_streaming_memory_is_constant_and_capacity_doubles(tiny):
    kwargs = dict(num_kv_pages=None, kv_cache_memory=4 << 20, max_num_seqs=2, max_num_batched_tokens=64)
    dense = _engine(tiny, None, **kwargs)
    half = _engine(tiny, _config(), **kwargs)
    dense_tokens = dense._core.stats().num_total_pages * dense._core.stats().page_size
    sparse_tokens = half._core.stats().num_total_pages * half._core.stats().page_size
    # Half the KV heads stream: the dense heads' pages hold about twice the tokens (minus the
    # streaming slots and the kmax/kmin statistics).
    assert sparse_tokens > 1.5 * dense_tokens, (sparse_tokens, dense_tokens)
    assert half._core.stats().streaming_kv_bytes > 0


def test_invalid_sparsity_is_refused(tiny):
    with pytest.raises(ValueError, match="logical_page_size"):
        SparsityConfig(physical_page_size=64, logical_page_size=24)
    with pytest.raises(ValueError, match="below one physical page"):
        SparsityConfig(decode_token_budget=32)
    with pytest.raises(ValueError, match="streaming_heads"):
        _engine(tiny, SparsityConfig(streaming_heads=[[0]]))  # 1 layer listed, the model has 2
    with pytest.raises(ValueError, match="sparsity"):
        _engine(tiny, 3.5)


def _run_many(engine: Engine, prompts: dict, max_tokens: int):
    """Greedy tokens and sampled-row logits per request, all submitted at once, and the largest number
    of sequences running in one step."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    ids_of = {engine._requests[rid].sequences[0].core_id: rid for rid in prompts}
    tokens = {rid: [] for rid in prompts}
    logits = {rid: [] for rid in prompts}
    max_running = 0
    while engine._core.has_unfinished_requests():
        outs = engine._core.step()
        max_running = max(max_running, engine._core.stats().num_running + sum(o.finished for o in outs))
        for out in outs:
            tokens[ids_of[out.request_id]].extend(out.new_token_ids)
            if out.logits is not None:
                logits[ids_of[out.request_id]].append(np.asarray(out.logits))
    engine._requests.clear()
    return tokens, {rid: np.stack(v) for rid, v in logits.items()}, max_running


MIXED_PROMPTS = {"long1": (170, 21), "short1": (30, 22), "long2": (150, 23), "short2": (50, 24), "mid": (90, 25)}


def test_mixed_steps_with_prefill_rings_equal_each_alone(tiny):
    """Several sequences in the same steps: a prompt longer than the prefill window prefilling in
    chunks through the prefill ring (a second long one waiting for the ring), short prompts that
    prefill in their decode slot, others decoding with fresh and reused page selections. Each
    request's logits equal the same request run alone, and no layer allocated, copied or
    synchronised (the step's plan is made once, on the host)."""
    config = _config(selection_reuse_interval=3)
    prompts = {rid: _prompt(n, seed) for rid, (n, seed) in MIXED_PROMPTS.items()}
    engine = _engine(tiny, config, max_num_batched_tokens=37)
    tokens, logits, max_running = _run_many(engine, prompts, 24)
    stats = engine._core.stats()
    assert stats.num_preemptions == 0 and max_running >= 4
    assert stats.isolation_violations == 0, f"{stats.isolation_violations} allocations/copies/syncs inside layers"
    assert stats.num_prefill_rings == 1 and stats.num_free_prefill_rings == 1
    for rid, ids in prompts.items():
        alone_tokens, alone_logits = _run(_engine(tiny, config, max_num_batched_tokens=37), ids, 24)
        assert_rel_close(logits[rid], alone_logits, 1e-4, what=f"{rid}: batched with the others vs alone")
        assert_exact(tokens[rid], alone_tokens, what=f"{rid} greedy tokens")


def test_preemption_under_sparsity_releases_and_resumes(tiny):
    """A page pool too small for everyone: sequences are preempted (their slot and prefill ring go
    back) and recomputed; every request still finishes with all its tokens, nothing leaks, and no
    layer allocated, copied or synchronised. (A sequence preempted after decoding is recomputed with
    prefill attention, so its later logits may differ from an uninterrupted run, as in LServe.)"""
    prompts = {rid: _prompt(n, seed) for rid, (n, seed) in MIXED_PROMPTS.items()}
    engine = _engine(tiny, _config(selection_reuse_interval=3), max_num_batched_tokens=37, num_kv_pages=20,
                     max_model_len=256)
    tokens, _, _ = _run_many(engine, prompts, 24)
    stats = engine._core.stats()
    assert stats.num_preemptions > 0, "the page pool never ran out: preemption was not exercised"
    assert all(len(t) == 24 for t in tokens.values())
    assert stats.isolation_violations == 0
    assert stats.num_free_stream_slots == stats.num_stream_slots
    assert stats.num_free_prefill_rings == stats.num_prefill_rings
    assert stats.num_free_pages == stats.num_total_pages and stats.streaming_kv_bytes_in_use == 0


def test_isolation_counter_sees_a_copy_inside_a_layer():
    backend = _C.Backend("cpu")
    dst, src = np.zeros(4, dtype=np.float32), np.ones(4, dtype=np.float32)
    backend.copy(dst, src)
    assert backend.isolation_violations == 0
    backend.begin_isolated()
    backend.copy(dst, src)
    backend.end_isolated()
    assert backend.isolation_violations == 2  # the copy, and the synchronisation each binding call ends with
    backend.copy(dst, src)
    assert backend.isolation_violations == 2


def test_streaming_memory_per_decoding_sequence_is_constant(tiny):
    """Bytes a decoding sequence holds for its streaming heads depend on neither its context nor the
    prefill window (the prefill ring is handed back when prefill ends)."""
    per_seq, in_use = set(), set()
    for prefill_local, prompt_len in ((40, 60), (40, 300), (200, 60), (200, 300)):
        engine = _engine(tiny, _config(prefill_local_tokens=prefill_local), max_num_batched_tokens=64)
        engine.add_request("r", _prompt(prompt_len, seed=9), SamplingParams(temperature=0.0, max_tokens=40,
                                                                             ignore_eos=True))
        steps = 0
        while engine._core.has_unfinished_requests():
            outs = engine._core.step()
            stats = engine._core.stats()
            steps += 1
            if any(out.new_token_ids for out in outs) and not any(out.finished for out in outs):
                in_use.add(stats.streaming_kv_bytes_in_use)  # decoding: the slot alone
                per_seq.add(stats.streaming_bytes_per_seq)
        engine._requests.clear()
    assert len(per_seq) == 1 and len(in_use) == 1 and in_use == per_seq, (per_seq, in_use)


def test_max_num_seqs_decode_at_once(tiny):
    """With memory for all of them, max_num_seqs sequences (each longer than a decode slot, so they
    prefill one after another through the one prefill ring) end up decoding in the same steps."""
    prompts = {f"r{i}": _prompt(100 + 7 * i, seed=30 + i) for i in range(6)}
    engine = _engine(tiny, _config(), max_num_seqs=6, num_kv_pages=200, max_num_batched_tokens=64)
    assert engine._core.stats().num_stream_slots == 6
    _, _, max_running = _run_many(engine, prompts, 30)
    assert max_running == 6


def test_dense_below_tokens_runs_dense_then_switches_to_the_decode_ring(tiny):
    """Contexts shorter than dense_below_tokens decode with the prefill windows and every page (the
    sequence keeps its prefill ring meanwhile); past it the streaming heads read the decode ring that
    the mirror kept current, and the dense heads select pages."""
    ids = _prompt(120, seed=31)
    wide_prefill = dict(prefill_local_tokens=1024, prefill_sink_tokens=8)
    dense_tokens, dense_logits = _run(_engine(tiny, None), ids, 60)
    engine = _engine(tiny, _config(dense_below_tokens=150, **wide_prefill))
    sparse_tokens, sparse_logits = _run(engine, ids, 60)
    # Decode steps at contexts 121 .. 149 tokens (logits rows 1 .. 29) run dense: equal to dense lserve.
    assert_rel_close(sparse_logits[:30], dense_logits[:30], 1e-5, what="below dense_below_tokens vs dense")
    assert np.isfinite(sparse_logits).all()
    assert np.abs(sparse_logits[40:] - dense_logits[40:]).max() > 1e-3, "sparsity never started"
    stats = engine._core.stats()
    assert stats.isolation_violations == 0 and stats.num_free_prefill_rings == stats.num_prefill_rings


def test_set_decode_sparsity_equals_a_fresh_engine(tiny):
    """Engine.set_decode_sparsity between requests: the same prompt under another decode-time
    selection (budget, recent pages, per-head budgets, score, reuse) gives a fresh engine's tokens
    and logits with that selection, from the prefix cache (the prompt is not prefilled again), and
    switching back gives the first run's."""
    scores = [[0.1, 0.9], [0.3, 0.2]]
    first = _config(streaming_heads=None, head_pattern=scores, streaming_fraction=0.5, selection_reuse_interval=3,
                    decode_token_budget=96)
    second = {"decode_token_budget": 64, "select_recent_tokens": 20, "head_budget_skew": 1.0, "page_score": "blend",
              "page_score_spread": 0.5, "selection_reuse_interval": 1, "group_score": "max"}
    ids = _prompt(170, seed=6)
    engine = _engine(tiny, first)
    tokens_a, logits_a = _run(engine, ids, 40)
    engine.set_decode_sparsity(second)
    assert engine.sparsity.decode_token_budget == 64 and engine.sparsity.head_budget_skew == 1.0
    computed = engine.stats().num_prompt_tokens_computed
    tokens_b, logits_b = _run(engine, ids, 40)
    computed = engine.stats().num_prompt_tokens_computed - computed
    assert computed < 32, f"the second run computed {computed} of {len(ids)} prompt tokens: no prefix hit"
    fresh_tokens, fresh_logits = _run(_engine(tiny, first.with_overrides(**second)), ids, 40)
    assert_exact(tokens_b, fresh_tokens, what="tokens after set_decode_sparsity vs a fresh engine")
    assert_exact(logits_b, fresh_logits, what="logits after set_decode_sparsity vs a fresh engine")
    assert not np.allclose(logits_b, logits_a, atol=1e-3), "the second selection changed nothing"
    engine.set_decode_sparsity(first)
    tokens_back, logits_back = _run(engine, ids, 40)
    assert_exact(tokens_back, tokens_a, what="tokens after switching back")
    assert_exact(logits_back, logits_a, what="logits after switching back")


def test_set_decode_sparsity_refuses_what_it_cannot_change(tiny):
    engine = _engine(tiny, _config())
    with pytest.raises(ValueError, match="prefill_local_tokens"):
        engine.set_decode_sparsity({"prefill_local_tokens": 64})
    with pytest.raises(ValueError, match="physical_page_size"):
        engine.set_decode_sparsity({"physical_page_size": 32, "decode_token_budget": 64})
    with pytest.raises(ValueError, match="decode_token_budget"):
        engine.set_decode_sparsity({"decode_token_budget": 8})  # below one page: SparsityConfig refuses it
    with pytest.raises(ValueError, match="SparsityConfig or a dict"):
        engine.set_decode_sparsity("lserve")
    engine.add_request("busy", _prompt(40, seed=7), SamplingParams(temperature=0.0, max_tokens=4))
    with pytest.raises(ValueError, match="in flight"):
        engine.set_decode_sparsity({"decode_token_budget": 32})
    core_config = _config(decode_token_budget=32).to_core(2, 2)
    with pytest.raises(ValueError, match="in flight"):  # the C++ check, past Python's
        engine._core.set_decode_sparsity(core_config)
    with pytest.raises(ValueError, match="prefill_local_tokens"):
        engine._core.set_decode_sparsity(_config(prefill_local_tokens=64).to_core(2, 2))
    while engine._core.has_unfinished_requests():
        engine._core.step()
    engine._requests.clear()
    assert engine.sparsity.decode_token_budget == 64
    # Nothing changed: greedy decoding past the budget equals a fresh engine's.
    ids = _prompt(170, seed=8)
    assert _run(engine, ids, 30)[0] == _run(_engine(tiny, _config()), ids, 30)[0]
    dense = _engine(tiny, None)
    with pytest.raises(ValueError, match="dense engine"):
        dense.set_decode_sparsity({"decode_token_budget": 64})
    with pytest.raises(ValueError, match="dense engine"):  # the C++ check
        dense._core.set_decode_sparsity(core_config)
