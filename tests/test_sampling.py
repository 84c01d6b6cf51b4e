"""The host sampler (cpp/src/sampling.cpp) against a numpy reference of each step.

Distributions are checked by drawing N samples from a seeded generator: no token outside the
reference's allowed set may ever appear, and the counts must pass a chi-square bound at a
false-alarm rate of about 1e-6 (the seeds are fixed, so the outcome is deterministic).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from lserve import _C
from lserve_testing import FILTER_CASES, assert_close_fp32, assert_distribution, assert_exact, make_logits

NUM_SAMPLES = 20000


# ---- numpy reference ------------------------------------------------------------------------------

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def penalised_logits(logits, params, prompt=(), output=(), eos=()) -> np.ndarray:
    """min_tokens masking, then repetition, frequency and presence penalties (vLLM's rules)."""
    x = logits.astype(np.float64).copy()
    vocab_size = x.size
    if len(output) < params.min_tokens:
        for token_id in () if params.ignore_eos else eos:
            if 0 <= token_id < vocab_size:
                x[token_id] = -np.inf
        for token_id in params.stop_token_ids:
            if token_id < vocab_size:
                x[token_id] = -np.inf
    seen = np.zeros(vocab_size, bool)
    seen[list(prompt) + list(output)] = True
    p = params.repetition_penalty
    x[seen] = np.where(x[seen] > 0, x[seen] / p, x[seen] * p)
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=vocab_size)
    x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return x


def reference_probs(logits, params, prompt=(), output=(), eos=()) -> np.ndarray:
    """Final sampling distribution: softmax(x / T) -> top-k -> top-p -> min-p -> renormalise."""
    x = penalised_logits(logits, params, prompt, output, eos)
    vocab_size = x.size
    if params.temperature == 0:
        out = np.zeros(vocab_size)
        out[np.argmax(x)] = 1.0
        return out
    probs = np.exp((x - x.max()) / params.temperature)
    probs /= probs.sum()
    order = np.lexsort((np.arange(vocab_size), -probs))  # best first, lower id on ties
    kept = order[: params.top_k] if 1 <= params.top_k < vocab_size else order
    mass = probs[kept] / probs[kept].sum()
    if params.top_p < 1:
        cumulative = np.cumsum(mass)
        num_kept = int(np.argmax(cumulative >= params.top_p)) + 1 if (cumulative >= params.top_p).any() else kept.size
        kept, mass = kept[:num_kept], mass[:num_kept]
    if params.min_p > 0:
        kept = kept[mass >= params.min_p * mass.max()]
    out = np.zeros(vocab_size)
    out[kept] = probs[kept]
    return out / out.sum()


def draw(logits, params, seed, prompt=(), output=(), eos=(), num_samples=NUM_SAMPLES) -> np.ndarray:
    generator = _C.Generator(seed)
    return np.array([generator.sample(logits, params, list(prompt), list(output), list(eos))[0]
                     for _ in range(num_samples)])


# ---- greedy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [1, 19, 1023, 50257])
def test_greedy_is_argmax(vocab_size):
    seed = vocab_size
    logits = make_logits(seed, vocab_size)
    params = _C.SamplingParams(temperature=0)
    token_id, _, _ = _C.sample_token(logits, params, seed=seed)
    assert_exact(token_id, int(np.argmax(logits)), "greedy token", seed)


def test_greedy_ties_pick_the_lowest_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0, 3.0], np.float32)
    assert _C.sample_token(logits, _C.SamplingParams(temperature=0))[0] == 1


def test_greedy_with_penalties_matches_reference():
    seed = 7
    logits = make_logits(seed, 200)
    prompt, output = [3, 5, 5, 9], [int(np.argmax(logits)), 11, 11, 11]
    params = _C.SamplingParams(temperature=0, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.9)
    expected = int(np.argmax(penalised_logits(logits, params, prompt, output)))
    assert expected != output[0], "the penalty should move the argmax in this case"
    assert _C.sample_token(logits, params, prompt, output)[0] == expected


