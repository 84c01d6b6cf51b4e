"""SamplingParams: the C++ rules (the one place they live), errors naming the field and the value,
and lserve.SamplingParams, which surfaces the core's errors and maps onto the core.

Sampling itself is the backends' sample op (tests/ops/test_sample.py, statistical and exact) and
logprobs their logprobs op (tests/ops/test_logprobs.py); the engine's use of both is in
tests/engine/test_engine_sampling.py and tests/engine/test_reproducible_seeds.py."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lserve import _C


# ---- SamplingParams (C++) ---------------------------------------------------------------------------

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
    ("logprobs", -1), ("logprobs", 21),
    ("seed", -1),
    ("stop_token_ids", [5, -1]),
]
# Values of the wrong kind, or beyond what the C++ field holds: the bindings refuse them naming the field.
WRONG_KIND = [
    ("temperature", "0.5"), ("top_p", None), ("top_k", 2.0), ("top_k", True), ("max_tokens", 3.0),
    ("logprobs", 1.5), ("stop_token_ids", "5"), ("stop_token_ids", [True]), ("ignore_eos", 1),
    ("top_k", 2**31), ("max_tokens", 2**70), ("seed", 2**63), ("temperature", 1e300), ("presence_penalty", -1e39),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_validate_names_the_field(field, value):
    shown = "got -1" if isinstance(value, list) else f"got {value:g}"  # the core prints reals as %g
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b.*{shown}"):
        _C.SamplingParams(**{field: value})
    params = _C.SamplingParams()
    setattr(params, field, value)
    with pytest.raises(_C.Error, match=rf"SamplingParams\.{field}\b.*{shown}"):
        params.validate()


@pytest.mark.parametrize("field, value", WRONG_KIND, ids=[f"{f}={v!r}" for f, v in WRONG_KIND])
def test_wrong_kind_names_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b") as info:
        _C.SamplingParams(**{field: value})
    shown = repr(value[-1] if isinstance(value, list) else value)
    assert shown in str(info.value), info.value
    params = _C.SamplingParams()
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        setattr(params, field, value)  # the setters convert as the constructor does


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
    params.seed = None
    assert params.stop_token_ids == [4] and params.seed is None
    text = repr(params)
    assert text.startswith("SamplingParams(") and "top_k=40" in text and "stop_token_ids=[4]" in text
    assert "seed=None" in text and "logprobs=3" in text
    default = _C.SamplingParams()
    assert (default.temperature, default.top_p, default.top_k, default.max_tokens, default.logprobs,
            default.seed) == (1.0, 1.0, 0, 16, None, None)
    with pytest.raises(TypeError):
        _C.SamplingParams(0.5)  # keyword arguments only


# ---- lserve.SamplingParams (Python): validation and the mapping onto _C.SamplingParams -------------------

PY_INVALID = INVALID + WRONG_KIND + [("n", 0), ("n", 1.5), ("stop", [""]), ("stop", "x\ud800")]


@pytest.mark.parametrize("field, value", PY_INVALID, ids=[f"{f}={v!r}" for f, v in PY_INVALID])
def test_python_params_reject_with_value_error(field, value):
    """lserve.SamplingParams raises what the core raises (n and stop strings are its own)."""
    from lserve import SamplingParams

    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    if field not in ("n", "stop"):
        assert str(info.value).startswith(f"SamplingParams.{field}"), info.value
        with pytest.raises(ValueError) as core:
            _C.SamplingParams(**{field: value})
        assert str(core.value) == str(info.value), "one source: the same message from the core"


def test_python_params_validate_max_tokens_none():
    """max_tokens=None (up to max_model_len) still has min_tokens and the rest checked by the core."""
    from lserve import SamplingParams

    SamplingParams(max_tokens=None, min_tokens=1000)
    with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens.*got -3"):
        SamplingParams(max_tokens=None, min_tokens=-3)


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
    assert (default.seed, default.logprobs, default.top_k, default.stop_token_ids) == (None, None, 0, [])
