"""The OpenAI-compatible FastAPI app: build_app(engine, served_model_name) -> FastAPI.

Routes: /v1/completions, /v1/chat/completions (JSON or server-sent events), /v1/models, /tokenize,
/detokenize, /health, /version, /metrics. Handlers run the cheap checks on the event loop (fields,
sequence count, a prompt's length in characters), hand tokenization and chat templating to a small
thread pool, then hand engine requests to the EngineLoop thread, so no request stalls the others.
Every error is OpenAI's JSON error shape with vLLM's "object": "error" (400 bad input, 404 unknown
model, 413 body over the size limit, 503 overloaded or shutting down, 500 bugs, logged).
Behavioural reference: vLLM's `vllm/entrypoints/openai/` (read, not copied).
"""
from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from lserve.outputs import CompletionOutput, RequestOutput
from lserve.sampling import SamplingParams
from lserve.server import protocol as p
from lserve.server.engine_loop import EngineLoop, GenerateItem, RequestStream, ServiceUnavailableError
from lserve.server.errors import APIError, error_event, error_response
from lserve.server.metrics import CONTENT_TYPE, ServerMetrics
from lserve.server.middleware import BodySizeLimit, InternalErrors
from lserve.text import check_text

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Tokenizer threads: tokenizers releases the GIL while it encodes, so a few threads tokenize in
# parallel while the event loop goes on; more than the cores would only queue on them.
MAX_TOKENIZER_THREADS = 4
# No token spans more than this many bytes, for tokenizers that give no bound of their own (the body
# size default only: the early length check needs the tokenizer's exact bound).
FALLBACK_TOKEN_BYTES = 32


def default_max_body_bytes(max_model_len: int, tokenizer) -> int:
    """The default request-body limit: twice the longest prompt the context could hold in UTF-8 bytes
    (max_model_len x the most bytes one token stands for: JSON's \\uXXXX escapes spell a 3-byte
    character in 6), plus 4 MiB for everything else. SmolLM2 at 8192 tokens: 5.3 MiB; at 512: 4.1 MiB."""
    per_token = getattr(tokenizer, "max_token_text_bytes", None) or FALLBACK_TOKEN_BYTES
    return 2 * max_model_len * per_token + (4 << 20)


@dataclass
class _Prompt:
    text: Optional[str]
    token_ids: List[int]


@dataclass
class _ChoiceState:
    """What one streamed choice has sent so far."""

    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    finished: bool = False


