"""SamplingParams, C++ and Python: ranges, errors naming the field, the mapping onto the core.

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
