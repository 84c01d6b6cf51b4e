"""Tokenizer: text <-> token ids, chat templates and streaming detokenisation.

A thin layer over a `tokenizers.Tokenizer`, built either from a Hugging Face directory
(tokenizer.json + tokenizer_config.json) or from a GGUF file's tokenizer.ggml.* metadata. For GGUF
byte-level BPE ("gpt2") vocabularies the result matches what transformers builds for the same file
(AutoTokenizer.from_pretrained(dir, gguf_file=...), transformers/integrations/gguf/
gguf_tokenizer_mapping.py), so the ids are identical; tests/test_tokenizer.py checks it.
Every failure raises ValueError with the reason.

    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    stream = tok.incremental_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]  # "".join(pieces) == tok.decode(ids)
"""
from __future__ import annotations

import functools
import json
import os
import sys
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from lserve.text import check_text

# GGUF token types (llama.cpp llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# GGUF metadata types the tokenizer accepts, as _C.GgufFile.value_type() names them: (type, item type).
_GGUF_INTEGERS = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")
_GGUF_TYPES = {
    "string": {("string", "string")},
    "bool": {("bool", "bool")},
    "integer": {(name, name) for name in _GGUF_INTEGERS},
    "array of string": {("array", "string")},
    "array of integers": {("array", name) for name in _GGUF_INTEGERS},
}

# tokenizer.ggml.pre values whose split rule is GPT-2's, which ByteLevel(use_regex=True) applies.
# "smollm" is listed although llama.cpp also splits digits one by one for it: SmolLM's vocabulary
# has no merge that joins a digit to anything, so both give the same ids (and transformers uses
# GPT-2's rule for it too).
_GPT2_SPLIT_PRE = {"default", "gpt2", "smollm"}
# Other split rules, as regular expressions (llama.cpp llama-vocab.cpp, per pre-tokenizer type).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_SPLIT_PRE = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    other 68 bytes take the code points from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders
    its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which chat templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


def _compile_chat_template(source: str, origin: str = "chat template") -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ValueError(f"{origin} does not compile: {error} (line {error.lineno})") from None
    except RecursionError:  # Jinja's parser and compiler recurse once per nesting level
        raise ValueError(f"{origin} does not compile: it nests deeper than Python's recursion limit "
                         f"({sys.getrecursionlimit()})") from None


def _special_post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    """TemplateProcessing that prepends `bos` and/or appends `eos` (either may be None)."""
    single = ([f"{bos[0]}:0"] if bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if eos else [])
    pair = single + ([f"{bos[0]}:1"] if bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if eos else [])
    special = [token for token in (bos, eos) if token is not None]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