# ---- filters against the reference distribution -----------------------------------------------------

@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_filters_match_reference(case):
    seed = sorted(FILTER_CASES).index(case) + 100
    logits = make_logits(seed, 48)
    params = _C.SamplingParams(**FILTER_CASES[case])
    samples = draw(logits, params, seed)
    assert_distribution(samples, reference_probs(logits, params), case, seed)


def test_top_k_keeps_lower_ids_on_boundary_ties():
    logits = np.array([0.0, 2.0, 1.0, 2.0, 2.0, 2.0, -1.0], np.float32)
    params = _C.SamplingParams(top_k=3)
    samples = draw(logits, params, seed=3, num_samples=3000)
    assert set(samples.tolist()) == {1, 3, 4}


def test_top_p_keeps_lower_ids_on_ties():
    logits = np.array([5.0, 5.0, 5.0, 5.0] + [-100.0] * 6, np.float32)
    params = _C.SamplingParams(top_p=0.45)  # two of four equal tokens reach 0.5 >= 0.45
    samples = draw(logits, params, seed=4, num_samples=3000)
    assert set(samples.tolist()) == {0, 1}
    assert_distribution(samples, reference_probs(logits, params), "top_p ties", 4)


def test_large_vocab_filters_never_leak():
    """32K vocab: the top-p histogram path and nth_element top-k never draw outside the set."""
    seed = 11
    vocab_size = 32000
    logits = make_logits(seed, vocab_size, scale=3.0)
    for kwargs in (dict(top_p=0.5), dict(top_p=0.95, temperature=0.7), dict(top_k=40), dict(min_p=0.02),
                   dict(top_k=2000, top_p=0.3, min_p=0.01)):
        params = _C.SamplingParams(**kwargs)
        expected = reference_probs(logits, params)
        samples = draw(logits, params, seed, num_samples=250)
        allowed = expected > 0
        assert allowed[samples].all(), f"{kwargs}: drew a token outside the allowed set (seed={seed})"
        # The most likely tokens dominate the draw as the reference says they should.
        top = np.argsort(-expected)[:5]
        assert abs(np.isin(samples, top).mean() - expected[top].sum()) < 0.1, kwargs


# ---- penalties and masking ----------------------------------------------------------------------------

PENALTY_CASES = {
    "repetition 1.5": dict(repetition_penalty=1.5),
    "repetition 0.7": dict(repetition_penalty=0.7),
    "presence 1.0": dict(presence_penalty=1.0),
    "frequency 0.6": dict(frequency_penalty=0.6),
    "presence -1 + frequency 0.4": dict(presence_penalty=-1.0, frequency_penalty=0.4),
    "all + temperature": dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=-0.5, temperature=0.7),
}


@pytest.mark.parametrize("case", sorted(PENALTY_CASES))
def test_penalties_match_reference(case):
    seed = sorted(PENALTY_CASES).index(case) + 200
    logits = make_logits(seed, 30)
    logits[:10] = np.abs(logits[:10]) + 0.5  # penalised tokens on both sides of zero
    logits[10:15] = -np.abs(logits[10:15]) - 0.5
    prompt = [0, 1, 10, 11, 1]
    output = [2, 2, 2, 3, 12, 13, 13, 0]
    params = _C.SamplingParams(**PENALTY_CASES[case])
    samples = draw(logits, params, seed, prompt, output)
    assert_distribution(samples, reference_probs(logits, params, prompt, output), case, seed)


