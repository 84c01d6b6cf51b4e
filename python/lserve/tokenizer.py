"""Tokenizer: Hugging Face `tokenizers` models built from GGUF metadata or a tokenizer.json, chat
templates rendered with sandboxed jinja2 (as transformers renders them), and an incremental
decoder for streaming that never emits half a UTF-8 character.

Example:
    >>> tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> ids = tok.encode("Hello world")
    >>> tok.decode(ids)
    'Hello world'
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Sequence

_GGUF_CONTROL = 3  # tokenizer.ggml.token_type: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
_GGUF_USER_DEFINED = 4


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas (vLLM's prefix/read offsets scheme)."""

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: List[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):]


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` with BOS handling, special tokens and a chat template."""

    def __init__(self, backend, *, bos_token: Optional[str], eos_token: Optional[str], add_bos_token: bool,
                 chat_template: Optional[str]) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """From a GGUF file path or an lserve._C.GgufFile (tokenizer.ggml.model == "gpt2")."""
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        if isinstance(source, (str, os.PathLike)):
            from lserve import _C

            source = _C.GgufFile(str(source))
        kind = source.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (lserve reads byte-level BPE, 'gpt2')")
        tokens: List[str] = source.get("tokenizer.ggml.tokens") or []
        merges_raw: List[str] = source.get("tokenizer.ggml.merges") or []
        types: List[int] = source.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if not tokens or len(types) != len(tokens):
            raise ValueError("GGUF tokenizer metadata is incomplete (tokens / token_type missing or mismatched)")
        vocab = {token: index for index, token in enumerate(tokens)}
        merges = []
        for merge in merges_raw:
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"GGUF merge {merge!r} is not two space-separated symbols")
            merges.append((parts[0], parts[1]))
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                         end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, t in enumerate(types) if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)]
        backend.add_special_tokens(specials)

        def token_of(key: str) -> Optional[str]:
            index = source.get(key)
            return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

        return cls(backend, bos_token=token_of("tokenizer.ggml.bos_token_id"),
                   eos_token=token_of("tokenizer.ggml.eos_token_id"),
                   add_bos_token=bool(source.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=source.get("tokenizer.chat_template"))

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        """From a Hugging Face directory holding tokenizer.json (and tokenizer_config.json)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = os.path.join(str(directory), "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"no tokenizer.json in {directory}")
        backend = HFTokenizer.from_file(path)
        config: Dict = {}
        config_path = os.path.join(str(directory), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)

        def token_text(value) -> Optional[str]:
            return value.get("content") if isinstance(value, dict) else value

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # The post-processor of tokenizer.json already adds BOS where the model wants it.
        return cls(backend, bos_token=token_text(config.get("bos_token")), eos_token=token_text(config.get("eos_token")),
                   add_bos_token=False, chat_template=template)

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a string, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders a conversation with the model's template (jinja2 sandbox, as transformers does)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
