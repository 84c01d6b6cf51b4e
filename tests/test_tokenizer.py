"""lserve.tokenizer.Tokenizer against transformers' AutoTokenizer for the same GGUF / directory.

References: AutoTokenizer.from_pretrained(dir, gguf_file=...) (encode, decode, apply_chat_template
with tokenize=False); the concatenated output of IncrementalDecoder against a one-shot decode.
"""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from conftest_gguf import shared_gguf_reader, smollm2_gguf_path
from lserve import _C
from lserve.tokenizer import Tokenizer

SEED = 4321

TEXTS = [
    "Hello world",
    " Hello world",
    "",
    " ",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159 -42 1e10 0x1F 2024-01-31",
    "Numbers: 1 12 123 1234 12345",
    "héllo wörld, ça va? Ñandú",
    "日本語のテキストと中文文本，以及한국어",
    "Emoji: 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "tabs\tand\t\ttabs, newlines\n\n\nand   runs    of     spaces",
    "trailing spaces   ",
    "\n\n\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|im_start|>",
    "not special: <|im_star|> <im_start> < |im_start| >",
    "It's they're we've I'm you'll he'd CAN'T",
    "Ünïcödé ßtraße ΑΒΓ αβγ Привет мир עברית العربية",
    "mixed\r\nline\rendings\n",
    "URL: https://example.com/path?q=1&b=2#frag",
    "\u200b zero width \u00a0 nbsp \ufeff bom",
    "a" * 300,
    "<repo_name>lserve<file_sep>src/main.cpp<filename>x.py",
]


@pytest.fixture(scope="module")
def tokenizers():
    path = smollm2_gguf_path()
    transformers = pytest.importorskip("transformers")
    with shared_gguf_reader(path):
        reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                               gguf_file=os.path.basename(path))
    return Tokenizer.from_gguf(path), reference


def test_special_ids_and_size(tokenizers):
    ours, reference = tokenizers
    assert ours.vocab_size == len(reference) == 49152
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_id == reference.eos_token_id == 2
    assert ours.bos_token == reference.bos_token and ours.eos_token == reference.eos_token
    assert ours.chat_template == reference.chat_template


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tokenizers, add_special_tokens):
    ours, reference = tokenizers
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, repr(text)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tokenizers, skip_special_tokens):
    ours, reference = tokenizers
    rng = np.random.default_rng(SEED)
    sequences = [reference.encode(text) for text in TEXTS]
    sequences += [rng.integers(0, ours.vocab_size, size=int(rng.integers(1, 40))).tolist() for _ in range(20)]
    sequences += [[0, 1, 2, 3, 17, 100, 2], [1, 2], rng.integers(0, 17, size=10).tolist()]  # special-heavy
    for ids in sequences:
        expected = reference.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected, ids
    for text in TEXTS:  # round trip
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_decoding_equals_full_decoding(tokenizers, skip_special_tokens):
    ours, _ = tokenizers
    rng = np.random.default_rng(SEED)
    sequences = [ours.encode(text) for text in TEXTS]
    sequences += [rng.integers(0, ours.vocab_size, size=int(rng.integers(1, 60))).tolist() for _ in range(30)]
    # byte tokens that split multi-byte characters: U+1F600 = f0 9f 98 80 in the byte alphabet
    sequences.append([ours.backend.token_to_id(ch) for ch in "ðŁĺĢ"] * 3)
    for ids in sequences:
        full = ours.decode(ids, skip_special_tokens=skip_special_tokens)
        stream = ours.incremental_decoder(skip_special_tokens=skip_special_tokens)
        pieces = [stream.push(token_id) for token_id in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == full == stream.text, ids
        if "\ufffd" not in full:  # nothing broken was ever emitted
            assert all("\ufffd" not in piece for piece in pieces), ids
    # several ids per push
    ids = ours.encode(TEXTS[9] + TEXTS[8])
    stream = ours.incremental_decoder()
    pieces = [stream.push(ids[start:start + 3]) for start in range(0, len(ids), 3)] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids)