def test_min_tokens_masks_eos_and_stop_ids():
    seed = 300
    logits = make_logits(seed, 40)
    eos, stops = [7, 30], [3, 25]  # several eos ids, as Llama 3 has
    logits[eos + stops] = 9.0  # would dominate without the mask
    params = _C.SamplingParams(min_tokens=3, max_tokens=10, stop_token_ids=stops)
    output = [1, 2]  # fewer than min_tokens: masked
    samples = draw(logits, params, seed, output=output, eos=eos)
    assert not np.isin(samples, eos + stops).any()
    assert_distribution(samples, reference_probs(logits, params, output=output, eos=eos), "min_tokens", seed)
    # Enough outputs: no mask, the former stop tokens dominate.
    output = [1, 2, 4]
    samples = draw(logits, params, seed, output=output, eos=eos, num_samples=2000)
    assert np.isin(samples, eos + stops).mean() > 0.9
    # Greedy respects the mask too, for every eos id.
    greedy = _C.SamplingParams(temperature=0, min_tokens=1, stop_token_ids=stops)
    for top in eos + stops:
        single = logits.copy()
        single[top] = 20.0
        assert _C.sample_token(single, greedy, eos_token_ids=eos)[0] not in eos + stops


def test_min_tokens_with_ignore_eos_leaves_eos_alone():
    logits = np.zeros(10, np.float32)
    logits[4] = 10.0
    params = _C.SamplingParams(temperature=0, min_tokens=5, ignore_eos=True, stop_token_ids=[9])
    assert _C.sample_token(logits, params, eos_token_ids=[4])[0] == 4  # eos is not a stop token here
    params.ignore_eos = False
    assert _C.sample_token(logits, params, eos_token_ids=[4])[0] == 0


def test_stop_ids_beyond_vocab_are_ignored():
    logits = np.array([1.0, 2.0, 0.5], np.float32)
    params = _C.SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[1, 50000])
    assert _C.sample_token(logits, params, eos_token_ids=[70000, -1])[0] == 0


def test_everything_masked_raises():
    logits = np.array([1.0], np.float32)
    params = _C.SamplingParams(min_tokens=1)
    with pytest.raises(ValueError, match="every token is masked"):
        _C.sample_token(logits, params, eos_token_ids=[0])


def test_validate_for_model_rejects_params_that_mask_everything():
    params = _C.SamplingParams(min_tokens=2, stop_token_ids=[0, 1, 2, 99])
    params.validate_for_model(4)  # token 3 is left
    with pytest.raises(ValueError, match="mask all 4 tokens"):
        params.validate_for_model(4, [3])
    params.validate_for_model(5, [3])
    params.ignore_eos = True
    params.validate_for_model(4, [3])  # eos is not masked under ignore_eos
    params.stop_token_ids = [0, 1, 2, 3]
    with pytest.raises(ValueError, match="stop_token_ids mask all 4"):
        params.validate_for_model(4)
    params.min_tokens = 0
    params.validate_for_model(4, [3])  # nothing is masked without min_tokens
    params.top_p = 2.0
    with pytest.raises(ValueError, match="top_p"):
        params.validate_for_model(4)


# ---- reproducibility -----------------------------------------------------------------------------------

def test_same_seed_same_sequence():
    logits = make_logits(400, 1000)
    params = _C.SamplingParams(temperature=0.9, top_p=0.95)
    a = draw(logits, params, seed=1234, num_samples=300)
    b = draw(logits, params, seed=1234, num_samples=300)
    c = draw(logits, params, seed=1235, num_samples=300)
    assert_exact(a, b, "same seed", 1234)
    assert (a != c).any()
    single = [_C.sample_token(logits, params, seed=99)[0] for _ in range(3)]
    assert len(set(single)) == 1


def test_draw_rule_is_pinned():
    """One 64-bit draw per sample, u = (x >> 11) / 2^53, walked in token order when unfiltered.
    With 1024 equally likely tokens the token is the draw's top 10 bits. mt19937_64 with the
    default seed 5489 gives 14514284786278117030 first and 9981545732273789042 10000th (C++ standard)."""
    logits = np.zeros(1024, np.float32)
    params = _C.SamplingParams()
    generator = _C.Generator(5489)
    first = generator.sample(logits, params)[0]
    assert first == 14514284786278117030 >> 54
    for _ in range(9998):
        generator.sample(logits, params)
    assert generator.sample(logits, params)[0] == 9981545732273789042 >> 54
    assert _C.sample_token(logits, params, seed=5489)[0] == first


