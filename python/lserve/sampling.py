"""SamplingParams: vLLM's names and defaults. The numeric rules are the C++ core's
(lserve::SamplingParams::validate, through _C.SamplingParams): a bad value raises the core's
ValueError, which names the field, the value and the allowed range. This class adds only what the
core does not know: n continuations, stop strings, and how text is detokenized.

Example:
    >>> from lserve import SamplingParams
    >>> SamplingParams(temperature=0.0, max_tokens=32, stop=["\\n\\n"])
    >>> SamplingParams(top_p=1.5)  # ValueError: SamplingParams.top_p must be in (0, 1], got 1.5
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Union

from lserve.text import check_text

_MAX_N = 2**31 - 1  # n continuations become n core requests (Engine.add_request_group)
# What the core validates max_tokens=None against (the engine caps it at what max_model_len leaves).
_UNBOUNDED_MAX_TOKENS = 2**31 - 1


@dataclass
class SamplingParams:
    """How to sample one prompt's continuations.

    n: continuations per prompt. temperature: 0 is greedy. top_p in (0, 1]; top_k 0 or -1 turns it
    off; min_p in [0, 1]. repetition_penalty > 0 (prompt and output tokens); presence_penalty and
    frequency_penalty in [-2, 2] (output tokens). stop: strings that end the output (excluded from
    the text unless include_stop_str_in_output); stop_token_ids likewise for token ids.
    max_tokens >= 1 new tokens; min_tokens before EOS/stop ids may end it; ignore_eos keeps going
    past EOS. logprobs: None, or the number of top alternatives returned per token (0..20).
    seed: per-request generator seed in [0, 2**63), for reproducible sampling.
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
        if not (isinstance(self.n, numbers.Integral) and not isinstance(self.n, bool) and 1 <= self.n <= _MAX_N):
            raise ValueError(f"n must be an int in [1, {_MAX_N}], got {self.n!r}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        max_tokens = _UNBOUNDED_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        core = self._core(max_tokens, self.seed, self.min_tokens)  # raises the core's ValueError
        self.stop_token_ids = list(core.stop_token_ids)

    def _core(self, max_tokens, seed, min_tokens):
        from lserve import _C

        return _C.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, max_tokens=max_tokens, min_tokens=min_tokens,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=self.logprobs, seed=seed)

    def to_core(self, max_tokens: int, seed: Optional[int]):
        """The C++ lserve._C.SamplingParams for one continuation: max_tokens resolved (the engine
        caps it at what max_model_len leaves; min_tokens is capped to it), seed an int (taken modulo
        2**63, so that seed + index for the n-th continuation stays valid) or None for one drawn by
        the engine."""
        return self._core(max_tokens, None if seed is None else seed % 2**63, min(self.min_tokens, max_tokens))
