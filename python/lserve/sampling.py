"""SamplingParams: vLLM's names, defaults and validation rules.

Example:
    >>> from lserve import SamplingParams
    >>> SamplingParams(temperature=0.0, max_tokens=32, stop=["\\n\\n"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union


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
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        self._check_int("n", self.n, 1)
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k not in (0, -1)):
            raise ValueError(f"top_k must be 0 or -1 (disabled) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.max_tokens is not None:
            self._check_int("max_tokens", self.max_tokens, 1)
        self._check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be None or an int in [0, 20], got {self.logprobs}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids}")

    @staticmethod
    def _check_int(name: str, value, minimum: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

    def to_core(self, max_tokens: int, seed: Optional[int]):
        """The C++ lserve._C.SamplingParams for one continuation (max_tokens resolved)."""
        from lserve import _C

        core = _C.SamplingParams()
        core.temperature = float(self.temperature)
        core.top_p = float(self.top_p)
        core.top_k = int(self.top_k)
        core.min_p = float(self.min_p)
        core.repetition_penalty = float(self.repetition_penalty)
        core.presence_penalty = float(self.presence_penalty)
        core.frequency_penalty = float(self.frequency_penalty)
        core.max_tokens = int(max_tokens)
        core.min_tokens = min(int(self.min_tokens), int(max_tokens))
        core.stop_token_ids = [int(t) for t in self.stop_token_ids]
        core.ignore_eos = bool(self.ignore_eos)
        core.logprobs = -1 if self.logprobs is None else int(self.logprobs)
        core.seed = -1 if seed is None else int(seed)
        core.validate()
        return core
