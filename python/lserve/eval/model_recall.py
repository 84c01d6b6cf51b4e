"""Selection recall on a real model: how much dense attention mass LServe's page selection keeps.

For a prompt, transformers runs the model once (fp32) with an attention function that records, per
layer, the post-RoPE query of the last prompt position (the query that produces the first
generated token) and the keys of every position. For each dense (layer, KV head) of a
SparsityConfig, lserve's own ops build the per-logical-page kmax/kmin (`_C.page_stats_append`)
and pick the pages (`_C.page_select`, the op the engine's decode step calls, with its budget,
page sizes and sink-page option); `selection_recall` then measures the share of each query
head's dense attention probability that falls in the selected pages. Streaming heads select
nothing and are left out. Contexts within the budget keep every page (recall 1).

Example:
    >>> report = model_selection_recall("smollm2-135m-instruct", prompt_ids, SparsityConfig.preset(
    ...     "lserve", model="smollm2-135m-instruct", decode_token_budget=1024))
    >>> report["mean"], report["min"]
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from lserve.eval.recall import selection_recall

_ATTENTION_NAME = "lserve_capture_qk"


class QKCapture:
    """A transformers model whose attention records (last query, all keys) per layer.

    `capture(prompt_ids)` returns {layer: (query (num_qo_heads, head_dim), keys (num_keys,
    num_kv_heads, head_dim))}, both float32 numpy, post-RoPE, before any GQA expansion.
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
        records = self._records

        def capture_attention(module, query, key, value, attention_mask, **kwargs):
            # query (batch, num_qo_heads, T, D), key (batch, num_kv_heads, T, D), batch 1.
            records[int(module.layer_idx)] = (query[0, :, -1].detach().float().numpy().copy(),
                                              key[0].detach().float().permute(1, 0, 2).numpy().copy())
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(_ATTENTION_NAME, capture_attention)
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(_ATTENTION_NAME)
        else:
            self.model.config._attn_implementation = _ATTENTION_NAME

    def capture(self, prompt_ids: Sequence[int]) -> Dict[int, tuple]:
        torch = self._torch
        self._records.clear()
        with torch.no_grad():
            self.model(torch.tensor([list(prompt_ids)], dtype=torch.long), use_cache=False,
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
    _C.page_stats_append(k, np.arange(num_keys, dtype=np.int64), kmax, kmin, page_size)
    selected = np.full((1, len(dense_heads), num_select), -1, dtype=np.int32)
    counts = np.zeros((1, len(dense_heads)), dtype=np.int32)
    _C.page_select(q, kmax, kmin, np.array([0, num_pages], dtype=np.int32), np.arange(num_pages, dtype=np.int32),
                   np.array([num_keys], dtype=np.int32), selected, counts, page_size,
                   bool(sparsity.always_select_sink_page), getattr(sparsity, "page_score", "bound"))
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