def test_incremental_decoder_holds_incomplete_characters(tokenizers):
    ours, _ = tokenizers
    stream = ours.incremental_decoder()
    byte_ids = [ours.backend.token_to_id(ch) for ch in "ðŁĺĢ"]  # one emoji, byte by byte
    assert [stream.push(token_id) for token_id in byte_ids] == ["", "", "", "\U0001F600"]
    stream.push(byte_ids[:2])
    assert stream.flush() == ours.decode(byte_ids[:2]) and stream.flush() == ""


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 🐍 and C++.\nTwo lines please."}],
    [{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Qu'est-ce que GGUF?"},
     {"role": "assistant", "content": "Un format de fichier."}],
    [{"role": "user", "content": "  spaces  \n\n"}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizers, add_generation_prompt):
    ours, reference = tokenizers
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert got == expected, messages
        assert ours.encode(got, add_special_tokens=False) == reference.encode(expected, add_special_tokens=False)


def test_chat_template_errors(tokenizers):
    ours, _ = tokenizers
    with pytest.raises(ValueError, match="no roles"):
        ours.apply_chat_template([], chat_template="{{ raise_exception('no roles') }}")
    with pytest.raises(ValueError, match="does not compile"):
        ours.apply_chat_template([], chat_template="{% for %}")
    with pytest.raises(ValueError, match="list of dicts"):
        ours.apply_chat_template("hello")
    with pytest.raises(ValueError, match="security|unsafe|access"):  # the sandbox holds
        ours.apply_chat_template([], chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    rendered = ours.apply_chat_template(
        [{"role": "user", "content": "x"}],
        chat_template="{% generation %}{{ messages | tojson }}{% endgeneration %}{{ bos_token }}")
    assert rendered == '[{"role": "user", "content": "x"}]<|im_start|>'
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])


def test_from_gguf_accepts_open_file(tokenizers):
    ours, _ = tokenizers
    again = Tokenizer.from_gguf(_C.GgufFile(smollm2_gguf_path()))
    assert again.encode(TEXTS[9]) == ours.encode(TEXTS[9])


def test_from_pretrained_matches_transformers(tokenizers, tmp_path):
    """A Hugging Face directory (saved by transformers from the GGUF tokenizer) loads the same way."""
    ours_gguf, reference = tokenizers
    transformers = pytest.importorskip("transformers")
    reference.save_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.eos_token_id == reloaded.eos_token_id and ours.bos_token_id == reloaded.bos_token_id
    for text in TEXTS:
        assert ours.encode(text) == reloaded.encode(text) == ours_gguf.encode(text), repr(text)
    for messages in CONVERSATIONS[:2]:
        assert ours.apply_chat_template(messages) == reloaded.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "missing")


# ---- synthetic GGUF tokenizers: pre-tokenizer variants and errors --------------------------------

CORPUS = [
    "Hello world! It's 2024 and we've 1234567 reasons.", "The the THE them there; they're here.",
    "x=12345; y = x*3 // 7\n\n  indent\r\nwin", "don't stop, we'll go; I'D say 99 bottles", "ab12cd 345ef ..!!??",
]


def _write_tokenizer_gguf(path, pre: str | None, model: str = "gpt2"):
    """A llama GGUF whose byte-level BPE merges were learned without any pre-tokenization, so they
    cross word, digit and punctuation boundaries and every split rule gives different ids."""
    from tokenizers import Tokenizer as BackendTokenizer, models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|eot|>", "<|user|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS * 4, trainer)
    vocab = backend.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    model_json = __import__("json").loads(backend.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model_json["merges"]]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in {"llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": 8,
                       "llama.feed_forward_length": 8, "llama.attention.head_count": 1}.items():
        writer.add_uint32(key, value)
    writer.add_string("tokenizer.ggml.model", model)
    if pre is not None:
        writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_array("tokenizer.ggml.token_type", [3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_uint32("tokenizer.ggml.bos_token_id", vocab["<|user|>"])
    writer.add_uint32("tokenizer.ggml.eos_token_id", vocab["<|eot|>"])
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2", None])
def test_pre_tokenizer_variants_match_transformers(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tok.gguf"
    _write_tokenizer_gguf(path, pre)
    ours = Tokenizer.from_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in CORPUS + TEXTS[:12]:
        assert ours.encode(text) == reference.encode(text), (pre, text)
        assert ours.encode(text)[0] == ours.bos_token_id  # add_bos_token is set
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_unsupported_gguf_tokenizers(tmp_path):
    path = tmp_path / "tok.gguf"
    _write_tokenizer_gguf(path, "some-new-pre")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'some-new-pre' is not supported"):
        Tokenizer.from_gguf(path)
    _write_tokenizer_gguf(path, "gpt2", model="llama")
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama' is not supported"):
        Tokenizer.from_gguf(path)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no tokenizer.ggml.model"):
        Tokenizer.from_gguf(path)