# ---- logprobs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_logprobs_from_raw_logits(num_top):
    seed = 500 + num_top
    logits = make_logits(seed, 1000, scale=4.0)
    eos = int(np.argmax(logits))
    # Penalties and masking must not leak into the reported logprobs.
    params = _C.SamplingParams(temperature=0.8, logprobs=num_top, repetition_penalty=1.4, presence_penalty=1.0,
                               min_tokens=3)
    prompt, output = [eos, 1, 2], [3, int(np.argsort(logits)[-2])]
    reference = log_softmax(logits)
    generator = _C.Generator(seed)
    for _ in range(20):
        token_id, logprob, top = generator.sample(logits, params, prompt, output, [eos])
        assert_close_fp32(logprob, reference[token_id], "sampled logprob", seed)
        assert len(top) == num_top
        expected_ids = np.lexsort((np.arange(logits.size), -logits))[:num_top]
        assert_exact([t for t, _ in top], expected_ids, "top logprob ids", seed)
        assert_close_fp32([lp for _, lp in top], reference[expected_ids], "top logprobs", seed)
    if num_top:
        assert top[0][0] == eos, "raw logits: the masked eos still tops the list"


def test_top_logprobs_ties_ordered_by_id():
    logits = np.array([1.0, 3.0, 3.0, 2.0, 3.0], np.float32)
    _, _, top = _C.sample_token(logits, _C.SamplingParams(logprobs=4))
    assert [t for t, _ in top] == [1, 2, 4, 3]
    assert_close_fp32([lp for _, lp in top], log_softmax(logits)[[1, 2, 4, 3]], "tied logprobs")


def test_logprobs_more_than_vocab_and_disabled():
    logits = np.array([0.5, -0.5], np.float32)
    token_id, logprob, top = _C.sample_token(logits, _C.SamplingParams(temperature=0, logprobs=5))
    assert token_id == 0 and len(top) == 2
    assert_close_fp32(logprob, log_softmax(logits)[0], "greedy logprob")
    assert _C.sample_token(logits, _C.SamplingParams(temperature=0))[1:] == (0.0, [])


def test_logprobs_with_infinite_logits():
    logits = np.array([-np.inf, 1.0, -np.inf, 0.0], np.float32)
    _, logprob, top = _C.sample_token(logits, _C.SamplingParams(logprobs=4))
    assert np.isfinite(logprob)
    assert [t for t, _ in top] == [1, 3, 0, 2]
    assert top[2][1] == -np.inf and top[3][1] == -np.inf


# ---- validation and argument errors -------------------------------------------------------------------

INVALID = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 2.01), ("frequency_penalty", -3.0),
    ("max_tokens", 0),
    ("min_tokens", -1), ("min_tokens", 17),  # default max_tokens is 16
    ("logprobs", -2), ("logprobs", 21),
    ("stop_token_ids", [5, -1]),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_validate_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _C.SamplingParams(**{field: value})
    params = _C.SamplingParams()
    setattr(params, field, value)
    with pytest.raises(_C.Error, match=field) as info:
        params.validate()
    assert "got" in str(info.value)
    with pytest.raises(ValueError, match=field):
        _C.sample_token(np.zeros(4, np.float32), params)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(top_p=1.0), dict(min_p=1.0),
    dict(min_p=0.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0), dict(logprobs=20),
    dict(logprobs=0), dict(min_tokens=16), dict(max_tokens=1), dict(stop_token_ids=[0]),
])
def test_valid_edges_accepted(kwargs):
    _C.SamplingParams(**kwargs).validate()


