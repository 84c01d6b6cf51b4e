"""Selection recall on a real model: how much dense attention mass LServe's page selection keeps.

For a prompt, transformers runs the model once (fp32) with an attention function that records, per
layer, the post-RoPE query of the last prompt position (the query that produces the first
generated token) and the keys of every position. For each dense (layer, KV head) of a
SparsityConfig, lserve's own ops build the per-logical-page kmax/kmin (`_C.Backend.page_stats_append`)
and pick the pages (`_C.Backend.page_select`, the op the engine's decode step calls, with its budget,
page sizes and sink-page option); `selection_recall` then measures the share of each query
head's dense attention probability that falls in the selected pages. Streaming heads select
nothing and are left out. Contexts within the budget keep every page (recall 1).

Per decode step (model_selection_recall_steps): the prompt and an answer (e.g. the dense engine's
greedy reply) run teacher-forced in one forward pass that records the query of every position that
produces an answer token; the page statistics grow one key at a time as in the engine, and each
step's recall is measured for the pages the engine's reuse rule reads at that step (PageSelector:
a fresh selection every selection_reuse_interval decode steps, the stored one plus every newer page
in between; the first answer token comes from the prefill, where dense heads read everything) and
for a fresh selection by that step's own query.

Example:
    >>> capture = QKCapture("smollm2-135m-instruct")
    >>> report = model_selection_recall(capture, prompt_ids, SparsityConfig.preset(
    ...     "lserve", model="smollm2-135m-instruct", decode_token_budget=1024))
    >>> report["mean"], report["min"]
    >>> steps = model_selection_recall_steps(capture, prompt_ids, answer_ids, sparsity)
    >>> [step["mean"] for step in steps["steps"]]  # one per answer token
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from lserve.eval.recall import selection_recall

_ATTENTION_NAME = "lserve_capture_qk"


class QKCapture:
    """A transformers model whose attention records (queries, all keys) per layer.

    `capture(prompt_ids)` returns {layer: (query (num_qo_heads, head_dim), keys (num_keys,
    num_kv_heads, head_dim))} for the last position; `capture_positions(token_ids, positions)`
    returns {layer: (queries (len(positions), num_qo_heads, head_dim), keys)}. All float32 numpy,
    post-RoPE, before any GQA expansion.
    """

    def __init__(self, model: str) -> None:
        import torch
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from lserve.calibrate.trainer import load_hf_model

        self._torch = torch
        self.model, _ = load_hf_model(model, dtype="float32")
        self.model.eval()
        self._records: Dict[int, tuple] = {}
        self._positions: List[int] = [-1]
        records, positions = self._records, self._positions

        def capture_attention(module, query, key, value, attention_mask, **kwargs):
            # query (batch, num_qo_heads, T, D), key (batch, num_kv_heads, T, D), batch 1; records
            # (len(positions), num_qo_heads, D) queries and (T, num_kv_heads, D) keys.
            queries = query[0][:, positions].detach().float().permute(1, 0, 2).numpy().copy()
            records[int(module.layer_idx)] = (queries, key[0].detach().float().permute(1, 0, 2).numpy().copy())
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(_ATTENTION_NAME, capture_attention)
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(_ATTENTION_NAME)
        else:
            self.model.config._attn_implementation = _ATTENTION_NAME

    def capture(self, prompt_ids: Sequence[int]) -> Dict[int, tuple]:
        records = self.capture_positions(prompt_ids, [-1])
        return {layer: (queries[0], keys) for layer, (queries, keys) in records.items()}

    def capture_positions(self, token_ids: Sequence[int], positions: Sequence[int]) -> Dict[int, tuple]:
        """{layer: (queries (len(positions), num_qo_heads, D), keys (len(token_ids), num_kv_heads, D))}
        of one forward pass over token_ids; positions index token_ids (negative from the end)."""
        torch = self._torch
        self._records.clear()
        self._positions[:] = [int(p) for p in positions]
        with torch.no_grad():
            self.model(torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False,
                       logits_to_keep=1)
        if len(self._records) != self.model.config.num_hidden_layers:
            raise RuntimeError(f"captured {len(self._records)} layers of {self.model.config.num_hidden_layers}: "
                               "the model did not route attention through the capture function")
        return dict(self._records)


def layer_selection_recall(query: np.ndarray, keys: np.ndarray, dense_heads: Sequence[int], sparsity,
                           scale: Optional[float] = None) -> np.ndarray:
    """Recall per query head of the dense KV heads `dense_heads` of one layer: (len(dense_heads) * group,).

    query (num_qo_heads, D), keys (num_keys, num_kv_heads, D) of one layer; the selection is
    lserve's page_select over kmax/kmin built by page_stats_append, with the config's budget."""
    from lserve import _C
    from lserve.eval.recall import attention_probs

    num_qo_heads, head_dim = query.shape
    num_keys, num_kv_heads, _ = keys.shape
    group = num_qo_heads // num_kv_heads
    page_size, logical = sparsity.physical_page_size, sparsity.logical_page_size
    num_select = sparsity.decode_token_budget // page_size
    num_pages = -(-num_keys // page_size)
    probs = attention_probs(query, keys, scale)  # (num_qo_heads, num_keys)
    dense_heads = list(dense_heads)
    if not dense_heads:
        return np.zeros(0)
    if num_pages <= num_select:
        return np.ones(len(dense_heads) * group)
    # Only the dense heads, in order: the op's KV heads are these, their query heads follow them.
    q = np.ascontiguousarray(np.concatenate([query[h * group:(h + 1) * group] for h in dense_heads])[None],
                             dtype=np.float32)
    k = np.ascontiguousarray(keys[:, dense_heads], dtype=np.float32)
    kmax = np.zeros((num_pages, page_size // logical, len(dense_heads), head_dim), dtype=np.float32)
    kmin = np.zeros_like(kmax)
    backend = _C.Backend("cpu", 1)
    backend.page_stats_append(k, np.arange(num_keys, dtype=np.int64), kmax, kmin, page_size)
    selected = np.full((1, len(dense_heads), num_select), -1, dtype=np.int32)
    counts = np.zeros((1, len(dense_heads)), dtype=np.int32)
    backend.page_select(q, kmax, kmin, np.array([0, num_pages], dtype=np.int32), np.arange(num_pages, dtype=np.int32),
                        np.array([num_keys], dtype=np.int32), selected, counts, page_size,
                        bool(sparsity.always_select_sink_page), getattr(sparsity, "page_score", "bound"),
                        getattr(sparsity, "group_score", "sum"), spread=getattr(sparsity, "page_score_spread", 0.0))
    dense_probs = np.concatenate([probs[h * group:(h + 1) * group] for h in dense_heads])
    return selection_recall(dense_probs, selected[0], page_size, counts[0])


def model_selection_recall(capture: QKCapture, prompt_ids: Sequence[int], sparsity) -> Dict:
    """{"mean", "min", "per_layer": [mean per layer or None], "num_heads"} over the dense query heads
    of every layer, for one prompt."""
    records = capture.capture(prompt_ids)
    num_layers = len(records)
    num_kv_heads = records[0][1].shape[1]
    streaming = np.asarray(sparsity.streaming_mask(num_layers, num_kv_heads), dtype=bool)
    per_layer: List[Optional[float]] = []
    values: List[np.ndarray] = []
    for layer in range(num_layers):
        query, keys = records[layer]
        dense = [h for h in range(num_kv_heads) if not streaming[layer, h]]
        recall = layer_selection_recall(query, keys, dense, sparsity)
        per_layer.append(float(recall.mean()) if recall.size else None)
        if recall.size:
            values.append(recall)
    flat = np.concatenate(values) if values else np.ones(1)
    return {"mean": float(flat.mean()), "min": float(flat.min()), "per_layer": per_layer,
            "num_heads": int(flat.size)}


def _window_mass(probs: np.ndarray, position: int, sink: int, local: int) -> np.ndarray:
    """Share of each row's mass on the keys a streaming head sees from `position` (Lambda mask:
    j < sink or j > position - local; local <= 0: every key)."""
    if local <= 0:
        return np.ones(probs.shape[0])
    keys = np.arange(probs.shape[1])
    return probs[:, (keys < sink) | (keys > position - local)].sum(axis=1)


def model_selection_recall_steps(capture: QKCapture, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                                 sparsity, scale: Optional[float] = None) -> Dict:
    """Selection recall at every answer token, the answer teacher-forced after the prompt.

    Step i is the query that produces answer token i (position len(prompt_ids) - 1 + i, context
    len(prompt_ids) + i keys); with an empty answer, step 0 only. Per step, over the dense query
    heads of every layer: "mean"/"min" of the recall of the pages the engine reads ("mode" says
    how it got them: "prefill" for step 0, where dense heads read every page, then "dense" within
    the budget or below dense_below_tokens, "fresh" or "reuse"), "fresh_mean"/"fresh_min" of a
    fresh selection by the step's own query (step 0: the selection model_selection_recall
    measures), and "stream_mean" of the streaming heads' mass inside their sink + local window
    (prefill windows at step 0, decode windows after). Also "per_layer": each layer's engine recall
    averaged over steps (None for a layer with no dense head), and "num_heads".
    """
    from lserve import _C
    from lserve.eval.recall import attention_probs

    prompt_ids, answer_ids = [int(t) for t in prompt_ids], [int(t) for t in answer_ids]
    num_prompt = len(prompt_ids)
    if num_prompt == 0:
        raise ValueError("the prompt is empty")
    num_steps = max(1, len(answer_ids))
    tokens = prompt_ids + answer_ids[:num_steps - 1]
    records = capture.capture_positions(tokens, [num_prompt - 1 + i for i in range(num_steps)])
    num_layers = len(records)
    num_kv_heads = records[0][1].shape[1]
    backend = _C.Backend("cpu", 1)
    streaming = np.asarray(sparsity.streaming_mask(num_layers, num_kv_heads), dtype=bool)
    page_size, logical = sparsity.physical_page_size, sparsity.logical_page_size
    num_select = sparsity.decode_token_budget // page_size
    # The engine's decode mode per step, as PageSelector::plan_chunk decides it (the same for every layer).
    decoding = num_prompt + 1 >= sparsity.dense_below_tokens
    modes, bases, steps_since = ["prefill"], [0], 0
    for step in range(1, num_steps):
        num_pages = -(-(num_prompt + step) // page_size)
        if not decoding or num_pages <= num_select:
            modes.append("dense")
            bases.append(num_pages)
        elif steps_since == 0 or steps_since >= sparsity.selection_reuse_interval:
            steps_since = 1
            modes.append("fresh")
            bases.append(num_pages)
        else:
            steps_since += 1
            modes.append("reuse")
            bases.append(bases[-1])
    engine = [[] for _ in range(num_steps)]  # per step: arrays of per-head recall, one per layer
    fresh = [[] for _ in range(num_steps)]
    stream = [[] for _ in range(num_steps)]
    per_layer: List[Optional[float]] = []
    for layer in range(num_layers):
        queries, keys = records[layer]
        num_qo_heads, head_dim = queries.shape[1], queries.shape[2]
        group = num_qo_heads // num_kv_heads
        dense = [h for h in range(num_kv_heads) if not streaming[layer, h]]
        stream_heads = [h for h in range(num_kv_heads) if streaming[layer, h]]
        dense_rows = [h * group + g for h in dense for g in range(group)]
        stream_rows = [h * group + g for h in stream_heads for g in range(group)]
        total_pages = -(-len(keys) // page_size) + 1
        kmax = np.zeros((total_pages, page_size // logical, len(dense), head_dim), dtype=np.float32)
        kmin = np.zeros_like(kmax)
        dense_keys = np.ascontiguousarray(keys[:, dense], dtype=np.float32)
        if dense:
            backend.page_stats_append(dense_keys[:num_prompt], np.arange(num_prompt, dtype=np.int64), kmax, kmin,
                                      page_size)
        stored: List[np.ndarray] = []
        layer_values: List[float] = []
        for step in range(num_steps):
            position = num_prompt - 1 + step
            num_keys = position + 1
            if step > 0 and dense:
                backend.page_stats_append(dense_keys[position:position + 1], np.array([position], dtype=np.int64),
                                          kmax, kmin, page_size)
            probs = attention_probs(queries[step], keys[:num_keys], scale)  # (num_qo_heads, num_keys)
            if stream_rows:
                prefill_window = step == 0 or not decoding
                sink = sparsity.prefill_sink_tokens if prefill_window else sparsity.decode_sink_tokens
                local = sparsity.prefill_local_tokens if prefill_window else sparsity.decode_local_tokens
                stream[step].append(_window_mass(probs[stream_rows], position, sink, local))
            if not dense:
                continue
            num_pages = -(-num_keys // page_size)
            dense_probs = probs[dense_rows]
            if num_pages <= num_select:
                fresh_recall = np.ones(len(dense_rows))
                selection = [np.arange(num_pages)] * len(dense)
            else:
                q = np.ascontiguousarray(queries[step][dense_rows][None], dtype=np.float32)
                selected = np.full((1, len(dense), num_select), -1, dtype=np.int32)
                counts = np.zeros((1, len(dense)), dtype=np.int32)
                backend.page_select(q, kmax, kmin, np.array([0, num_pages], dtype=np.int32),
                                    np.arange(num_pages, dtype=np.int32), np.array([num_keys], dtype=np.int32),
                                    selected, counts, page_size, bool(sparsity.always_select_sink_page),
                                    getattr(sparsity, "page_score", "bound"), getattr(sparsity, "group_score", "sum"),
                                    spread=getattr(sparsity, "page_score_spread", 0.0))
                selection = [selected[0, h, :counts[0, h]] for h in range(len(dense))]
                fresh_recall = selection_recall(dense_probs, selection, page_size)
            fresh[step].append(fresh_recall)
            mode = modes[step]
            if mode in ("prefill", "dense"):
                engine_recall = np.ones(len(dense_rows))
            elif mode == "fresh":
                stored = selection
                engine_recall = fresh_recall
            else:  # reuse: the stored selection below its base, every page from the base on
                newer = np.arange(bases[step], num_pages)
                engine_recall = selection_recall(dense_probs, [np.union1d(row, newer) for row in stored], page_size)
            engine[step].append(engine_recall)
            layer_values.append(float(engine_recall.mean()))
        per_layer.append(float(np.mean(layer_values)) if layer_values else None)

    def summary(values: List[np.ndarray]):
        if not values:  # no dense head in any layer
            return None, None
        flat = np.concatenate(values)
        return float(flat.mean()), float(flat.min())

    steps = []
    for step in range(num_steps):
        mean, low = summary(engine[step])
        fresh_mean, fresh_low = summary(fresh[step])
        steps.append({"mode": modes[step], "mean": mean, "min": low, "fresh_mean": fresh_mean, "fresh_min": fresh_low,
                      "stream_mean": float(np.concatenate(stream[step]).mean()) if stream[step] else None})
    num_heads = int(sum(len(v) for v in engine[0]))
    return {"steps": steps, "per_layer": per_layer, "num_heads": num_heads}