class Tokenizer:
    """Token ids <-> text for one model; build with from_gguf() or from_pretrained()."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None, chat_template: str | None = None,
                 chat_template_origin: str = "chat template"):
        """chat_template_origin names the template in errors, e.g. "model.gguf: tokenizer.chat_template"."""
        self._backend = backend
        self._special = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token,
                         "pad_token": pad_token}
        for name, token in self._special.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        self.chat_template = chat_template
        self._chat_template_origin = chat_template_origin
        self._compiled_template = None

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_file) -> "Tokenizer":
        """Builds the tokenizer a GGUF file describes (tokenizer.ggml.model == "gpt2": byte-level BPE).

        Control tokens (token_type 3) become special added tokens and user-defined ones (4) plain
        added tokens, so both stay whole in text; BOS/EOS are added as tokenizer.ggml.add_bos_token /
        add_eos_token say (default: no). Example: Tokenizer.from_gguf("model.gguf").encode("Hi") -> [...]
        """
        from lserve import _C

        file = path_or_file if isinstance(path_or_file, _C.GgufFile) else _C.GgufFile(os.fspath(path_or_file))

        def get(key, expected, default=None):
            """The value of `key` (default when absent); a value of another type than `expected` (a
            _GGUF_TYPES key) raises naming the file, the key and both types."""
            if not file.has_key(key):
                return default
            value_type, item_type = file.value_type(key)
            if (value_type, item_type) not in _GGUF_TYPES[expected]:
                found = f"array of {item_type}" if value_type == "array" else value_type
                raise ValueError(f"{file.path}: metadata '{key}' has type {found}, expected {expected}")
            return file.get(key)

        model = get("tokenizer.ggml.model", "string")
        if model is None:
            raise ValueError(f"{file.path}: no tokenizer.ggml.model in the metadata")
        if model != "gpt2":
            raise ValueError(f"{file.path}: tokenizer.ggml.model {model!r} is not supported (supported: gpt2)")
        tokens = get("tokenizer.ggml.tokens", "array of string")
        merges = get("tokenizer.ggml.merges", "array of string")
        if not tokens or merges is None:
            raise ValueError(f"{file.path}: a gpt2 tokenizer needs tokenizer.ggml.tokens and tokenizer.ggml.merges")
        token_types = get("tokenizer.ggml.token_type", "array of integers") or []
        if token_types and len(token_types) != len(tokens):
            raise ValueError(f"{file.path}: tokenizer.ggml.token_type has {len(token_types)} entries for "
                             f"{len(tokens)} tokens")

        # Tokens are written in GPT-2's byte alphabet; one that is not (a mislabelled token) is spelled
        # out byte by byte, as transformers does, so the vocabulary keeps its size.
        alphabet = _byte_alphabet()
        letters = set(alphabet.values())
        vocab = {}
        for token_id, token in enumerate(tokens):
            spelled = token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8"))
            vocab[spelled] = token_id
        merge_pairs = []
        for merge in merges:
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{file.path}: merge {merge!r} is not two tokens separated by one space")
            merge_pairs.append((parts[0], parts[1]))
        try:
            bpe = models.BPE(vocab=vocab, merges=merge_pairs, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False)
        except Exception as error:  # tokenizers raises its own exception type
            raise ValueError(f"{file.path}: cannot build the BPE model: {error}") from None
        backend = BackendTokenizer(bpe)

        pre = get("tokenizer.ggml.pre", "string", "default")
        if pre in _GPT2_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif pre in _REGEX_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_REGEX_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            supported = sorted(_GPT2_SPLIT_PRE | set(_REGEX_SPLIT_PRE))
            raise ValueError(f"{file.path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {supported})")
        backend.decoder = decoders.ByteLevel()

        control = [AddedToken(token, normalized=False, special=True)
                   for token, token_type in zip(tokens, token_types)
                   if token_type == _TOKEN_TYPE_CONTROL and set(token) <= letters]
        backend.add_special_tokens(control)
        user_defined = [AddedToken(token, normalized=False, special=False)
                        for token, token_type in zip(tokens, token_types)
                        if token_type == _TOKEN_TYPE_USER_DEFINED and token in vocab]
        backend.add_tokens(user_defined)

        def token_of(key):
            token_id = get(key, "integer")
            if token_id is None:
                return None
            if not 0 <= token_id < len(tokens):
                raise ValueError(f"{file.path}: {key} = {token_id} is outside the vocabulary of {len(tokens)}")
            if backend.token_to_id(tokens[token_id]) is None:  # a token not in GPT-2's byte alphabet
                raise ValueError(f"{file.path}: {key} = {token_id} names {tokens[token_id]!r}, which is not a "
                                 "byte-level BPE token")
            return tokens[token_id]

        bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
        add_bos = get("tokenizer.ggml.add_bos_token", "bool", False)
        add_eos = get("tokenizer.ggml.add_eos_token", "bool", False)
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise ValueError(f"{file.path}: add_bos_token / add_eos_token is set but the file names no such token")
        backend.post_processor = _special_post_processor(
            (bos, backend.token_to_id(bos)) if add_bos else None, (eos, backend.token_to_id(eos)) if add_eos else None)
        return cls(backend, bos_token=bos, eos_token=eos, unk_token=token_of("tokenizer.ggml.unknown_token_id"),
                   pad_token=token_of("tokenizer.ggml.padding_token_id"),
                   chat_template=get("tokenizer.chat_template", "string"),
                   chat_template_origin=f"{file.path}: tokenizer.chat_template")

    @classmethod
    def from_pretrained(cls, hf_dir) -> "Tokenizer":
        """Loads tokenizer.json and tokenizer_config.json (chat_template, bos/eos/unk/pad tokens,
        add_bos_token / add_eos_token) from a Hugging Face model directory; the chat template may
        also come from chat_template.jinja or chat_template.json. Example:
        Tokenizer.from_pretrained("/models/Llama-3.2-1B-Instruct").encode("Hi")"""
        hf_dir = os.fspath(hf_dir)
        tokenizer_json = os.path.join(hf_dir, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            raise ValueError(f"{hf_dir}: no tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(tokenizer_json)
        except Exception as error:
            raise ValueError(f"{tokenizer_json}: cannot load: {error}") from None
        config = _read_json(os.path.join(hf_dir, "tokenizer_config.json")) or {}

        def token_text(name):
            token = config.get(name)
            if isinstance(token, Mapping):  # serialised AddedToken
                token = token.get("content")
            if token is not None and not isinstance(token, str):
                raise ValueError(f"{hf_dir}: tokenizer_config.json {name} is {token!r}, expected a string")
            return token

        special = {name: token_text(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        if "add_bos_token" in config or "add_eos_token" in config:  # as transformers' update_post_processor
            bos, eos = special["bos_token"], special["eos_token"]
            add_bos = bool(config.get("add_bos_token")) and bos is not None
            add_eos = bool(config.get("add_eos_token")) and eos is not None
            backend.post_processor = _special_post_processor(
                (bos, backend.token_to_id(bos)) if add_bos else None,
                (eos, backend.token_to_id(eos)) if add_eos else None)
        return cls(backend, chat_template=_read_chat_template(hf_dir, config), **special)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying tokenizers.Tokenizer."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _token_id(self, name: str) -> int | None:
        token = self._special[name]
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    # ---- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_start|>") map to their
        ids. add_special_tokens adds BOS/EOS where the tokenizer is configured to. Text that is not
        valid Unicode (a lone surrogate) raises ValueError.

        Thread-safe, and other Python threads run meanwhile: tokenizers' encode() holds the GIL for
        the whole call (a 6 MB text stopped every other thread for 8 s), encode_batch() releases it."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        check_text(text, "text")
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD. Like encode, it lets other
        threads run while it works."""
        ids = self._check_ids(ids)
        return self._backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    # ---- a lower bound on the token count, without tokenizing -------------------------------------

    @functools.cached_property
    def max_token_text_bytes(self) -> int | None:
        """The most bytes of (normalized) input text that one token can stand for, or None when this
        tokenizer's pipeline may drop text, so that no such bound holds.

        The bound holds for byte-level BPE, what GGUF "gpt2" tokenizers and Llama-3 / Qwen2 tokenizer.json
        files are: the pre-tokenizer maps each input byte to one character, so a vocabulary entry of k
        characters stands for exactly k bytes, and an added token matches its own text. Pre-tokenizers
        that remove text (BERT's Whitespace, a Split with behavior "Removed") and added tokens that strip
        the whitespace around them give None.
        SmolLM2-135M: 81 ("\n" and 80 spaces is one token)."""
        pipeline = json.loads(self._backend.to_str())
        if (pipeline.get("model") or {}).get("type") != "BPE" or not _keeps_every_byte(pipeline.get("pre_tokenizer")):
            return None
        added = self._backend.get_added_tokens_decoder().values()
        if any(token.lstrip or token.rstrip for token in added):  # such a token also swallows a whitespace run
            return None
        vocab = self._backend.get_vocab(with_added_tokens=False)
        longest = max((len(token) for token in vocab), default=1)
        return max([longest, *(len(token.content.encode("utf-8")) for token in added)])

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) at the cost of one pass over the text (the normalizer,
        if any, and a UTF-8 length): ceil(bytes / max_token_text_bytes); 0 when no bound is known."""
        per_token = self.max_token_text_bytes
        if per_token is None:
            return 0
        check_text(text, "text")
        if self._backend.normalizer is not None:
            text = self._backend.normalizer.normalize_str(text)
        return -(-len(text.encode("utf-8")) // per_token)

    def min_num_tokens_of_length(self, num_chars: int) -> int:
        """min_num_tokens for any text of num_chars characters, at no cost (every character is at least
        one byte); 0 when a normalizer could shorten the text or no bound is known."""
        per_token = self.max_token_text_bytes
        if per_token is None or self._backend.normalizer is not None:
            return 0
        return -(-num_chars // per_token)

    def _check_ids(self, ids) -> list[int]:
        ids = [ids] if isinstance(ids, int) else list(ids)
        vocab_size = self.vocab_size
        for token_id in ids:
            if not 0 <= int(token_id) < vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
        return [int(token_id) for token_id in ids]

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        """A streaming detokeniser for one sequence (see IncrementalDecoder)."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the model's Jinja chat
        template in a sandbox, as transformers' apply_chat_template(tokenize=False) does: the template
        sees messages, add_generation_prompt, bos/eos/unk/pad_token and any extra kwargs (tools, ...).
        A template's raise_exception(...) and render errors become ValueError."""
        source = chat_template if chat_template is not None else self.chat_template
        if source is None:
            raise ValueError("this tokenizer has no chat template")
        if not isinstance(messages, Sequence) or isinstance(messages, str):
            raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for message in messages:
            if not isinstance(message, Mapping):
                raise ValueError(f"each message must be a dict, got {message!r}")
        origin = self._chat_template_origin if chat_template is None else "chat template"
        if chat_template is None:
            if self._compiled_template is None:
                self._compiled_template = _compile_chat_template(source, origin)
            template = self._compiled_template
        else:
            template = _compile_chat_template(source, origin)
        context = {name: token for name, token in self._special.items() if token is not None}
        context.update(kwargs)
        try:
            return template.render(messages=[dict(message) for message in messages],
                                   add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"{origin} error: {error}") from None
        except RecursionError:  # a macro that calls itself without end
            raise ValueError(f"{origin} error: rendering recursed deeper than Python's recursion limit "
                             f"({sys.getrecursionlimit()})") from None


