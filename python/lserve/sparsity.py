"""SparsityConfig and head patterns: which (layer, KV head) pairs stream, and the sparse budgets.

A head pattern is a score per (layer, KV head), higher meaning "needs full attention". DuoAttention
releases them as ``full_attention_heads.tsv`` (one row per layer, one tab-separated column per KV
head, gate values in [0, 1]); lserve writes the same layout with ``#`` comment lines on top.
The streaming heads are the lowest-scoring ``streaming_fraction`` of all heads of all layers
together (DuoAttention's global quantile); ties go to the lower (layer, head) index.
Streaming heads (streaming_fraction > 0) need a pattern: the user's, or the one lserve ships for the
model (resolve_sparsity fills it in); without either, building the mask raises ValueError.

Example:
    >>> cfg = SparsityConfig.preset("lserve", head_pattern=[[0.9, 0.1], [0.2, 0.8]])
    >>> cfg.streaming_mask(num_layers=2, num_kv_heads=2)
    [[False, True], [True, False]]
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Union

import numpy as np

PRESETS = ("dense", "lserve")


def read_head_scores(path: Union[str, os.PathLike]) -> np.ndarray:
    """(num_layers, num_kv_heads) float64 scores from a DuoAttention or lserve TSV file."""
    rows = []
    with open(path, "r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                rows.append([float(v) for v in line.replace(",", "\t").split()])
            except ValueError:
                raise ValueError(f"{path}:{line_no}: not a row of numbers: {line[:60]!r}") from None
    if not rows:
        raise ValueError(f"{path}: no head scores found")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: rows have different numbers of heads {sorted(widths)}")
    scores = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError(f"{path}: head scores must be finite")
    return scores


def write_head_scores(path: Union[str, os.PathLike], scores: np.ndarray, comment: str = "") -> None:
    """Writes (num_layers, num_kv_heads) scores in DuoAttention's TSV layout (lserve adds a comment)."""
    scores = np.asarray(scores, dtype=np.float64)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("# lserve head pattern: rows = layers, columns = KV heads, higher = full attention\n")
        for line in comment.splitlines():
            handle.write(f"# {line}\n")
        for row in scores:
            handle.write("\t".join(f"{v:.6f}" for v in row) + "\n")


def default_head_pattern(model: Optional[str]):
    """The calibrated pattern (a pathlib.Path to a TSV) lserve ships for `model` (a name, a .gguf
    file or a Hugging Face directory), or None. See lserve/patterns/."""
    from lserve.patterns import pattern_path

    return pattern_path(model)


