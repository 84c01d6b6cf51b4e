"""OpenAI API request and response models (pydantic), shaped like vLLM's OpenAI-compatible server.

Requests forbid unknown fields (a typo is a 400, not a silently ignored option) and map onto
lserve.SamplingParams, whose range checks are the C++ core's. vLLM's extensions (top_k, min_p,
repetition_penalty, stop_token_ids, min_tokens, ignore_eos, ...) are accepted in the body, which is
where the openai client's `extra_body` puts them. Reference: the OpenAI API reference and vLLM's
`vllm/entrypoints/openai/protocol.py` (behaviour only).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from lserve.sampling import SamplingParams

# JSON has no -inf; vLLM reports impossible tokens with this floor.
LOGPROB_FLOOR = -9999.0


def clamp_logprob(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- errors ------------------------------------------------------------------------------------

class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(ResponseModel):
    """{"object": "error", "error": {message, type, param, code}}: OpenAI's shape plus vLLM's "object"."""

    object: Literal["error"] = "error"
    error: ErrorInfo


# ---- shared request pieces ---------------------------------------------------------------------

class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk, not only the last


class SamplingFields(RequestModel):
    """Fields common to completions and chat, OpenAI's and vLLM's extensions."""

    model: Optional[str] = None
    n: int = 1
    best_of: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[Dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    def unsupported(self) -> Optional[tuple]:
        """(param, message) for an accepted-but-unimplemented option that was actually used."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of must be unset or equal to n (beam search is not supported)"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        """Raises ValueError (see sampling_error_param) when a value is out of range."""
        def pick(value, default):
            return default if value is None else value

        return SamplingParams(
            n=self.n, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0), top_k=pick(self.top_k, 0),
            min_p=pick(self.min_p, 0.0), repetition_penalty=pick(self.repetition_penalty, 1.0),
            presence_penalty=pick(self.presence_penalty, 0.0), frequency_penalty=pick(self.frequency_penalty, 0.0),
            seed=self.seed, stop=self.stop if self.stop else None, stop_token_ids=list(self.stop_token_ids or []),
            max_tokens=max_tokens, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)


# ---- /v1/completions ---------------------------------------------------------------------------

PromptInput = Union[str, List[str], List[int], List[List[int]]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    add_special_tokens: bool = True

    def unsupported(self) -> Optional[tuple]:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.echo and self.logprobs is not None:
            return "echo", "echo together with logprobs (prompt logprobs) is not supported"
        return super().unsupported()

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class CompletionLogprobs(ResponseModel):
    text_offset: List[int] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    tokens: List[str] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's and vLLM's field)


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[UsageInfo] = None


# ---- /v1/chat/completions ----------------------------------------------------------------------

class ChatContentPart(BaseModel):
    """A content part; non-text parts are accepted here and refused with a clear message later."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    """One message; extra keys (name, tool_call_id, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: Optional[Union[str, List[ChatContentPart]]] = None

    def template_dict(self) -> Dict[str, Any]:
        """The message as the chat template sees it: content parts joined into one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"message content of type {part.type!r} is not supported (text only)")
                texts.append(part.text)
            message["content"] = "\n".join(texts)
        elif self.content is None:
            message["content"] = ""
        return message


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[Dict[str, Any]] = None


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    def unsupported(self) -> Optional[tuple]:
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool_choice is not supported"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", "structured output (response_format) is not supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        return super().unsupported()

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(self.requested_max_tokens, logprobs)


class ChatLogprobEntry(ResponseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatLogprobContent(ChatLogprobEntry):
    top_logprobs: List[ChatLogprobEntry] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: Optional[List[ChatLogprobContent]] = None


class ChatResponseMessage(ResponseModel):
    role: str = "assistant"
    content: Optional[str] = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    """A streamed message fragment; unset fields are left out ({} on the last chunk), as OpenAI does."""

    role: Optional[str] = None
    content: Optional[str] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


# ---- /v1/models, /tokenize, /detokenize --------------------------------------------------------

class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lserve"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class TokenizeCompletionRequest(RequestModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestModel):
    model: Optional[str] = None
    messages: List[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None


class DetokenizeRequest(RequestModel):
    model: Optional[str] = None
    tokens: List[int]


class DetokenizeResponse(ResponseModel):
    prompt: str


# ---- SamplingParams errors -> request fields ----------------------------------------------------

_COMPLETION_PARAM = {"max_tokens": "max_tokens", "logprobs": "logprobs"}
_CHAT_PARAM = {"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs"}


def sampling_error_param(message: str, chat: bool) -> Optional[str]:
    """The request field a SamplingParams ValueError names: the core's "SamplingParams.top_p must be
    in (0, 1], ...", "SamplingParams.stop_token_ids[2] must be ..." or lserve's "n must be ..." ->
    "top_p", "stop_token_ids", "n"."""
    first = message.split(" ", 1)[0]
    if first.startswith("SamplingParams."):
        first = first[len("SamplingParams."):]
    first = first.split("[", 1)[0]
    if first not in SamplingParams.__dataclass_fields__:
        return None
    table = _CHAT_PARAM if chat else _COMPLETION_PARAM
    return table.get(first, first)
