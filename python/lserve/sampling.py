"""SamplingParams: vLLM's names, defaults and validation rules.

Example:
    >>> from lserve import SamplingParams
    >>> SamplingParams(temperature=0.0, max_tokens=32, stop=["\\n\\n"])
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Union

import numpy as np

from lserve.text import check_text

MAX_LOGPROBS = 20  # vLLM's default max_logprobs; the C++ SamplingParams::validate holds the same bound
# The C++ SamplingParams holds ints as int32 and reals as float: larger values are refused here, naming
# the field, rather than overflowing in the bindings (a TypeError) or turning into inf / 0.
INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class SamplingParams:
    """How to sample one prompt's continuations.

    n: continuations per prompt. temperature: 0 is greedy. top_p in (0, 1]; top_k 0 or -1 turns it
    off; min_p in [0, 1]. repetition_penalty > 0 (prompt and output tokens); presence_penalty and
    frequency_penalty in [-2, 2] (output tokens). stop: strings that end the output (excluded from
    the text unless include_stop_str_in_output); stop_token_ids likewise for token ids.
    max_tokens >= 1 new tokens; min_tokens before EOS/stop ids may end it; ignore_eos keeps going
    past EOS. logprobs: None, or the number of top alternatives returned per token (0..20).
    seed: per-request generator seed, for reproducible sampling.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_list: List[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        elif self.stop is None:
            self.stop_list = []
        else:
            self.stop_list = list(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop_list):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        for stop in self.stop_list:
            check_text(stop, "stop")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._check_int("n", self.n, 1)
        self._check_float("temperature", self.temperature, 0.0, None, "must be >= 0 (0 means greedy)")
        self._check_float("top_p", self.top_p, 0.0, 1.0, "must be in (0, 1]", low_open=True)
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT32_MAX:
            raise ValueError(f"top_k must be 0 or -1 (disabled) or an int in [1, {INT32_MAX}], got {self.top_k!r}")
        self._check_float("min_p", self.min_p, 0.0, 1.0, "must be in [0, 1]")
        self._check_float("repetition_penalty", self.repetition_penalty, 0.0, None, "must be > 0 (1 means none)",
                          low_open=True)
        for name in ("presence_penalty", "frequency_penalty"):
            self._check_float(name, getattr(self, name), -2.0, 2.0, "must be in [-2, 2]")
        if self.max_tokens is not None:
            self._check_int("max_tokens", self.max_tokens, 1)
        self._check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        bad = [t for t in self.stop_token_ids if not (_is_int(t) and 0 <= t <= INT32_MAX)]
        if bad:
            raise ValueError(f"stop_token_ids must be ints in [0, {INT32_MAX}], got {bad[:5]}")

    @staticmethod
    def _check_float(name: str, value, low: float, high: Optional[float], rule: str, low_open: bool = False) -> None:
        """value must be a real number in [low, high] ((low, high] with low_open) that stays finite, and
        on the right side of low, as the 32-bit float the C++ sampler holds."""
        def within(x: float) -> bool:
            return math.isfinite(x) and (x > low if low_open else x >= low) and (high is None or x <= high)

        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and within(value)):
            raise ValueError(f"{name} {rule}, got {value!r}")
        if not within(float(np.float32(value)) if abs(value) <= FLOAT32_MAX else math.inf):
            raise ValueError(f"{name} {rule} as a 32-bit float (finite, and not rounding to the bound), got {value!r}")

    @staticmethod
    def _check_int(name: str, value, minimum: int) -> None:
        if not _is_int(value) or not minimum <= value <= INT32_MAX:
            raise ValueError(f"{name} must be an int in [{minimum}, {INT32_MAX}], got {value!r}")

    def to_core(self, max_tokens: int, seed: Optional[int]):
        """The C++ lserve._C.SamplingParams for one continuation: max_tokens resolved (the engine
        caps it at what max_model_len leaves), seed an int (taken modulo 2**63, so that seed + index
        for the n-th continuation stays valid) or None for one drawn by the engine."""
        from lserve import _C

        return _C.SamplingParams(
            temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k),
            min_p=float(self.min_p), repetition_penalty=float(self.repetition_penalty),
            presence_penalty=float(self.presence_penalty), frequency_penalty=float(self.frequency_penalty),
            max_tokens=int(max_tokens), min_tokens=min(int(self.min_tokens), int(max_tokens)),
            stop_token_ids=[int(t) for t in self.stop_token_ids], ignore_eos=bool(self.ignore_eos),
            logprobs=-1 if self.logprobs is None else int(self.logprobs),
            seed=-1 if seed is None else int(seed) % 2**63)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
