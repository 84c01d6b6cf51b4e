"""A fake Engine for server tests: lserve.Engine's request API with a toy deterministic "model".

One token per character (id = code point + 4). Greedy decoding picks a letter from a hash of the
whole context, so a sequence's tokens do not depend on what else is in the batch; sampling draws
from a per-sequence random.Random(seed + index), so seeds reproduce. Prompts containing "<eos>"
end with EOS after three tokens. Steps run at most max_num_seqs sequences (the rest wait), sleep
step_delay seconds, and record batch sizes and the calling threads, so tests can check batching
and that every engine call came from one thread.
"""
from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional

from lserve.outputs import CompletionOutput, Logprob, RequestOutput
from lserve.sampling import SamplingParams

OFFSET = 4
BOS, EOS, UNK = 1, 2, 3
VOCAB_SIZE = 1024


class FakeTokenizer:
    bos_token_id = BOS
    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = [ord(ch) + OFFSET if ord(ch) + OFFSET < VOCAB_SIZE else UNK for ch in text]
        return ([BOS] if add_special_tokens else []) + ids

    def decode(self, ids) -> str:
        for token_id in ids:
            if not 0 <= int(token_id) < VOCAB_SIZE:
                raise ValueError(f"token id {token_id} is outside the vocabulary")
        return "".join(chr(int(token_id) - OFFSET) for token_id in ids if int(token_id) >= OFFSET)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        parts = []
        for message in messages:
            if message["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {message['role']!r}")
            parts.append(f"<{message['role']}>{message['content']}\n")
        return "".join(parts) + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Seq:
    index: int
    rng: random.Random
    token_ids: List[int] = field(default_factory=list)
    text: str = ""
    logprobs: Optional[List[Dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None


@dataclass
class _Req:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    params: SamplingParams
    max_tokens: int
    seqs: List[_Seq]

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.request_id, self.prompt, list(self.prompt_token_ids),
            [CompletionOutput(s.index, s.text, list(s.token_ids), s.cumulative_logprob,
                              None if s.logprobs is None else list(s.logprobs), s.finish_reason, s.stop_reason)
             for s in self.seqs],
            all(s.finish_reason is not None for s in self.seqs))


class FakeEngine:
    def __init__(self, *, max_model_len: int = 128, max_num_seqs: int = 256, num_total_pages: int = 4096,
                 page_size: int = 4, step_delay: float = 0.0, seed: int = 0) -> None:
        self.model = "fake-model"
        self.tokenizer = FakeTokenizer()
        self.vocab_size = VOCAB_SIZE
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_total_pages = num_total_pages
        self.page_size = page_size
        self.step_delay = step_delay
        self.fail_next_step: Optional[Exception] = None
        self.batch_sizes: List[int] = []
        self.calling_threads: set = set()
        self.num_steps = 0
        self._requests: Dict[str, _Req] = {}
        self._seed_rng = random.Random(seed)
        self._counter = 0

    def _enter(self) -> None:
        self.calling_threads.add(threading.get_ident())

    # ---- Engine API ---------------------------------------------------------------------------------

    def add_request(self, request_id, prompt, params: Optional[SamplingParams] = None) -> str:
        self._enter()
        params = params or SamplingParams()
        if isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if ids is None:
                ids = self.tokenizer.encode(text)
        elif isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {VOCAB_SIZE})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}")
        if request_id is None:
            request_id = str(self._counter)
            self._counter += 1
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        seqs = []
        for index in range(params.n):
            seed = self._seed_rng.randrange(2**32) if params.seed is None else params.seed + index
            seq = _Seq(index, random.Random(seed))
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            seqs.append(seq)
        self._requests[request_id] = _Req(request_id, text, ids, params, max_tokens, seqs)
        return request_id

    def abort_request(self, request_id) -> bool:
        self._enter()
        request = self._requests.get(str(request_id))
        if request is None:
            return False
        for seq in request.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        return True

    def has_unfinished_requests(self) -> bool:
        self._enter()
        return bool(self._requests)

    def step(self) -> List[RequestOutput]:
        self._enter()
        if self.fail_next_step is not None:
            error, self.fail_next_step = self.fail_next_step, None
            raise error
        if self.step_delay:
            time.sleep(self.step_delay)
        self.num_steps += 1
        changed: Dict[str, _Req] = {}
        budget = self.max_num_seqs
        batch = 0
        for request in list(self._requests.values()):
            for seq in request.seqs:
                if seq.finish_reason is not None:
                    changed[request.request_id] = request  # an abort surfaces here
                    continue
                if budget == 0:
                    continue
                budget -= 1
                batch += 1
                self._decode_one(request, seq)
                changed[request.request_id] = request
        self.batch_sizes.append(batch)
        outputs = []
        for request in changed.values():
            output = request.output()
            outputs.append(output)
            if output.finished:
                del self._requests[request.request_id]
        return outputs

    def stats(self):
        self._enter()
        running = [s for r in self._requests.values() for s in r.seqs if s.finish_reason is None]
        num_running = min(len(running), self.max_num_seqs)
        used = sum(math.ceil((len(r.prompt_token_ids) + len(s.token_ids)) / self.page_size)
                   for r in self._requests.values() for s in r.seqs if s.finish_reason is None)
        return SimpleNamespace(num_running=num_running, num_waiting=len(running) - num_running,
                               num_total_pages=self.num_total_pages,
                               num_free_pages=max(self.num_total_pages - used, 0), page_size=self.page_size,
                               num_preemptions=0, num_steps=self.num_steps)

    # ---- the toy model ----------------------------------------------------------------------------

    def _decode_one(self, request: _Req, seq: _Seq) -> None:
        params = request.params
        context = request.prompt_token_ids + seq.token_ids
        letters = [ord(c) + OFFSET for c in "abcdefghijklmnopqrstuvwxyz "]
        if params.temperature == 0:
            token = letters[(sum(context) * 31 + len(context)) % len(letters)]
        else:
            token = seq.rng.choice(letters)
        prompt_text = self.tokenizer.decode(request.prompt_token_ids)
        if "<eos>" in prompt_text and len(seq.token_ids) == 3 and not params.ignore_eos:
            token = EOS
        seq.token_ids.append(token)
        seq.text += self.tokenizer.decode([token])
        if seq.logprobs is not None:
            entry = {token: Logprob(-0.5, 1)}
            alternatives = [t for t in letters if t != token][: params.logprobs]
            for rank, alternative in enumerate(alternatives[1:] if params.logprobs else [], start=2):
                entry[alternative] = Logprob(float("-inf") if rank == 5 else -0.5 * rank, rank)
            seq.logprobs.append(entry)
            seq.cumulative_logprob += -0.5
        if token == EOS or token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", (token if token != EOS else None)
        elif len(seq.token_ids) >= request.max_tokens or len(context) + 1 >= self.max_model_len:
            seq.finish_reason = "length"
        for stop in params.stop_list:
            position = seq.text.find(stop)
            if position >= 0:
                end = position + len(stop) if params.include_stop_str_in_output else position
                seq.text = seq.text[:end]
                seq.finish_reason, seq.stop_reason = "stop", stop
                break