def streaming_mask_from_scores(scores: np.ndarray, streaming_fraction: float) -> np.ndarray:
    """Boolean (num_layers, num_kv_heads): the lowest-scoring fraction of all heads stream."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0.0 <= streaming_fraction <= 1.0:
        raise ValueError(f"streaming_fraction must be in [0, 1], got {streaming_fraction}")
    flat = scores.reshape(-1)
    num_streaming = int(round(streaming_fraction * flat.size))
    # Stable sort on the score: equal scores keep (layer, head) order, so ties are deterministic.
    order = np.argsort(flat, kind="stable")
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:num_streaming]] = True
    return mask.reshape(scores.shape)


# The fields Engine.set_decode_sparsity may change between requests (none sizes memory or shapes
# prefill); lserve::SparsityConfig::layout_difference names the first other field that differs.
DECODE_FIELDS = ("decode_token_budget", "select_recent_tokens", "head_budget_skew", "selection_reuse_interval",
                 "always_select_sink_page", "page_score", "page_score_spread", "group_score")


def layout_key(config: "SparsityConfig") -> tuple:
    """What two configs must share to run on one Engine with set_decode_sparsity between them:
    every init field outside DECODE_FIELDS (arrays compared by value)."""
    from dataclasses import fields

    key = []
    for f in fields(config):
        if not f.init or f.name in DECODE_FIELDS:
            continue
        value = getattr(config, f.name)
        if isinstance(value, np.ndarray):
            value = (value.shape, value.tolist())
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        key.append((f.name, repr(value)))
    return tuple(key)


@dataclass
class SparsityConfig:
    """LServe sparse attention settings: lserve::SparsityConfig's (whose validate() checks them, so a
    bad value raises its ValueError naming the field) plus the head pattern, which only Python reads.

    head_pattern: a TSV path or a (num_layers, num_kv_heads) array of scores; the lowest-scoring
    streaming_fraction of the heads stream. streaming_heads: an explicit per-layer list of
    streaming KV head indices, instead of scores. With neither, the Engine (resolve_sparsity) takes
    the pattern lserve ships for the model; when there is none and streaming_fraction > 0,
    streaming_mask and to_core raise ValueError (pass head_pattern= from `lserve calibrate`, or
    streaming_heads=, or set streaming_fraction=0.0 for page selection alone, no streaming heads).
    Token counts: prefill sink/local (Lambda mask in prefill), decode sink/local
    (streaming heads at decode), physical/logical page sizes (hierarchical paging), the decode
    token budget of dense heads, the selection reuse interval, and a context length below which a
    sequence runs dense. page_score: how a logical page is scored from its kmax/kmin, "bound" (the
    paper's upper bound sum_d max(q_d kmax_d, q_d kmin_d)) or "center" (sum_d q_d (kmax_d + kmin_d) / 2,
    the bound without its spread term; same statistics, no extra memory) or "blend" (the centre plus
    page_score_spread times the spread term sum_d |q_d| (kmax_d - kmin_d) / 2: 0 is the centre, 1 the
    bound; page_score_spread is read by "blend" only). group_score: how the query
    heads of a GQA group share one selection, "sum" of their scores (the paper's), "max" over heads,
    or "mass" (each head's page scores as a softmax over pages, summed: every head gets the same say).
    select_recent_tokens: the newest tokens (rounded up to whole physical pages) every fresh selection
    of a dense head keeps, inside its budget; 0 keeps the newest page alone. head_budget_skew: 0 gives
    every dense head decode_token_budget; s > 0 gives dense head h a budget proportional to
    score_h ** s (its head-pattern score, so it needs head_pattern), scaled so that the dense heads'
    mean stays decode_token_budget (whole pages, at least the forced pages plus one): the heads the
    pattern rates closest to full attention read more pages, the others fewer, for the same pages per
    step in all (to_core writes the per-head budgets, lserve::SparsityConfig::head_token_budgets).
    """

    enabled: bool = True
    head_pattern: Optional[Union[str, os.PathLike, np.ndarray, Sequence[Sequence[float]]]] = None
    streaming_heads: Optional[List[List[int]]] = None
    streaming_fraction: float = 0.5
    prefill_sink_tokens: int = 128
    prefill_local_tokens: int = 8192
    decode_sink_tokens: int = 128
    decode_local_tokens: int = 256
    physical_page_size: int = 64
    logical_page_size: int = 16
    decode_token_budget: int = 4096
    selection_reuse_interval: int = 4
    dense_below_tokens: int = 0
    always_select_sink_page: bool = True
    page_score: str = "bound"
    group_score: str = "sum"
    page_score_spread: float = 0.25
    select_recent_tokens: int = 0
    head_budget_skew: float = 0.0
    _scores: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._settings_core()  # the token counts, page sizes and scores: the C++ rules raise ValueError
        if not 0.0 <= self.streaming_fraction <= 1.0:
            raise ValueError(f"streaming_fraction must be in [0, 1], got {self.streaming_fraction}")
        if not (isinstance(self.head_budget_skew, (int, float)) and not isinstance(self.head_budget_skew, bool)
                and 0.0 <= self.head_budget_skew <= 16.0):
            raise ValueError(f"head_budget_skew must be a number in [0, 16] (0: every dense head gets "
                             f"decode_token_budget), got {self.head_budget_skew!r}")
        if self.head_pattern is not None and self.streaming_heads is not None:
            raise ValueError("give head_pattern (scores) or streaming_heads (explicit lists), not both")
        if self.head_pattern is not None:
            if isinstance(self.head_pattern, (str, os.PathLike)):
                self._scores = read_head_scores(self.head_pattern)
            else:
                self._scores = np.asarray(self.head_pattern, dtype=np.float64)
                if self._scores.ndim != 2 or not np.isfinite(self._scores).all():
                    raise ValueError("head_pattern scores must be a finite (num_layers, num_kv_heads) array")

    # The settings lserve::SparsityConfig holds as they are (streaming heads come from the pattern).
    _CORE_FIELDS = ("enabled", "prefill_sink_tokens", "prefill_local_tokens", "decode_sink_tokens",
                    "decode_local_tokens", "physical_page_size", "logical_page_size", "decode_token_budget",
                    "selection_reuse_interval", "dense_below_tokens", "always_select_sink_page", "page_score",
                    "group_score", "page_score_spread", "select_recent_tokens")

    def _settings_core(self):
        """A _C.SparsityConfig holding these settings, validated (SparsityConfig::validate()); its
        setters and validate() raise ValueError naming the field and the value."""
        from lserve import _C

        core = _C.SparsityConfig()
        for name in self._CORE_FIELDS:
            setattr(core, name, getattr(self, name))
        core.validate()
        return core

    @classmethod
    def preset(cls, name: str, model: Optional[str] = None, **overrides) -> "SparsityConfig":
        """"dense": sparsity off (never needs a pattern). "lserve": the paper's settings (half the
        heads streaming, prefill sink/local 128/8192, decode sink/local 128/256, pages 64/16, budget
        4096, reuse 4). With `model` and neither head_pattern nor streaming_heads given, "lserve"
        takes the head pattern lserve ships for that model (default_head_pattern); without one,
        streaming_mask and to_core raise ValueError unless streaming_fraction=0.0. With `model`,
        "lserve" also takes the page selection settings lserve ships for it
        (lserve.patterns.selection_policy; SmolLM2: page_score "blend" with spread 0.25, group_score
        "max", logical pages of 4 tokens in physical pages of 16, head_budget_skew 4, chosen on the
        retrieval benchmark's dev split) for the fields `overrides` does not set; the skew only when
        the config has a head pattern to take the scores from (explicit streaming_heads, or
        streaming_fraction=0 without a pattern, keep equal budgets).

        Example:
            >>> SparsityConfig.preset("lserve", model="smollm2-135m-instruct").head_pattern.endswith(".tsv")
            True
            >>> SparsityConfig.preset("lserve", streaming_fraction=0.0).streaming_mask(1, 2)  # selection only
            [[False, False]]
        """
        if name == "dense":
            return cls(enabled=False, **overrides)
        if name == "lserve":
            from lserve.patterns import selection_policy

            config = cls(enabled=True, **{**selection_policy(model), **overrides})._with_shipped_pattern(model)
            if config.head_pattern is None and "head_budget_skew" not in overrides and config.head_budget_skew:
                config = config.with_overrides(head_budget_skew=0.0)  # no scores to weigh the heads by
            return config
        raise ValueError(f"unknown sparsity preset {name!r} (known: {', '.join(PRESETS)})")

    def with_overrides(self, **overrides) -> "SparsityConfig":
        return replace(self, **overrides)

    def _needs_head_pattern(self) -> bool:
        """True when streaming heads are asked for (enabled, streaming_fraction > 0) and neither
        head_pattern nor streaming_heads says which."""
        return (self.enabled and self.streaming_fraction > 0.0 and self.head_pattern is None
                and self.streaming_heads is None)

    def _with_shipped_pattern(self, model: Optional[str]) -> "SparsityConfig":
        """This config, or a copy with the pattern lserve ships for `model` (a name, a .gguf file or
        a Hugging Face directory) when _needs_head_pattern() and there is one; self is not changed."""
        if not self._needs_head_pattern():
            return self
        pattern = default_head_pattern(model)
        return self if pattern is None else replace(self, head_pattern=str(pattern))

    def streaming_mask(self, num_layers: int, num_kv_heads: int) -> List[List[bool]]:
        """(num_layers, num_kv_heads) flags, True for a streaming head."""
        if not self.enabled:
            return [[False] * num_kv_heads for _ in range(num_layers)]
        if self.streaming_heads is not None:
            if len(self.streaming_heads) != num_layers:
                raise ValueError(f"streaming_heads lists {len(self.streaming_heads)} layers, the model has {num_layers}")
            mask = [[False] * num_kv_heads for _ in range(num_layers)]
            for layer_idx, heads in enumerate(self.streaming_heads):
                for head in heads:
                    if not isinstance(head, int) or not 0 <= head < num_kv_heads:
                        raise ValueError(f"streaming_heads[{layer_idx}] has head {head!r}, outside [0, {num_kv_heads})")
                    mask[layer_idx][head] = True
            return mask
        if self._scores is None:
            if self._needs_head_pattern():
                raise ValueError(
                    f"streaming_fraction={self.streaming_fraction} asks for streaming heads, but no head pattern "
                    "was given and lserve ships none for this model (lserve/patterns/): pass head_pattern= "
                    "(a TSV made by `lserve calibrate --model M --out pattern.tsv`, or a (layers, KV heads) "
                    "array of scores) or streaming_heads= (per-layer lists of KV head indices), or set "
                    "streaming_fraction=0.0 for selection-only sparsity (no streaming heads)")
            return [[False] * num_kv_heads for _ in range(num_layers)]
        if self._scores.shape != (num_layers, num_kv_heads):
            raise ValueError(f"head pattern has shape {self._scores.shape}, the model has "
                             f"({num_layers}, {num_kv_heads}) (layers, KV heads)")
        return streaming_mask_from_scores(self._scores, self.streaming_fraction).tolist()

    def to_core(self, num_layers: int, num_kv_heads: int):
        """The C++ config (lserve._C.SparsityConfig) for a model of this shape. Raises ValueError as
        streaming_mask does (streaming heads asked for without a pattern)."""
        core = self._settings_core()
        if self.enabled:
            mask = self.streaming_mask(num_layers, num_kv_heads)
            core.streaming_heads = [1 if flag else 0 for row in mask for flag in row]
            if self.head_budget_skew > 0.0:
                core.head_token_budgets = self.head_token_budgets(np.asarray(mask, dtype=bool)).reshape(-1).tolist()
        core.validate(num_layers, num_kv_heads)
        return core

    def head_token_budgets(self, streaming: np.ndarray) -> np.ndarray:
        """(num_layers, num_kv_heads) int decode budgets in tokens for head_budget_skew (0 for streaming
        heads): dense head h gets round(budget_pages * w_h / mean(w)) pages, w = max(score, 0) **
        head_budget_skew, at least the pages every selection forces plus one."""
        if self._scores is None:
            raise ValueError(f"head_budget_skew={self.head_budget_skew} weighs the dense heads' budgets by their "
                             "head-pattern scores, but this config has none: pass head_pattern= (a TSV or an array "
                             "of scores) or set head_budget_skew=0")
        if self._scores.shape != streaming.shape:
            raise ValueError(f"head pattern has shape {self._scores.shape}, the model has {streaming.shape} "
                             "(layers, KV heads)")
        page = self.physical_page_size
        dense = ~streaming
        budgets = np.zeros(streaming.shape, dtype=np.int64)
        if not dense.any():
            return budgets
        weights = np.maximum(self._scores[dense], 0.0) ** self.head_budget_skew
        mean = weights.mean()
        pages = self.decode_token_budget // page
        if mean > 0.0:
            share = np.rint(pages * weights / mean).astype(np.int64)
        else:
            share = np.full(weights.shape, pages, dtype=np.int64)
        floor = self._settings_core().forced_pages + 1  # the forced pages plus one scored page
        budgets[dense] = np.maximum(share, floor) * page
        return budgets


def resolve_sparsity(sparsity: Union[None, str, SparsityConfig], model: object = None) -> SparsityConfig:
    """Engine(sparsity=...): None / "dense" / "lserve" / a SparsityConfig, for `model` (a name or a
    path). A config that asks for streaming heads without a pattern (enabled, streaming_fraction > 0,
    neither head_pattern nor streaming_heads; the "lserve" preset, or e.g.
    SparsityConfig(decode_token_budget=1024)) gets the pattern lserve ships for the model, in a copy
    (the caller's object is not changed). Without a shipped pattern it is returned as is, and its
    streaming_mask / to_core raise ValueError. None, "dense" and disabled configs never need one.

    Example:
        >>> cfg = resolve_sparsity(SparsityConfig(decode_token_budget=1024), "smollm2-135m-instruct")
        >>> cfg.head_pattern.endswith("patterns/smollm2-135m-instruct.tsv")
        True
    """
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if sparsity is None:
        return SparsityConfig.preset("dense")
    if isinstance(sparsity, SparsityConfig):
        return sparsity._with_shipped_pattern(name)
    if isinstance(sparsity, str):
        return SparsityConfig.preset(sparsity, model=name)
    raise ValueError(f"sparsity must be None, a preset name ({', '.join(PRESETS)}) or a SparsityConfig, "
                     f"got {type(sparsity).__name__}")
