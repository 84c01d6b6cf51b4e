"""An independent reference of LServe sparse attention on a Hugging Face model (torch, float64 masks).

It replaces the model's attention with dense masked attention that follows the method's rules
literally on the full key tensor: streaming heads see sink + local keys (Lambda mask; the prefill
window for prompt forwards, the decode window for single-token steps); dense heads see every causal
key in prefill and, at decode once the context exceeds the budget, only the keys of the physical
pages chosen by hierarchical paging (logical-page kmax/kmin bounds, S = sum_d max(q_d kmax_d,
q_d kmin_d) summed over the GQA group, physical page = max of its logical pages, top pages with the
newest recent_pages and the first page always kept, ties to the earlier page), reused for
reuse_interval steps plus every page created since. With head_budgets each dense head selects its own
number of pages, and a sequence selects once its pages exceed the smallest budget (a head whose budget
covers the pages reads them all). Nothing here is shared with lserve's implementation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

torch = __import__("torch")


@dataclass
class SparseSpec:
    streaming: List[List[bool]]  # (layers, kv heads)
    prefill_sink: int
    prefill_local: int
    decode_sink: int
    decode_local: int
    page_size: int
    logical_page_size: int
    budget: int
    reuse_interval: int = 1
    keep_first_page: bool = True
    page_score: str = "bound"
    page_score_spread: float = 0.0  # "blend"'s weight of the spread term
    recent_pages: int = 1  # the newest pages every selection keeps
    head_budgets: Optional[List[List[int]]] = None  # (layers, kv heads) tokens, streaming heads ignored
    # per (layer, kv head): (selected physical pages, steps since made, pages when made)
    state: Dict[Tuple[int, int], Tuple[List[int], int, int]] = field(default_factory=dict)
    selections: List[Tuple[int, int, List[int]]] = field(default_factory=list)  # (layer, head, pages) per decode


def page_scores(q_group: np.ndarray, keys: np.ndarray, page_size: int, logical: int,
                page_score: str = "bound", spread: float = 0.0) -> np.ndarray:
    """Physical page scores for one KV head: q_group (group, d), keys (kv_len, d). "bound":
    sum max(q kmax, q kmin) per logical page; "center": sum q (kmax + kmin) / 2; "blend": the centre
    plus spread x sum |q| (kmax - kmin) / 2."""
    kv_len = keys.shape[0]
    num_pages = -(-kv_len // page_size)
    scores = np.full(num_pages, -np.inf)
    for start in range(0, kv_len, logical):
        block = keys[start:start + logical]
        kmax, kmin = block.max(axis=0), block.min(axis=0)
        if page_score == "center":
            s = (q_group * ((kmax + kmin) / 2)).sum()
        elif page_score == "blend":
            s = (q_group * ((kmax + kmin) / 2) + spread * (np.abs(q_group) * ((kmax - kmin) / 2))).sum()
        else:
            s = np.maximum(q_group * kmax, q_group * kmin).sum()
        page = start // page_size
        scores[page] = max(scores[page], s)
    return scores


def select_pages(scores: np.ndarray, num_select: int, keep_first: bool, recent: int = 1) -> List[int]:
    num_pages = scores.size
    if num_pages <= num_select:
        return list(range(num_pages))
    chosen = set(range(num_pages - recent, num_pages))
    if keep_first:
        chosen.add(0)
    order = sorted(range(num_pages), key=lambda p: (-scores[p], p))
    for p in order:
        if len(chosen) >= num_select:
            break
        chosen.add(p)
    return sorted(chosen)


def make_attention(spec: SparseSpec):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        _, nq, q_len, d = query.shape
        nkv, kv_len = key.shape[1], key.shape[2]
        group = nq // nkv
        scale = scaling if scaling is not None else d ** -0.5
        decode = q_len == 1 and kv_len > 1
        q64, k64, v64 = query[0].double(), key[0].double(), value[0].double()
        pos_q = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
        pos_k = torch.arange(kv_len).unsqueeze(0)
        causal = pos_k <= pos_q
        out = torch.zeros(q_len, nq, d, dtype=torch.float64)
        for h in range(nkv):
            mask = causal.clone()
            if spec.streaming[layer][h]:
                sink, local = (spec.decode_sink, spec.decode_local) if decode else (spec.prefill_sink, spec.prefill_local)
                mask &= (pos_k < sink) | (pos_k > pos_q - local)
            elif decode:
                num_pages = -(-kv_len // spec.page_size)
                num_select = spec.budget // spec.page_size
                smallest = num_select
                if spec.head_budgets is not None:
                    dense = [b for row, flags in zip(spec.head_budgets, spec.streaming)
                             for b, streams in zip(row, flags) if not streams]
                    smallest = min(dense) // spec.page_size
                    num_select = spec.head_budgets[layer][h] // spec.page_size
                if num_pages > smallest:
                    prev = spec.state.get((layer, h))
                    if prev is None or prev[1] >= spec.reuse_interval:
                        qg = q64[h * group:(h + 1) * group, 0].numpy()
                        pages = select_pages(page_scores(qg, k64[h].numpy(), spec.page_size, spec.logical_page_size,
                                                         spec.page_score, spec.page_score_spread),
                                             num_select, spec.keep_first_page, spec.recent_pages)
                        spec.state[(layer, h)] = (pages, 1, num_pages)
                    else:
                        spec.state[(layer, h)] = (prev[0], prev[1] + 1, prev[2])
                    pages, _, base = spec.state[(layer, h)]
                    visible = sorted(set(p for p in pages if p < base) | set(range(base, num_pages)))
                    spec.selections.append((layer, h, visible))
                    allowed = torch.zeros(kv_len, dtype=torch.bool)
                    for p in visible:
                        allowed[p * spec.page_size:(p + 1) * spec.page_size] = True
                    mask &= allowed.unsqueeze(0)
            for g in range(group):
                qh = h * group + g
                s = (q64[qh] @ k64[h].T) * scale
                s = s.masked_fill(~mask, float("-inf"))
                out[:, qh] = torch.softmax(s, dim=-1) @ v64[h]
        return out.to(query.dtype).unsqueeze(0), None

    return attention


def use_reference(model, spec: SparseSpec, name: str = "lserve_sparse_reference") -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(name, make_attention(spec))
    model.set_attn_implementation(name)
