"""Selection recall: the share of dense attention mass that the selected KV pages hold (numpy).

For one decode query, dense attention gives each key a probability; LServe's page selection keeps
a few pages per KV head (shared by the query heads of a GQA group). Recall of a query head =
sum of its probabilities over keys inside its KV head's selected pages (1.0 = nothing lost).
The page layout matches the page_select op: page p holds keys [p * page_size, (p + 1) * page_size),
`selected` lists page positions per KV head and `num_selected` how many entries are valid.

Example:
    >>> probs = np.array([[0.5, 0.25, 0.125, 0.125]])          # 1 query head, 4 keys
    >>> selection_recall(probs, selected=[[1]], page_size=2)    # keeps keys 2 and 3
    array([0.25])
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def attention_probs(query: np.ndarray, keys: np.ndarray, scale: Optional[float] = None) -> np.ndarray:
    """Dense softmax attention probabilities of one decode query.

    query: (num_qo_heads, head_dim); keys: (num_keys, num_kv_heads, head_dim), query head h reads
    KV head h // (num_qo_heads // num_kv_heads). Returns (num_qo_heads, num_keys) float64.
    """
    query = np.asarray(query, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    num_qo_heads, head_dim = query.shape
    num_keys, num_kv_heads, key_dim = keys.shape
    if key_dim != head_dim or num_qo_heads % num_kv_heads != 0:
        raise ValueError(f"query {query.shape} and keys {keys.shape} do not match (head_dim, GQA grouping)")
    scale = head_dim ** -0.5 if scale is None else scale
    group = num_qo_heads // num_kv_heads
    per_head_keys = np.repeat(keys.transpose(1, 0, 2), group, axis=0)  # (num_qo_heads, num_keys, head_dim)
    logits = np.einsum("hd,hkd->hk", query, per_head_keys) * scale
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def selection_recall(probs: np.ndarray, selected, page_size: int, num_selected=None) -> np.ndarray:
    """Share of each query head's attention mass inside its KV head's selected pages.

    probs: (num_qo_heads, num_keys) attention probabilities (rows sum to 1); selected:
    (num_kv_heads, num_select) page positions; num_selected: (num_kv_heads,) valid entries per row
    (default: all). Returns (num_qo_heads,) float64 in [0, 1].
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (num_qo_heads, num_keys), got shape {probs.shape}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    num_qo_heads, num_keys = probs.shape
    num_pages = -(-num_keys // page_size)
    rows = [np.asarray(row, dtype=np.int64).reshape(-1) for row in selected]
    num_kv_heads = len(rows)
    if num_kv_heads == 0 or num_qo_heads % num_kv_heads != 0:
        raise ValueError(f"{num_kv_heads} KV heads of selections do not divide {num_qo_heads} query heads")
    counts = [len(r) for r in rows] if num_selected is None else [int(c) for c in np.asarray(num_selected).reshape(-1)]
    if len(counts) != num_kv_heads:
        raise ValueError(f"num_selected has {len(counts)} entries, selected has {num_kv_heads} KV heads")
    # (num_pages,) mass per page and query head: pad the keys to whole pages.
    padded = np.zeros((num_qo_heads, num_pages * page_size))
    padded[:, :num_keys] = probs
    page_mass = padded.reshape(num_qo_heads, num_pages, page_size).sum(axis=2)
    group = num_qo_heads // num_kv_heads
    recall = np.empty(num_qo_heads)
    for kv_head, (row, count) in enumerate(zip(rows, counts)):
        pages = np.unique(row[:count])
        if pages.size and (pages.min() < 0 or pages.max() >= num_pages):
            raise ValueError(f"KV head {kv_head}: selected page {pages.max() if pages.max() >= num_pages else pages.min()} "
                             f"is outside [0, {num_pages})")
        heads = slice(kv_head * group, (kv_head + 1) * group)
        recall[heads] = page_mass[heads][:, pages].sum(axis=1) / page_mass[heads].sum(axis=1)
    return recall


def selection_recall_from_qk(query: np.ndarray, keys: np.ndarray, selected, page_size: int, num_selected=None,
                             scale: Optional[float] = None) -> np.ndarray:
    """selection_recall of the dense attention of `query` over `keys` (see attention_probs)."""
    return selection_recall(attention_probs(query, keys, scale), selected, page_size, num_selected)