class OpenAIServer:
    """The handlers' shared state: engine facts, the engine loop, metrics, the tokenizer threads and the
    token-string cache."""

    def __init__(self, engine, served_model_names: Sequence[str], engine_loop: EngineLoop, metrics: ServerMetrics,
                 max_n: int = 128) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = int(engine.max_model_len)
        self.vocab_size = getattr(engine, "vocab_size", None)
        self.served_model_names = list(served_model_names)
        self.engine_loop = engine_loop
        self.metrics = metrics
        self.max_n = max_n
        self.max_token_text_bytes = getattr(self.tokenizer, "max_token_text_bytes", None)
        self.token_str = functools.lru_cache(maxsize=1 << 16)(self._decode_one)
        self.executor = ThreadPoolExecutor(max_workers=max(1, min(MAX_TOKENIZER_THREADS, os.cpu_count() or 1)),
                                           thread_name_prefix="lserve-tokenize")

    async def offload(self, fn: Callable, *args):
        """fn(*args) on a tokenizer thread; the event loop (and /health) goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    # ---- request checks -------------------------------------------------------------------------

    def check_model(self, model: Optional[str]) -> str:
        if model is None or model == "":
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "model")
        return model

    def sampling_params(self, body: p.SamplingFields, chat: bool) -> SamplingParams:
        unsupported = body.unsupported()
        if unsupported is not None:
            raise APIError(400, unsupported[1], unsupported[0])
        if body.n > self.max_n:
            raise APIError(400, f"n must be <= {self.max_n}, got {body.n}", "n")
        try:
            params = body.to_sampling_params()
        except ValueError as error:
            param = p.sampling_error_param(str(error), chat)
            if chat and param == "max_completion_tokens" and body.max_completion_tokens is None:
                param = "max_tokens"
            raise APIError(400, str(error), param) from None
        if body.stream_options is not None and body.stream_options.continuous_usage_stats \
                and not body.stream_options.include_usage:
            raise APIError(400, "continuous_usage_stats requires include_usage", "stream_options")
        return params

    def check_capacity(self, num_prompts: int, body: p.SamplingFields) -> None:
        """A request whose sequences (prompts x max(n, best_of)) exceed the pending limit could never be
        admitted, however long the client waited: 400 naming the limit, not 503 "retry later"."""
        n = max(body.n, body.best_of or 1)
        num_seqs = num_prompts * n
        limit = self.engine_loop.max_pending_requests
        if num_seqs > limit:
            raise APIError(400, f"This request needs {num_seqs} sequences ({num_prompts} prompts x n={n}), more "
                                f"than this server ever holds at once ({limit}, lserve serve --max-pending-requests). "
                                "Please send fewer prompts or a smaller n.", "n" if n > 1 else "prompt")

    def check_min_length(self, min_num_tokens: int, num_bytes: int, max_tokens: Optional[int], param: str) -> None:
        """check_length for a prompt not yet tokenized, of which a lower bound on its token count is known
        (its bytes over the most bytes one token stands for)."""
        if min_num_tokens <= 0:
            return
        why = (f"its {num_bytes} bytes of text are at least {min_num_tokens} tokens (no token of this model stands "
               f"for more than {self.max_token_text_bytes} bytes)")
        if min_num_tokens >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                                f"prompt is longer: {why}, which leaves no room for a completion. Please reduce the "
                                "length of the prompt.", param)
        if max_tokens is not None and min_num_tokens + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested at least {min_num_tokens + max_tokens} tokens ({why}; {max_tokens} in the "
                                "completion). Please reduce the length of the prompt or completion.", "max_tokens")

    def quick_check_length(self, text: str, max_tokens: Optional[int], param: str) -> None:
        """check_min_length from the character count alone: costs nothing, so it runs on the event loop."""
        bound = getattr(self.tokenizer, "min_num_tokens_of_length", None)
        if bound is not None:
            self.check_min_length(bound(len(text)), len(text), max_tokens, param)

    def encode(self, text: str, add_special_tokens: bool, max_tokens: Optional[int], param: str) -> List[int]:
        """Token ids of text, after the checks that need no tokenization. Blocking: call through offload()."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids instead of text", param)
        try:
            check_text(text, param)
            min_num_tokens = self.tokenizer.min_num_tokens(text) if self.max_token_text_bytes else 0
        except ValueError as error:
            raise APIError(400, str(error), param) from None
        self.check_min_length(min_num_tokens, len(text.encode("utf-8")), max_tokens, param)
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except ValueError as error:
            raise APIError(400, str(error), param) from None

    @staticmethod
    def completion_items(body: p.CompletionRequest) -> List[Union[str, List[int]]]:
        """The request's prompts, each a string or a list of token ids."""
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(item, int) for item in prompt):
            prompt = [prompt]
        return list(prompt)

    def check_token_ids(self, token_ids: List[int], param: str) -> None:
        if not token_ids:
            raise APIError(400, "a token-id prompt must not be empty", param)
        upper = self.vocab_size if self.vocab_size is not None else 2**31
        bad = [token_id for token_id in token_ids if not 0 <= token_id < upper]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {upper})", param)

    def completion_prompts(self, items: List[Union[str, List[int]]], add_special_tokens: bool,
                           max_tokens: Optional[int]) -> List[_Prompt]:
        """Tokenized and length-checked prompts. Blocking: call through offload()."""
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(_Prompt(item, self.encode(item, add_special_tokens, max_tokens, "prompt")))
            else:
                self.check_token_ids(item, "prompt")
                prompts.append(_Prompt(None, list(item)))
            self.check_length(prompts[-1], max_tokens, "prompt")
        return prompts

    def render_chat(self, messages: List[p.ChatMessage], add_generation_prompt: bool, add_special_tokens: bool,
                    max_tokens: Optional[int] = None, check_length: bool = True) -> _Prompt:
        """The templated, tokenized (and, with check_length, length-checked) conversation. Blocking: call
        through offload()."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template", "messages")
        try:
            conversation = [message.template_dict() for message in messages]
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        except ValueError as error:
            raise APIError(400, str(error), "messages") from None
        except Exception as error:  # a template error (jinja2) is the request's fault: say what it was
            raise APIError(400, f"the chat template failed on these messages: {error}", "messages") from None
        prompt = _Prompt(text, self.encode(text, add_special_tokens, max_tokens if check_length else None,
                                           "messages"))
        if check_length:
            self.check_length(prompt, max_tokens, "messages")
        return prompt

    def check_length(self, prompt: _Prompt, max_tokens: Optional[int], param: str) -> None:
        num_prompt_tokens = len(prompt.token_ids)
        if num_prompt_tokens >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                                f"prompt has {num_prompt_tokens} tokens, which leaves no room for a completion. "
                                "Please reduce the length of the prompt.", param)
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                                "messages or completion.", "max_tokens")

    def tokenize(self, body: Union[p.TokenizeCompletionRequest, p.TokenizeChatRequest]) -> p.TokenizeResponse:
        """/tokenize's answer. Text that could not fit the context even at the most bytes per token is
        refused; anything shorter is counted exactly. Blocking: call through offload()."""
        if isinstance(body, p.TokenizeChatRequest):
            token_ids = self.render_chat(body.messages, body.add_generation_prompt, body.add_special_tokens,
                                         check_length=False).token_ids
        else:
            token_ids = self.encode(body.prompt, body.add_special_tokens, None, "prompt")
        token_strs = [self.token_str(token_id) for token_id in token_ids] if body.return_token_strs else None
        return p.TokenizeResponse(count=len(token_ids), max_model_len=self.max_model_len, tokens=token_ids,
                                  token_strs=token_strs)

    def detokenize(self, token_ids: List[int]) -> str:
        """/detokenize's text. Blocking: call through offload()."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "tokens")
        if any(token_id < 0 for token_id in token_ids):
            raise APIError(400, "token ids must be non-negative", "tokens")
        try:
            return self.tokenizer.decode(token_ids)
        except Exception as error:  # out-of-vocabulary ids: the tokenizer's own message says which
            raise APIError(400, f"cannot detokenize: {error}", "tokens") from None

    async def submit(self, request_id: str, prompts: List[_Prompt], params: SamplingParams) -> RequestStream:
        items = [GenerateItem(f"{request_id}-{index}", {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids},
                              params) for index, prompt in enumerate(prompts)]
        try:
            return await self.engine_loop.submit(items)
        except ValueError as error:
            raise APIError(400, str(error)) from None

    # ---- logprobs ---------------------------------------------------------------------------------

    def _decode_one(self, token_id: int) -> str:
        """One token's text, special tokens spelled out (logprobs and /tokenize show them)."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        try:
            return self.tokenizer.decode([token_id], skip_special_tokens=False)
        except TypeError:  # a tokenizer without the keyword
            return self.tokenizer.decode([token_id])

    @staticmethod
    def _ranked(entry: Dict[int, object], num_top: int) -> List[tuple]:
        """[(token_id, Logprob)] of the top num_top alternatives, by rank."""
        ranked = [(token_id, lp) for token_id, lp in entry.items() if lp.rank is not None and lp.rank <= num_top]
        return sorted(ranked, key=lambda pair: pair[1].rank)

    def completion_logprobs(self, seq: CompletionOutput, start: int, num_top: int, state: _ChoiceState
                            ) -> Optional[p.CompletionLogprobs]:
        if seq.logprobs is None:
            return None
        result = p.CompletionLogprobs()
        end = min(len(seq.token_ids), len(seq.logprobs))
        for position in range(start, end):
            token_id, entry = seq.token_ids[position], seq.logprobs[position]
            token = entry[token_id].decoded_token if token_id in entry else None
            token = token if token is not None else self.token_str(token_id)
            result.tokens.append(token)
            result.token_logprobs.append(p.clamp_logprob(entry[token_id].logprob) if token_id in entry else None)
            top = {self.token_str(tid): p.clamp_logprob(lp.logprob) for tid, lp in self._ranked(entry, num_top)}
            if token_id in entry:
                top.setdefault(token, p.clamp_logprob(entry[token_id].logprob))
            result.top_logprobs.append(top)
            result.text_offset.append(state.text_offset)
            state.text_offset += len(token)
        state.num_tokens = max(state.num_tokens, end)
        return result

    def chat_logprobs(self, seq: CompletionOutput, start: int, num_top: int, state: _ChoiceState
                      ) -> Optional[p.ChatLogprobs]:
        if seq.logprobs is None:
            return None
        content = []
        end = min(len(seq.token_ids), len(seq.logprobs))
        for position in range(start, end):
            token_id, entry = seq.token_ids[position], seq.logprobs[position]
            token = self.token_str(token_id)
            logprob = p.clamp_logprob(entry[token_id].logprob) if token_id in entry else p.LOGPROB_FLOOR
            top = [p.ChatLogprobEntry(token=self.token_str(tid), logprob=p.clamp_logprob(lp.logprob),
                                      bytes=list(self.token_str(tid).encode("utf-8")))
                   for tid, lp in self._ranked(entry, num_top)]
            content.append(p.ChatLogprobContent(token=token, logprob=logprob, bytes=list(token.encode("utf-8")),
                                                top_logprobs=top))
        state.num_tokens = max(state.num_tokens, end)
        return p.ChatLogprobs(content=content)

    # ---- waiting ----------------------------------------------------------------------------------

    async def collect(self, stream: RequestStream, request: Request) -> Optional[Dict[str, RequestOutput]]:
        """The final outputs, or None when the client went away first (then its requests are aborted)."""
        with stream:
            final = asyncio.ensure_future(stream.final())
            gone = asyncio.ensure_future(_client_disconnected(request))
            try:
                await asyncio.wait({final, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not final.done():
                    final.cancel()
            if final.done() and not final.cancelled():
                return final.result()
            return None


async def _client_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the request body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _usage(prompts: List[_Prompt], outputs: Dict[str, RequestOutput]) -> p.UsageInfo:
    prompt_tokens = sum(len(prompt.token_ids) for prompt in prompts)
    completion_tokens = sum(len(seq.token_ids) for output in outputs.values() for seq in output.outputs)
    cached_tokens = sum(int(getattr(output, "num_cached_tokens", 0) or 0) for output in outputs.values())
    return p.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens,
                       prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens))


def _text_delta(seq: CompletionOutput, state: _ChoiceState, hold_back: int) -> str:
    """New text of a choice. While it runs, the last hold_back characters wait: they may be the start of a
    stop string that the engine will cut off, and a streamed character cannot be taken back."""
    text = seq.text
    limit = len(text) if seq.finish_reason is not None else len(text) - hold_back
    if limit <= state.num_chars:
        return ""
    delta = text[state.num_chars:limit]
    state.num_chars = limit
    return delta


def _hold_back(params: SamplingParams) -> int:
    return max((len(stop) for stop in params.stop_list), default=1) - 1


def _event_stream(events: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
    """An SSE response; its background task aborts what is left even if the client left before the
    first event, when the generator (whose own `with stream` would do it) never started."""
    async def close() -> None:
        stream.close()

    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS,
                             background=BackgroundTask(close))


def _sse(chunk: p.ResponseModel, include_usage: bool) -> str:
    return f"data: {chunk.model_dump_json() if include_usage else chunk.model_dump_json(exclude={'usage'})}\n\n"


# ---- /v1/completions ----------------------------------------------------------------------------

async def create_completion(server: OpenAIServer, body: p.CompletionRequest, request: Request):
    model = server.check_model(body.model)
    params = server.sampling_params(body, chat=False)
    items = server.completion_items(body)
    server.check_capacity(len(items), body)
    for item in items:
        if isinstance(item, str):
            server.quick_check_length(item, body.max_tokens, "prompt")
    prompts = await server.offload(server.completion_prompts, items, body.add_special_tokens, body.max_tokens)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = await server.submit(request_id, prompts, params)
    if body.stream:
        return _event_stream(_completion_events(server, body, stream, prompts, params, request_id, created, model),
                             stream)
    outputs = await server.collect(stream, request)
    if outputs is None:
        return Response(status_code=499)
    choices = []
    for prompt_index, prompt in enumerate(prompts):
        output = outputs[f"{request_id}-{prompt_index}"]
        prefix = _echo_text(server, prompt) if body.echo else ""
        for seq in output.outputs:
            state = _ChoiceState(text_offset=len(prefix))
            choices.append(p.CompletionChoice(
                index=prompt_index * params.n + seq.index, text=prefix + seq.text,
                logprobs=server.completion_logprobs(seq, 0, params.logprobs or 0, state),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
    response = p.CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                    usage=_usage(prompts, outputs))
    return JSONResponse(response.model_dump())


def _echo_text(server: OpenAIServer, prompt: _Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return server.tokenizer.decode(prompt.token_ids) if server.tokenizer is not None else ""


async def _completion_events(server: OpenAIServer, body: p.CompletionRequest, stream: RequestStream,
                             prompts: List[_Prompt], params: SamplingParams, request_id: str, created: int,
                             model: str) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous_usage = include_usage and body.stream_options.continuous_usage_stats
    prompt_index_of = {f"{request_id}-{index}": index for index in range(len(prompts))}
    states: Dict[int, _ChoiceState] = {}
    hold_back = _hold_back(params)
    with stream:
        try:
            async for changed in stream.updates():
                for engine_request_id, output in changed.items():
                    prompt_index = prompt_index_of[engine_request_id]
                    for seq in output.outputs:
                        index = prompt_index * params.n + seq.index
                        state = states.get(index)
                        prefix = ""
                        if state is None:
                            prefix = _echo_text(server, prompts[prompt_index]) if body.echo else ""
                            state = states[index] = _ChoiceState(text_offset=len(prefix))
                        if state.finished:
                            continue
                        start = state.num_tokens
                        logprobs = (server.completion_logprobs(seq, start, params.logprobs or 0, state)
                                    if params.logprobs is not None else None)
                        text = prefix + _text_delta(seq, state, hold_back)
                        state.finished = seq.finish_reason is not None
                        if not text and not state.finished and not (logprobs and logprobs.tokens):
                            continue
                        chunk = p.CompletionStreamResponse(
                            id=request_id, created=created, model=model,
                            choices=[p.CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                        finish_reason=seq.finish_reason,
                                                        stop_reason=seq.stop_reason)],
                            usage=_usage(prompts, stream.latest) if continuous_usage else None)
                        yield _sse(chunk, include_usage)
        except ServiceUnavailableError as error:
            yield error_event(503, str(error))
            yield "data: [DONE]\n\n"
            return
    if include_usage:
        final = p.CompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                           usage=_usage(prompts, stream.latest))
        yield _sse(final, True)
    yield "data: [DONE]\n\n"


# ---- /v1/chat/completions -----------------------------------------------------------------------

async def create_chat_completion(server: OpenAIServer, body: p.ChatCompletionRequest, request: Request):
    model = server.check_model(body.model)
    params = server.sampling_params(body, chat=True)
    server.check_capacity(1, body)
    prompt = await server.offload(server.render_chat, body.messages, body.add_generation_prompt,
                                  body.add_special_tokens, body.requested_max_tokens)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stream = await server.submit(request_id, [prompt], params)
    num_top = body.top_logprobs or 0
    if body.stream:
        return _event_stream(_chat_events(server, body, stream, prompt, params, request_id, created, model), stream)
    outputs = await server.collect(stream, request)
    if outputs is None:
        return Response(status_code=499)
    output = outputs[f"{request_id}-0"]
    choices = [p.ChatChoice(index=seq.index, message=p.ChatResponseMessage(content=seq.text),
                            logprobs=server.chat_logprobs(seq, 0, num_top, _ChoiceState()) if body.logprobs else None,
                            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
               for seq in output.outputs]
    response = p.ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                        usage=_usage([prompt], outputs))
    return JSONResponse(response.model_dump())


async def _chat_events(server: OpenAIServer, body: p.ChatCompletionRequest, stream: RequestStream, prompt: _Prompt,
                       params: SamplingParams, request_id: str, created: int, model: str) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    continuous_usage = include_usage and body.stream_options.continuous_usage_stats
    num_top = body.top_logprobs or 0
    hold_back = _hold_back(params)
    states = [_ChoiceState() for _ in range(params.n)]

    def chunk(choice: p.ChatStreamChoice) -> str:
        usage = _usage([prompt], stream.latest) if continuous_usage else None
        return _sse(p.ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[choice],
                                                   usage=usage), include_usage)

    with stream:
        try:
            for index in range(params.n):
                yield chunk(p.ChatStreamChoice(index=index, delta=p.DeltaMessage(role="assistant", content="")))
            async for changed in stream.updates():
                for output in changed.values():
                    for seq in output.outputs:
                        state = states[seq.index]
                        if state.finished:
                            continue
                        logprobs = (server.chat_logprobs(seq, state.num_tokens, num_top, state)
                                    if body.logprobs else None)
                        text = _text_delta(seq, state, hold_back)
                        state.finished = seq.finish_reason is not None
                        if not text and not state.finished and not (logprobs and logprobs.content):
                            continue
                        yield chunk(p.ChatStreamChoice(index=seq.index, delta=p.DeltaMessage(content=text or None),
                                                       logprobs=logprobs, finish_reason=seq.finish_reason,
                                                       stop_reason=seq.stop_reason))
        except ServiceUnavailableError as error:
            yield error_event(503, str(error))
            yield "data: [DONE]\n\n"
            return
    if include_usage:
        final = p.ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[],
                                               usage=_usage([prompt], stream.latest))
        yield _sse(final, True)
    yield "data: [DONE]\n\n"


# ---- the app ------------------------------------------------------------------------------------

def _validation_message(errors: Sequence[dict]) -> tuple:
    messages: List[str] = []
    param = None
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error") or error.get("msg", "")
            messages.append(f"The request body is not valid JSON: {detail}")
            continue
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        field = ".".join(loc)
        param = param or field or None
        text = f"{field or 'request body'}: {error.get('msg', 'invalid')}"
        if text not in messages:
            messages.append(text)
    if len(messages) > 4:
        messages = messages[:4] + [f"... and {len(messages) - 4} more"]
    return "; ".join(messages) or "invalid request", param


def build_app(engine, served_model_name: Union[str, Sequence[str], None] = None, *,
              max_pending_requests: int = 4096, shutdown_grace_s: float = 30.0, max_n: int = 128,
              max_request_body_bytes: Optional[int] = None) -> FastAPI:
    """The OpenAI-compatible app around an Engine (or anything with its add_request/step/abort API).

    served_model_name: the name(s) clients put in "model" (default: engine.model). The app's lifespan
    starts the engine thread and stops it; app.state.engine_loop and app.state.metrics expose both.
    max_pending_requests: sequences (prompts x n) queued or running beyond which requests get 503; a
    request that alone exceeds it gets 400. max_request_body_bytes: larger bodies get 413 (default:
    default_max_body_bytes, from max_model_len and the tokenizer).

    Example:
        >>> app = build_app(Engine("smollm2-135m-instruct"), "smollm2")
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    if served_model_name is None:
        served_model_name = str(getattr(engine, "model", "model"))
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"served_model_name must be a non-empty name or list of names, got {served_model_name!r}")
    if max_request_body_bytes is None:
        max_request_body_bytes = default_max_body_bytes(int(engine.max_model_len), engine.tokenizer)
    if max_request_body_bytes < 1:
        raise ValueError(f"max_request_body_bytes must be >= 1, got {max_request_body_bytes}")
    metrics = ServerMetrics(names[0])
    engine_loop = EngineLoop(engine, metrics, max_pending_requests=max_pending_requests,
                             shutdown_grace_s=shutdown_grace_s)
    server = OpenAIServer(engine, names, engine_loop, metrics, max_n=max_n)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.stop)
            server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lserve", lifespan=lifespan)
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics
    app.state.server = server
    app.state.max_request_body_bytes = max_request_body_bytes
    # The last added runs first: the size cap before anything reads the body.
    app.add_middleware(InternalErrors)
    app.add_middleware(BodySizeLimit, max_body_bytes=max_request_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_response(error.status_code, error.message, error.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        message, param = _validation_message(error.errors())
        return error_response(400, message, param)

    @app.exception_handler(ServiceUnavailableError)
    async def _unavailable(request: Request, error: ServiceUnavailableError):
        return error_response(503, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        return await create_completion(server, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await create_chat_completion(server, body, request)

    @app.get("/v1/models")
    async def models():
        root = str(getattr(engine, "model", names[0]))
        cards = [p.ModelCard(id=name, root=root, max_model_len=server.max_model_len) for name in names]
        return JSONResponse(p.ModelList(data=cards).model_dump())

    @app.post("/tokenize")
    async def tokenize(body: Union[p.TokenizeCompletionRequest, p.TokenizeChatRequest]):
        server.check_model(body.model)
        if isinstance(body, p.TokenizeCompletionRequest):
            server.quick_check_length(body.prompt, None, "prompt")
        return JSONResponse((await server.offload(server.tokenize, body)).model_dump())

    @app.post("/detokenize")
    async def detokenize(body: p.DetokenizeRequest):
        server.check_model(body.model)
        text = await server.offload(server.detokenize, body.tokens)
        return JSONResponse(p.DetokenizeResponse(prompt=text).model_dump())

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """Forgets every cached prefix page (as vLLM's endpoint does); requests in flight keep theirs."""
        if not hasattr(engine, "reset_prefix_cache"):
            raise APIError(400, "this engine has no prefix cache")
        await engine_loop.call(lambda eng: eng.reset_prefix_cache())
        return Response(status_code=200)

    @app.get("/health")
    async def health():
        if not engine_loop.is_alive:
            return error_response(503, f"the engine is not running: {engine_loop.error or 'stopped'}")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        from lserve import __version__

        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(engine_loop.stats), media_type=CONTENT_TYPE)

    return app