def test_params_fields_and_repr():
    params = _C.SamplingParams(temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
                               presence_penalty=0.2, frequency_penalty=0.3, max_tokens=64, min_tokens=2,
                               stop_token_ids=[1, 2], ignore_eos=True, logprobs=3, seed=7)
    assert params.top_k == 40 and params.max_tokens == 64 and params.stop_token_ids == [1, 2]
    assert params.ignore_eos and params.logprobs == 3 and params.seed == 7
    assert math.isclose(params.temperature, 0.5) and math.isclose(params.top_p, 0.9, rel_tol=1e-6)
    params.stop_token_ids = [4]
    params.seed = -1
    assert params.stop_token_ids == [4] and params.seed == -1
    text = repr(params)
    assert text.startswith("SamplingParams(") and "top_k=40" in text and "stop_token_ids=[4]" in text
    default = _C.SamplingParams()
    assert (default.temperature, default.top_p, default.top_k, default.max_tokens, default.logprobs) == (1.0, 1.0, 0, 16, -1)
    with pytest.raises(TypeError):
        _C.SamplingParams(0.5)  # keyword arguments only


def test_argument_errors():
    params = _C.SamplingParams()
    logits = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] = 8"):
        _C.sample_token(logits, params, [0, 8])
    with pytest.raises(ValueError, match=r"output_token_ids\[0\] = -1"):
        _C.sample_token(logits, params, [], [-1])
    bad = logits.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match=r"logits\[5\] is NaN"):
        _C.sample_token(bad, params)
    with pytest.raises(ValueError, match="float32"):
        _C.sample_token(np.zeros(8, np.float64), params)
    with pytest.raises(ValueError, match="vocab_size"):
        _C.sample_token(np.zeros((2, 4), np.float32), params)


def test_input_untouched_and_strided_input():
    seed = 600
    base = make_logits(seed, 64)
    logits = base.copy()
    params = _C.SamplingParams(min_tokens=1, repetition_penalty=2.0, top_k=3)
    _C.sample_token(logits, params, [1, 2, 3], [], [0])
    assert_exact(logits, base, "logits after sampling", seed)
    wide = np.repeat(base, 2)  # every token twice: wide[::2] is base with stride 2
    greedy = _C.SamplingParams(temperature=0)
    assert _C.sample_token(wide[::2], greedy)[0] == int(np.argmax(base))


# ---- lserve.SamplingParams (Python): validation and the mapping onto _C.SamplingParams -------------------

PY_INVALID = INVALID[:-2] + [  # the Python class has no -1 sentinel for logprobs: None means none
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.5),
    ("stop_token_ids", [5, -1]), ("stop_token_ids", "5"), ("stop_token_ids", [True]),
    ("temperature", "0.5"), ("top_p", None), ("top_k", 2.0), ("top_k", True), ("repetition_penalty", float("inf")),
    ("max_tokens", 3.0), ("n", 0), ("seed", -1), ("seed", 2**63), ("stop", [""]),
]


@pytest.mark.parametrize("field, value", PY_INVALID, ids=[f"{f}={v!r}" for f, v in PY_INVALID])
def test_python_params_reject_with_value_error(field, value):
    from lserve import SamplingParams

    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_python_params_to_core():
    from lserve import SamplingParams

    params = SamplingParams(n=2, temperature=0.7, top_p=0.8, top_k=np.int64(12), min_p=0.1,
                            repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=0.25,
                            stop_token_ids=(3, 4), max_tokens=None, min_tokens=40, ignore_eos=True, logprobs=2,
                            seed=2**63 - 1)
    core = params.to_core(max_tokens=30, seed=params.seed + 1)
    assert isinstance(core, _C.SamplingParams)
    assert (core.top_k, core.max_tokens, core.stop_token_ids, core.ignore_eos, core.logprobs) == (12, 30, [3, 4],
                                                                                                  True, 2)
    assert core.min_tokens == 30, "min_tokens is capped at the resolved max_tokens"
    assert core.seed == 0, "seed + index wraps modulo 2**63"
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert math.isclose(getattr(core, name), getattr(params, name), rel_tol=1e-6), name
    default = SamplingParams().to_core(max_tokens=16, seed=None)
    assert (default.seed, default.logprobs, default.top_k, default.stop_token_ids) == (-1, -1, 0, [])
