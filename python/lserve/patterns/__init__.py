"""Calibrated head patterns shipped with lserve (package data), one TSV per model.

Each file is `lserve calibrate` output (DuoAttention gates, rows = layers, columns = KV heads); its
comment lines record the settings. `pattern_path(model)` finds the one for a model name, a .gguf
file or a Hugging Face directory, or returns None. `selection_policy(model)` gives the page
selection settings chosen for the same model (the "lserve" preset applies them).

Example:
    >>> pattern_path("HuggingFaceTB/SmolLM2-135M-Instruct").name
    'smollm2-135m-instruct.tsv'
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

# Lower-case model names (and Hugging Face repository ids) -> shipped file.
PATTERNS = {
    "smollm2-135m-instruct": "smollm2-135m-instruct.tsv",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct.tsv",
}

# Page selection settings per shipped pattern, chosen on the dev split of `lserve eval retrieval` and
# checked on its heldout split (docs/ACCURACY.md, rounds 3 and 4); SparsityConfig.preset("lserve",
# model=...) applies them to the fields its caller does not set (head_budget_skew only where the
# config has head scores to weigh: a head pattern, the shipped one or the caller's).
SELECTION_POLICIES = {
    "smollm2-135m-instruct.tsv": {"page_score": "blend", "page_score_spread": 0.25, "group_score": "max",
                                  "logical_page_size": 4, "physical_page_size": 16, "head_budget_skew": 4.0},
}


def _candidates(model: str):
    text = str(model).strip()
    yield text.lower()
    path = pathlib.Path(text).expanduser()
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct"
    yield path.name.lower().split(".")[0]
    config = path / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path") or ""
        except (OSError, ValueError):
            name = ""
        if name:
            yield name.lower()
            yield name.lower().rsplit("/", 1)[-1]
    yield path.name.lower()


def pattern_path(model: Optional[str]) -> Optional[pathlib.Path]:
    """The shipped pattern file for `model`, or None when lserve ships none for it."""
    if not model:
        return None
    for candidate in _candidates(os.fspath(model)):
        file_name = PATTERNS.get(candidate)
        if file_name:
            return pathlib.Path(__file__).with_name(file_name)
    return None


def selection_policy(model: Optional[str]) -> dict:
    """The page selection settings lserve ships for `model` (SparsityConfig field -> value), or {}.

    Example:
        >>> selection_policy("smollm2-135m-instruct")["group_score"]
        'max'
    """
    path = pattern_path(model)
    return dict(SELECTION_POLICIES.get(path.name, {})) if path is not None else {}
