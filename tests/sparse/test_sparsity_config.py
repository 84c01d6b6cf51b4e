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


CORE_INVALID = [
    ("prefill_sink_tokens", -1), ("decode_sink_tokens", -5), ("dense_below_tokens", -1),
    ("prefill_local_tokens", 0), ("decode_local_tokens", 0), ("physical_page_size", 0), ("logical_page_size", 0),
    ("decode_token_budget", 0), ("selection_reuse_interval", 0),
    ("decode_local_tokens", 1.5), ("physical_page_size", "64"), ("decode_token_budget", True),
    ("prefill_local_tokens", 2**40), ("always_select_sink_page", "yes"), ("group_score", "median"),
    ("page_score", "mean"), ("page_score_spread", 1.5), ("page_score_spread", -0.5), ("page_score_spread", "wide"),
    ("select_recent_tokens", -1), ("select_recent_tokens", 4096), ("select_recent_tokens", 0.5),
]


@pytest.mark.parametrize("field, value", CORE_INVALID, ids=[f"{f}={v!r}" for f, v in CORE_INVALID])
def test_settings_are_checked_by_the_core(field, value):
    """Each setting's rule lives in lserve::SparsityConfig (or its binding's conversion): the
    ValueError names the field and the value, and is the very message _C.SparsityConfig raises."""
    from lserve import _C

    with pytest.raises(ValueError, match=field) as info:
        SparsityConfig(**{field: value})
    shown = value if isinstance(value, str) else repr(value)
    assert str(shown) in str(info.value), info.value
    core = _C.SparsityConfig()
    with pytest.raises(ValueError) as core_info:
        setattr(core, field, value)
        core.validate()
    assert str(core_info.value) == str(info.value)


def test_to_core_checks_the_model_shape():
    """streaming_heads come from the pattern; the core checks them against the model's shape."""
    cfg = SparsityConfig(streaming_heads=[[0], [1]])
    core = cfg.to_core(num_layers=2, num_kv_heads=2)
    assert list(core.streaming_heads) == [1, 0, 0, 1]
    core.streaming_heads = [1, 0, 0]
    with pytest.raises(ValueError, match=r"streaming_heads has 3 entries.*= 4"):
        core.validate(2, 2)


def test_recent_tokens_and_head_budgets_are_checked():
    # The recent pages and the sink page must fit the budget.
    with pytest.raises(ValueError, match=r"decode_token_budget 128 holds 2 pages .* at least 3"):
        SparsityConfig(physical_page_size=64, decode_token_budget=128, select_recent_tokens=65)
    SparsityConfig(physical_page_size=64, decode_token_budget=128, select_recent_tokens=65, always_select_sink_page=False)
    for skew in (-1.0, 17.0, "big", True):
        with pytest.raises(ValueError, match="head_budget_skew"):
            SparsityConfig(head_budget_skew=skew)
    with pytest.raises(ValueError, match="head_budget_skew=2.0 weighs .* has none"):
        SparsityConfig(streaming_heads=[[0], [1]], head_budget_skew=2.0).to_core(2, 2)
    core = SparsityConfig(streaming_heads=[[0], [1]]).to_core(2, 2)
    core.head_token_budgets = [0, 1024, 1024]
    with pytest.raises(ValueError, match=r"head_token_budgets has 3 entries.*= 4"):
        core.validate(2, 2)
    core.head_token_budgets = [0, 1024, 64, 0]  # layer 1 head 0 is dense: one page is below the sink + newest
    with pytest.raises(ValueError, match=r"layer 1 KV head 0 \(dense\) has 64 tokens.* at least 2 pages"):
        core.validate(2, 2)
    core.head_token_budgets = [-5, 1024, 128, 0]
    with pytest.raises(ValueError, match=r"head_token_budgets\[0\] must be >= 0, got -5"):
        core.validate(2, 2)


def test_head_budgets_follow_the_scores_and_keep_the_mean():
    scores = np.array([[0.9, 0.1, 1.0], [0.2, 0.6, 0.8]])
    cfg = SparsityConfig(head_pattern=scores, streaming_fraction=1 / 3, physical_page_size=16,
                         decode_token_budget=1024, head_budget_skew=2.0)
    mask = np.asarray(cfg.streaming_mask(2, 3))
    budgets = cfg.head_token_budgets(mask)
    assert (budgets[mask] == 0).all() and (budgets % 16 == 0).all()
    dense = scores[~mask]
    expected = np.rint(64 * dense ** 2 / (dense ** 2).mean()) * 16
    assert budgets[~mask].tolist() == expected.tolist()
    assert abs(budgets[~mask].mean() - 1024) <= 16  # the mean budget, up to rounding to pages
    core = cfg.to_core(2, 3)
    assert list(core.head_token_budgets) == budgets.reshape(-1).tolist()
    assert list(SparsityConfig(head_pattern=scores, streaming_fraction=1 / 3).to_core(2, 3).head_token_budgets) == []


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