class IncrementalDecoder:
    """Streaming detokenisation of one sequence: push() token ids as they are generated and get back
    only the text they complete. Text that ends inside a multi-byte UTF-8 character (decoded as a
    trailing U+FFFD) is held back until a later token completes it; flush() returns whatever is held.
    The concatenation of everything returned equals tokenizer.decode(all ids).

    Method: keep two offsets into the ids, as vLLM's detokenizer does; decode the window from
    prefix_offset twice, up to read_offset (already emitted) and to the end, and emit the difference.
    The window restarts at a character boundary, so decoders that treat a sequence start specially
    (sentencepiece's leading space) see the same context in both decodes.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # everything emitted so far

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Adds one id or several; returns the newly completed text (possibly "")."""
        new_ids = self._tokenizer._check_ids(token_ids)
        self._ids.extend(new_ids)
        decode = self._tokenizer.backend.decode
        window = self._ids[self._prefix_offset:]
        emitted = decode(self._ids[self._prefix_offset:self._read_offset],
                         skip_special_tokens=self._skip_special_tokens)
        full = decode(window, skip_special_tokens=self._skip_special_tokens)
        if len(full) <= len(emitted) or full.endswith("\ufffd") or not full.startswith(emitted):
            return ""
        new_text = full[len(emitted):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """Returns the held-back text, incomplete characters as U+FFFD, and resets the window."""
        decode = self._tokenizer.backend.decode
        emitted = decode(self._ids[self._prefix_offset:self._read_offset],
                         skip_special_tokens=self._skip_special_tokens)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special_tokens)
        new_text = full[len(emitted):]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += new_text
        return new_text


def _keeps_every_byte(pre_tokenizer) -> bool:
    """Whether a tokenizer.json pre_tokenizer hands every input byte on, one character per byte:
    ByteLevel, possibly after Split rules that keep what they match."""
    if pre_tokenizer is None:
        return False
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel":
        return True
    if kind == "Sequence":
        steps = pre_tokenizer.get("pretokenizers") or []
        kinds = [step.get("type") for step in steps]
        keeps = all(kind == "ByteLevel" or (kind == "Split" and step.get("behavior") != "Removed")
                    for kind, step in zip(kinds, steps))
        return keeps and kinds.count("ByteLevel") == 1
    return False


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read: {error}") from None


def _read_chat_template(hf_dir: str, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json's "chat_template", else tokenizer_config.json's.
    A list of named templates resolves to the one named "default"."""
    jinja_path = os.path.join(hf_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as handle:
            return handle.read()
    template = (_read_json(os.path.join(hf_dir, "chat_template.json")) or {}).get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{hf_dir}: chat_template is {type(template).__name__}, expected a string")
    return template
