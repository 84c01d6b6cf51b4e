"""RequestOutput and CompletionOutput: what Engine.generate returns (vLLM's shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    """One continuation: text, token ids, optional per-token logprobs, and why it ended.

    finish_reason: "stop" (EOS, a stop token id or a stop string), "length" (max_tokens or
    max_model_len), "abort", or None while running. stop_reason: the stop string or token id.
    logprobs: one dict per generated token, {token_id: Logprob}, holding the sampled token and
    the top alternatives.
    """

    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[List[Dict[int, Logprob]]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    error: Optional[str] = None  # why the engine aborted this sequence (finish_reason "abort"), e.g. NaN logits

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (vLLM's field)