def test_lserve_preset_takes_the_shipped_selection_policy_for_the_model():
    """SmolLM2's policy (docs/ACCURACY.md, chosen on dev, checked on heldout) fills the fields the
    caller leaves unset; an explicit SparsityConfig and models without a policy keep the paper's."""
    import pathlib

    from lserve.patterns import selection_policy
    from lserve.sparsity import resolve_sparsity

    policy = {"page_score": "blend", "page_score_spread": 0.25, "group_score": "max", "logical_page_size": 4,
              "physical_page_size": 16, "head_budget_skew": 4.0}
    assert selection_policy("smollm2-135m-instruct") == policy
    assert selection_policy("/models/other-model") == {}
    for model in ("smollm2-135m-instruct", pathlib.Path("/models/SmolLM2-135M-Instruct.Q4_1.gguf")):
        cfg = resolve_sparsity("lserve", model)
        assert {key: getattr(cfg, key) for key in policy} == policy
    cfg = SparsityConfig.preset("lserve", model=SMOLLM2, logical_page_size=16, decode_token_budget=1024)
    assert (cfg.page_score, cfg.group_score, cfg.logical_page_size, cfg.physical_page_size,
            cfg.decode_token_budget) == ("blend", "max", 16, 16, 1024)
    paper = ("bound", "sum", 16)
    cfg = SparsityConfig.preset("lserve", streaming_fraction=0.0)  # no model
    assert (cfg.page_score, cfg.group_score, cfg.logical_page_size, cfg.physical_page_size) == paper + (64,)
    cfg = resolve_sparsity(SparsityConfig(decode_token_budget=1024), SMOLLM2)  # explicit config
    assert (cfg.page_score, cfg.group_score, cfg.logical_page_size) == paper
    assert cfg.head_budget_skew == 0.0


def test_lserve_preset_skews_budgets_only_with_head_scores():
    """The shipped skew weighs dense heads by the pattern's scores: with the shipped pattern the
    budgets differ per head at the same mean; explicit streaming heads (no scores) or selection
    only without a pattern keep equal budgets instead of raising; an explicit skew is kept."""
    from lserve.sparsity import resolve_sparsity

    cfg = resolve_sparsity("lserve", SMOLLM2)
    core = cfg.to_core(30, 3)
    dense = [b for b, s in zip(core.head_token_budgets, core.streaming_heads) if not s]
    assert len(dense) == 45 and min(dense) < 4096 < max(dense)
    assert abs(sum(dense) / len(dense) - 4096) <= 16  # whole pages of 16 tokens: the mean stays the budget
    heads = [[0]] * 30
    cfg = SparsityConfig.preset("lserve", model=SMOLLM2, streaming_heads=heads)
    assert cfg.head_budget_skew == 0.0 and cfg.to_core(30, 3).head_token_budgets == []
    cfg = SparsityConfig.preset("lserve", model=SMOLLM2, streaming_fraction=0.0)
    assert cfg.head_pattern is None and cfg.head_budget_skew == 0.0
    cfg = SparsityConfig.preset("lserve", model=SMOLLM2, head_budget_skew=1.0)
    assert cfg.head_budget_skew == 1.0
    with pytest.raises(ValueError, match="head_budget_skew"):
        SparsityConfig.preset("lserve", model=SMOLLM2, streaming_heads=heads, head_budget_skew=2.0).to_core(30, 3)


# Streaming heads asked for without a pattern: the model's shipped pattern, or a ValueError.
SMOLLM2 = "smollm2-135m-instruct"  # 30 layers x 3 KV heads; pattern in lserve/patterns/, no model file needed


def test_config_without_pattern_takes_the_shipped_pattern_for_the_model():
    from lserve.sparsity import resolve_sparsity

    user = SparsityConfig(decode_token_budget=1024, streaming_fraction=0.5)
    resolved = resolve_sparsity(user, SMOLLM2)
    expected = SparsityConfig.preset("lserve", model=SMOLLM2).streaming_mask(30, 3)
    assert resolved.streaming_mask(30, 3) == expected
    assert sum(map(sum, expected)) == 45  # half of 90 heads stream
    assert resolved.decode_token_budget == 1024
    assert user.head_pattern is None  # the user's object is left alone
    # An explicit pattern or list is kept.
    scores = np.random.default_rng(5).random((30, 3))
    explicit = resolve_sparsity(SparsityConfig(head_pattern=scores), SMOLLM2)
    assert explicit.streaming_mask(30, 3) == streaming_mask_from_scores(scores, 0.5).tolist()
    lists = resolve_sparsity(SparsityConfig(streaming_heads=[[0]] * 30), SMOLLM2)
    assert lists.head_pattern is None and lists.streaming_mask(30, 3) == [[True, False, False]] * 30


@pytest.mark.parametrize("sparsity", ["lserve", SparsityConfig(decode_token_budget=1024)])
def test_streaming_without_any_pattern_raises(tmp_path, sparsity):
    from lserve.sparsity import resolve_sparsity

    resolved = resolve_sparsity(sparsity, tmp_path)  # a model lserve ships no pattern for
    with pytest.raises(ValueError, match=r"lserve calibrate.*head_pattern=|head_pattern=.*lserve calibrate") as info:
        resolved.streaming_mask(2, 2)
    assert "streaming_heads=" in str(info.value) and "streaming_fraction=0" in str(info.value)
    with pytest.raises(ValueError, match="lserve calibrate"):
        SparsityConfig.preset("lserve").streaming_mask(2, 2)  # no model given at all


def test_selection_only_needs_no_pattern(tmp_path):
    from lserve.sparsity import resolve_sparsity

    for model in (tmp_path, SMOLLM2, None):
        cfg = resolve_sparsity(SparsityConfig(streaming_fraction=0.0, decode_token_budget=1024), model)
        assert cfg.enabled and cfg.streaming_mask(30, 3) == [[False] * 3] * 30
    assert SparsityConfig.preset("lserve", streaming_fraction=0.0).streaming_mask(2, 2) == [[False] * 2] * 2


def test_dense_never_needs_a_pattern(tmp_path):
    from lserve.sparsity import resolve_sparsity

    for cfg in (resolve_sparsity(None, tmp_path), resolve_sparsity("dense", tmp_path), SparsityConfig.preset("dense"),
                resolve_sparsity(SparsityConfig(enabled=False), tmp_path)):
        assert not cfg.enabled and cfg.streaming_mask(2, 2) == [[False] * 2] * 2
