"""Tokenizer.min_num_tokens: a lower bound on the token count that costs no tokenization (issue 13).

The server refuses a prompt before tokenizing it when this bound already exceeds max_model_len, so
the bound must never exceed the real count: checked on seeded random texts built from the pieces that
stress it (whitespace runs, the vocabulary's longest tokens, special-token strings, multi-byte and
decomposed characters), on SmolLM2 and on small tokenizers built here with and without a normalizer.
Pipelines that can drop text have no bound (None), and text that is not valid Unicode is a ValueError.
"""
from __future__ import annotations

import random
import time

import pytest

from conftest_gguf import smollm2_gguf_path
from lserve.tokenizer import Tokenizer

SEED = 1313
PIECES = ["hello", " world", "\n", " " * 80, "\n" + " " * 80, "#" * 80, "=" * 41, "\t\t", "<|im_start|>",
          "<|endoftext|>", "caf\u00e9", "e\u0301", "\u65e5\u672c\u8a9e", "\U0001f600", "\u1100\u1161\u11a8", "123456",
          "'s", "\u00a0", "\r\n", "\ufffd"]


def random_texts(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(PIECES) * rng.randint(1, 30) for _ in range(rng.randint(1, 40)))


@pytest.fixture(scope="module")
def smollm2():
    return Tokenizer.from_gguf(smollm2_gguf_path())


def test_smollm2_bound_is_its_longest_token(smollm2):
    """The bound equals the most bytes any single token decodes to (computed here from decode, not from
    the vocabulary strings the bound reads), so it is as tight as a per-token bound can be."""
    longest = 0
    for token_id in range(smollm2.vocab_size):
        text = smollm2.decode([token_id], skip_special_tokens=False)
        if "\ufffd" not in text:  # a token that stands for part of a character decodes to U+FFFD
            longest = max(longest, len(text.encode("utf-8")))
    assert smollm2.max_token_text_bytes == longest


def test_bound_never_exceeds_the_count(smollm2):
    for index, text in enumerate(random_texts(SEED, 300)):
        for add_special_tokens in (False, True):
            count = len(smollm2.encode(text, add_special_tokens=add_special_tokens))
            bound = smollm2.min_num_tokens(text)
            assert bound <= count, (SEED, index, add_special_tokens, bound, count, text[:80])
        assert smollm2.min_num_tokens_of_length(len(text)) <= smollm2.min_num_tokens(text)


def test_bound_is_reached_by_the_longest_tokens(smollm2):
    text = ("\n" + " " * 80) * 500  # one 81-byte token, 500 times
    assert smollm2.min_num_tokens(text) == len(smollm2.encode(text, add_special_tokens=False)) == 500


def test_text_that_is_not_unicode_is_a_value_error(smollm2):
    for text in ("\ud800", "ok \udfff", "a\ud83d"):
        with pytest.raises(ValueError, match="not valid Unicode"):
            smollm2.encode(text)
        with pytest.raises(ValueError, match="not valid Unicode"):
            smollm2.min_num_tokens(text)
    assert smollm2.encode("\U0001f600")  # a proper pair is fine


def _byte_level(normalizer=None, pre_tokenizer=None, added=()):
    """A byte-level BPE with one token per byte and no merges: its count is exactly the bytes of the
    normalized text, so a bound computed on the raw text instead would overshoot where NFC composes."""
    from tokenizers import AddedToken, Tokenizer as BackendTokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = BackendTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if added:
        backend.add_special_tokens(list(added))
    return Tokenizer(backend)


def test_bound_applies_after_the_normalizer():
    from tokenizers import normalizers

    tokenizer = _byte_level(normalizers.NFC())
    assert tokenizer.max_token_text_bytes == 1
    decomposed = "e\u0301" * 100  # 300 bytes as sent, 200 after NFC composes each pair into U+00E9
    assert len(tokenizer.encode(decomposed)) == 200
    assert tokenizer.min_num_tokens(decomposed) == 200
    assert tokenizer.min_num_tokens_of_length(len(decomposed)) == 0  # no bound from length alone here
    for index, text in enumerate(random_texts(SEED + 1, 100)):
        assert tokenizer.min_num_tokens(text) <= len(tokenizer.encode(text)), (index, text[:80])


def test_pipelines_that_drop_text_have_no_bound():
    from tokenizers import AddedToken, pre_tokenizers

    whitespace = _byte_level(pre_tokenizer=pre_tokenizers.Whitespace())  # drops every space
    assert whitespace.max_token_text_bytes is None and whitespace.min_num_tokens(" " * 10_000) == 0
    removed = _byte_level(pre_tokenizer=pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    assert removed.max_token_text_bytes is None
    stripping = _byte_level(added=[AddedToken("<mask>", lstrip=True, special=True)])  # " " * n + "<mask>" is one token
    assert stripping.max_token_text_bytes is None
    assert len(stripping.encode(" " * 1000 + "<mask>")) < 1000
    keeping = _byte_level(added=[AddedToken("<mask>", special=True)])
    assert keeping.max_token_text_bytes == len("<mask>")


def test_engine_refuses_a_prompt_the_bound_rules_out_before_tokenizing(tmp_path):
    pytest.importorskip("lserve._C")
    from lserve import Engine, SamplingParams

    engine = Engine(smollm2_gguf_path(), max_model_len=256, show_progress=False, kv_cache_memory=64 << 20)
    text = "hello world " * 300_000  # 3.6 MB: several seconds to tokenize
    start = time.perf_counter()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(text, SamplingParams(max_tokens=1), use_tqdm=False)
    assert time.perf_counter() - start < 1.5
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        engine.generate("Hi \ud800", SamplingParams(max_tokens=1), use_tqdm=False)
    assert engine.generate("The capital of France is", SamplingParams(max_tokens=2, temperature=0),
                           use_tqdm=False)[0].outputs[0].token_ids


def test_concurrent_encoding_matches_serial(smollm2):
    """The server tokenizes on several threads at once: the ids must equal a serial run's."""
    from concurrent.futures import ThreadPoolExecutor

    texts = list(random_texts(SEED + 2, 64))
    serial = [smollm2.encode(text) for text in texts]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            assert list(pool.map(smollm2.encode, texts)) == serial
