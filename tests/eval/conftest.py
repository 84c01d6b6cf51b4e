"""Fixtures of the eval tests: a word-level prompt format (no tokenizer needed) and a tiny random
Llama with a character-level tokenizer (dense and sparse engines run it in seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import word_tokens

from lserve.eval.retrieval_tasks import PromptFormat

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


@pytest.fixture
def word_format():
    return PromptFormat(encode=word_tokens, head="<user>", tail="</user><assistant>")


@pytest.fixture
def tiny_char_model(tmp_path):
    """Directory of a random 2-layer Llama (4 query heads, 2 KV heads, head_dim 16, 2048 positions)
    with a character-level tokenizer.json (numpy + safetensors, no torch)."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    pytest.importorskip("lserve._C")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from lserve.loader.hf import expected_weight_shapes, spec_from_hf_config

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(".|\\n"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(vocab), hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False, hidden_act="silu")
    (tmp_path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    weights = {name: (np.ones(shape) if len(shape) == 1 else rng.normal(0.0, 0.15, shape)).astype(np.float32)
               for name, shape in expected_weight_shapes(spec_from_hf_config(config)).items()}
    safetensors_numpy.save_file(weights, str(tmp_path / "model.safetensors"))
    return tmp_path
