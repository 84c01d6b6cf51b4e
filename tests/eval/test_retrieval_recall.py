"""Per-step selection recall (model_recall.model_selection_recall_steps) against an independent numpy
model of the engine's page selection and reuse rule, on a real forward pass of a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
from eval_helpers import TINY_SPARSITY


def _softmax_rows(query, keys):
    num_qo, dim = query.shape
    group = num_qo // keys.shape[1]
    logits = np.einsum("hd,khd->hk", query.astype(np.float64),
                       np.repeat(keys.astype(np.float64), group, axis=1)) / np.sqrt(dim)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def _numpy_pages(query_group, keys_head, page_size, logical, num_select, keep_first, score):
    """Pages one KV head selects: per logical page bound or centre score summed over the group's query
    heads, max over a physical page's logical pages, the newest (and first) page forced, then the top
    scores (ties: the earlier page)."""
    num_keys = len(keys_head)
    num_pages = -(-num_keys // page_size)
    if num_pages <= num_select:
        return list(range(num_pages))
    q = query_group.astype(np.float64)
    scores = []
    for page in range(num_pages):
        best = -np.inf
        for start in range(page * page_size, min(num_keys, (page + 1) * page_size), logical):
            block = keys_head[start:min(num_keys, start + logical)].astype(np.float64)
            kmax, kmin = block.max(axis=0), block.min(axis=0)
            if score == "center":
                value = (q * (kmax + kmin) / 2).sum()
            else:
                value = np.maximum(q * kmax, q * kmin).sum()
            best = max(best, value)
        scores.append(best)
    forced = {num_pages - 1} | ({0} if keep_first else set())
    rest = sorted((p for p in range(num_pages) if p not in forced), key=lambda p: (-scores[p], p))
    return sorted(forced) + rest[:max(0, num_select - len(forced))]


def _numpy_steps(records, num_prompt, num_steps, streaming, cfg):
    """Per step: (engine mean, engine min, fresh mean, stream mean) over heads of all layers."""
    page_size, logical = cfg["physical_page_size"], cfg["logical_page_size"]
    num_select, reuse = cfg["decode_token_budget"] // page_size, cfg["selection_reuse_interval"]
    out = []
    stored = {}
    last_fresh_pages = None
    for step in range(num_steps):
        position = num_prompt - 1 + step
        num_keys = position + 1
        num_pages = -(-num_keys // page_size)
        if step >= 1 and num_pages > num_select and (last_fresh_pages is None or (step - 1) % reuse == 0):
            mode, last_fresh_pages = "fresh", num_pages
        elif step >= 1 and num_pages > num_select:
            mode = "reuse"
        else:
            mode = "read all"
        engine, fresh, stream = [], [], []
        for layer, (queries, keys) in records.items():
            query = queries[step]
            group = query.shape[0] // keys.shape[1]
            probs = _softmax_rows(query, keys[:num_keys])
            for head in range(keys.shape[1]):
                rows = probs[head * group:(head + 1) * group]
                if streaming[layer][head]:
                    sink = cfg["prefill_sink_tokens"] if step == 0 else cfg["decode_sink_tokens"]
                    local = cfg["prefill_local_tokens"] if step == 0 else cfg["decode_local_tokens"]
                    visible = [j for j in range(num_keys) if j < sink or j > position - local]
                    stream.extend(rows[:, visible].sum(axis=1))
                    continue
                pages = _numpy_pages(query[head * group:(head + 1) * group], keys[:num_keys, head], page_size,
                                     logical, num_select, True, "bound")

                def mass(page_list):
                    mask = np.zeros(num_keys, dtype=bool)
                    for page in page_list:
                        mask[page * page_size:(page + 1) * page_size] = True
                    return rows[:, mask].sum(axis=1)

                fresh.extend(mass(pages))
                if mode == "fresh":
                    stored[(layer, head)] = pages
                if mode == "read all":
                    engine.extend(np.ones(group))
                elif mode == "fresh":
                    engine.extend(mass(pages))
                else:
                    engine.extend(mass(sorted(set(stored[(layer, head)]) | set(range(last_fresh_pages, num_pages)))))
        out.append((np.mean(engine), np.min(engine), np.mean(fresh), np.mean(stream)))
    return out


def test_recall_steps_match_numpy_with_reuse(tiny_char_model):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lserve.eval.model_recall import QKCapture, model_selection_recall, model_selection_recall_steps
    from lserve.sparsity import SparsityConfig

    capture = QKCapture(str(tiny_char_model))
    rng = np.random.default_rng(2)
    prompt = [int(t) for t in rng.integers(3, 90, 252)]
    answer = [int(t) for t in rng.integers(3, 90, 12)]  # position 256 (a new page) is a reuse step
    sparsity = SparsityConfig(**TINY_SPARSITY)
    report = model_selection_recall_steps(capture, prompt, answer, sparsity)
    steps = report["steps"]
    assert len(steps) == 12 and report["num_heads"] == 6  # 3 dense KV heads x GQA 2
    assert [s["mode"] for s in steps] == ["prefill"] + ["fresh", "reuse", "reuse"] * 3 + ["fresh", "reuse"]

    records = capture.capture_positions(prompt + answer[:-1], [251 + i for i in range(12)])
    expected = _numpy_steps(records, 252, 12, sparsity.streaming_mask(2, 2), TINY_SPARSITY)
    for step, (engine_mean, engine_min, fresh_mean, stream_mean) in zip(steps, expected):
        assert step["mean"] == pytest.approx(engine_mean, rel=1e-5)
        assert step["min"] == pytest.approx(engine_min, rel=1e-5)
        assert step["fresh_mean"] == pytest.approx(fresh_mean, rel=1e-5)
        assert step["stream_mean"] == pytest.approx(stream_mean, rel=1e-5)
    assert steps[0]["mean"] == 1.0 and steps[0]["fresh_mean"] < 1.0
    # reuse reads at least what the stale selection held, so it differs from a fresh selection somewhere
    assert any(s["mean"] != pytest.approx(s["fresh_mean"]) for s in steps if s["mode"] == "reuse")
    assert len(report["per_layer"]) == 2 and all(0.0 < v <= 1.0 for v in report["per_layer"])

    # step 0's fresh selection is the one model_selection_recall measures on the prompt
    first = model_selection_recall(capture, prompt, sparsity)
    assert steps[0]["fresh_mean"] == pytest.approx(first["mean"], rel=1e-6)
    assert steps[0]["fresh_min"] == pytest.approx(first["min"], rel=1e-6)

    # a budget covering the context reads everything: recall 1 at every step
    wide = SparsityConfig(**{**TINY_SPARSITY, "decode_token_budget": 512})
    assert all(s["mean"] == 1.0 and s["fresh_mean"] == 1.0 for s in
               model_selection_recall_steps(capture, prompt, answer[:3], wide)["steps"])
    # an empty answer measures the first token only
    assert len(model_selection_recall_steps(capture, prompt, [], sparsity)["steps"]) == 1
