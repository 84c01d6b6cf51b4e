"""Synthetic passkey-retrieval samples for gate calibration (DuoAttention, arXiv 2410.10819, section 3.2).

A sample is exactly `seq_len` token ids: filler text with `num_passkeys` passkey sentences buried at
random depths, then a question and the answer (the passkeys in order). `label_mask` marks the
positions whose hidden state predicts an answer token: the distillation loss is taken there, where
retrieval heads matter. Models without a tokenizer get the same structure in raw token ids.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Sequence

from lserve.eval.haystack import filler_sentence

_QUESTION = " Question: what are the passkeys, in the order they appeared? Answer: the passkeys are"


@dataclass
class PasskeySample:
    input_ids: List[int]  # (seq_len,)
    label_mask: List[bool]  # (seq_len,), True at positions whose next token is part of the answer


def _passkey(rng: random.Random) -> str:
    return str(rng.randint(10_000, 9_999_999))


def _with_labels(prefix: List[int], answer: List[int]) -> PasskeySample:
    ids = prefix + answer
    mask = [False] * len(ids)
    for pos in range(len(prefix) - 1, len(ids) - 1):
        mask[pos] = True
    return PasskeySample(ids, mask)


class TextPasskeyData:
    """Text samples through a tokenizer with `encode(text, add_special_tokens=False) -> ids`.

    Example:
        >>> data = TextPasskeyData(tokenizer, seq_len=1024, num_passkeys=4)
        >>> sample = data.sample(random.Random(0))
        >>> len(sample.input_ids)
        1024
    """

    def __init__(self, tokenizer, seq_len: int, num_passkeys: int = 4, bos_token_id=None) -> None:
        self._tokenizer = tokenizer
        self.seq_len = seq_len
        self.num_passkeys = num_passkeys
        self._bos = [bos_token_id] if bos_token_id is not None else []
        self._cache: Dict[str, List[int]] = {}
        if seq_len < 64 * (num_passkeys + 1):
            raise ValueError(f"seq_len {seq_len} is too short for {num_passkeys} passkeys")

    def _encode(self, text: str) -> List[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self._tokenizer.encode(text, add_special_tokens=False))
            self._cache[text] = ids
        return ids

    def sample(self, rng: random.Random) -> PasskeySample:
        keys = [_passkey(rng) for _ in range(self.num_passkeys)]
        needles = [self._encode(f" The passkey number {i + 1} is {key}. Remember it, {key} is passkey number "
                                f"{i + 1}.") for i, key in enumerate(keys)]
        question = self._encode(_QUESTION)
        answer = self._encode(" " + ", ".join(keys) + ".")
        budget = self.seq_len - len(self._bos) - sum(map(len, needles)) - len(question) - len(answer)
        if budget < 16:
            raise ValueError(f"seq_len {self.seq_len} leaves no room for filler text")
        filler: List[int] = []
        while len(filler) < budget:
            filler += self._encode(" " + filler_sentence(rng))
        filler = filler[:budget]
        depths = sorted(rng.randrange(0, budget + 1) for _ in needles)
        context: List[int] = []
        start = 0
        for depth, needle in zip(depths, needles):
            context += filler[start:depth] + needle
            start = depth
        context += filler[start:]
        return _with_labels(self._bos + context + question, answer)


class TokenPasskeyData:
    """The same task in raw token ids, for models without a tokenizer (tests, dummy weights).

    Filler tokens are random ids from [3, vocab_size); a needle is a marker token (id 2 would be EOS
    on many models, so 1 is avoided too: the marker is the smallest id >= 3 never used as filler)
    followed by `key_tokens` random ids; the answer repeats the key tokens after a second marker.
    """

    def __init__(self, vocab_size: int, seq_len: int, key_tokens: int = 4) -> None:
        if vocab_size < 16:
            raise ValueError(f"vocab_size {vocab_size} is too small for token passkeys")
        self.seq_len = seq_len
        self.key_tokens = key_tokens
        self._marker = 3
        self._low = 4
        self._vocab_size = vocab_size

    def sample(self, rng: random.Random) -> PasskeySample:
        key = [rng.randrange(self._low, self._vocab_size) for _ in range(self.key_tokens)]
        needle = [self._marker] + key
        budget = self.seq_len - len(needle) - 1 - len(key)
        filler = [rng.randrange(self._low, self._vocab_size) for _ in range(budget)]
        depth = rng.randrange(0, budget // 2 + 1)  # the first half: far from the question
        context = filler[:depth] + needle + filler[depth:]
        return _with_labels(context + [self._marker], key)


def batch_samples(samples: Sequence[PasskeySample]):
    """(input_ids, label_mask) torch tensors of shape (batch, seq_len)."""
    import torch

    lengths = {len(s.input_ids) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples of one batch must have one length, got {sorted(lengths)}")
    input_ids = torch.tensor([s.input_ids for s in samples], dtype=torch.long)
    label_mask = torch.tensor([s.label_mask for s in samples], dtype=torch.bool)
    return input_ids, label_mask
