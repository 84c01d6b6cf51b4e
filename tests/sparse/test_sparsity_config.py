"""SparsityConfig validation, presets and head-pattern selection (DuoAttention's global quantile)."""
from __future__ import annotations

import numpy as np
import pytest

from lserve.sparsity import SparsityConfig, read_head_scores, streaming_mask_from_scores, write_head_scores


def test_presets():
    assert not SparsityConfig.preset("dense").enabled
    cfg = SparsityConfig.preset("lserve")
    assert (cfg.prefill_sink_tokens, cfg.prefill_local_tokens) == (128, 8192)
    assert (cfg.decode_sink_tokens, cfg.decode_local_tokens) == (128, 256)
    assert (cfg.physical_page_size, cfg.logical_page_size, cfg.decode_token_budget) == (64, 16, 4096)
    assert cfg.selection_reuse_interval == 4
    with pytest.raises(ValueError, match="preset"):
        SparsityConfig.preset("sparse-ish")


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(logical_page_size=24), "divide"), (dict(decode_token_budget=32), "below one physical page"),
    (dict(selection_reuse_interval=0), "selection_reuse_interval"), (dict(streaming_fraction=1.5), "streaming_fraction"),
    (dict(decode_local_tokens=0), "decode_local_tokens"), (dict(prefill_sink_tokens=-1), "prefill_sink_tokens"),
    (dict(head_pattern=[[0.1]], streaming_heads=[[0]]), "not both"), (dict(page_score="mean"), "page_score"),
])
def test_invalid_combinations(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SparsityConfig(**kwargs)


def test_global_quantile_against_sorted_reference():
    rng = np.random.default_rng(0)
    scores = rng.random((30, 3))
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        mask = streaming_mask_from_scores(scores, fraction)
        k = int(round(fraction * scores.size))
        threshold_set = set(np.argsort(scores.reshape(-1))[:k].tolist())
        assert set(np.flatnonzero(mask.reshape(-1)).tolist()) == threshold_set
        # every streaming head scores at most every dense head
        if 0 < k < scores.size:
            assert scores[mask].max() <= scores[~mask].min()


def test_ties_are_deterministic_and_favour_lower_index():
    scores = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert streaming_mask_from_scores(scores, 0.5).tolist() == [[True, True], [False, False]]


def test_tsv_round_trip_and_duoattention_format(tmp_path):
    duo = tmp_path / "full_attention_heads.tsv"
    duo.write_text("0.9\t0.1\t0.5\n0.05\t0.8\t0.3\n")
    scores = read_head_scores(duo)
    assert scores.shape == (2, 3)
    ours = tmp_path / "pattern.tsv"
    write_head_scores(ours, scores, comment="model=test")
    assert np.array_equal(read_head_scores(ours), scores)
    cfg = SparsityConfig(head_pattern=str(duo), streaming_fraction=0.5)
    assert cfg.streaming_mask(2, 3) == [[False, True, False], [True, False, True]]
    with pytest.raises(ValueError, match="shape"):
        cfg.streaming_mask(3, 3)


def test_bad_tsv(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(ValueError, match="different numbers"):
        read_head_scores(bad)
    bad.write_text("0.1\tabc\n")
    with pytest.raises(ValueError, match="not a row of numbers"):
        read_head_scores(bad)


def test_explicit_lists():
    cfg = SparsityConfig(streaming_heads=[[0], [], [1, 2]])
    assert cfg.streaming_mask(3, 3) == [[True, False, False], [False, False, False], [False, True, True]]
    with pytest.raises(ValueError, match="outside"):
        SparsityConfig(streaming_heads=[[5]]).streaming_mask(1, 3)
    assert SparsityConfig.preset("dense", head_pattern=[[0.1, 0.9]]).streaming_mask(1, 2) == [[False, False]]


def test_engine_preset_takes_the_shipped_pattern_for_the_model():
    import pathlib

    from lserve.patterns import pattern_path
    from lserve.sparsity import resolve_sparsity

    shipped = pattern_path("smollm2-135m-instruct")
    gguf = pathlib.Path("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_sparsity("lserve", gguf).head_pattern == str(shipped)
    assert resolve_sparsity("lserve", "smollm2-135m-instruct").head_pattern == str(shipped)
    assert resolve_sparsity("lserve", "/models/other-model").head_pattern is None
    assert not resolve_sparsity("dense", gguf).enabled
