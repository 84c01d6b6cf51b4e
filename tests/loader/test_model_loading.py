"""lserve.model_loading and the Engine built on it: the three model sources end to end.

(a) Hugging Face directories: a sharded checkpoint (index + shards) feeds exactly the tensors
    transformers saved, and the engine's greedy tokens equal transformers' generate(); tokenizer
    files and the chat template come from the directory.
(b) GGUF: a hand-built llama file with a byte-level BPE vocabulary and a chat template in its
    metadata. Its weights make the model a known automaton (attention and MLP outputs are zero, so
    the logits depend on the last token only): each step emits the next byte of a cycle over
    "é😀", so streaming must hold back partial UTF-8 characters, and stop strings must cut.
(c) load_format="dummy": no weight files needed.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from lserve import Engine, SamplingParams
from lserve.loader.hf import expected_weight_shapes
from lserve.model_loading import load_model_source
from lserve_testing import assert_exact
from tiny_models import make_tiny_model

SEED = 2024


def _collect(source, seed=0):
    weights = {}
    source.feed_weights(seed, lambda name, array: weights.__setitem__(name, np.array(array)))
    return weights


# ---- (a) Hugging Face directories --------------------------------------------------------------

WORDS = [f"w{i}" for i in range(400)]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_word_tokenizer(directory, vocab_size: int) -> None:
    """A word-level tokenizer.json whose ids stay below the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS[:vocab_size - len(specials)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))


@pytest.fixture(scope="module", params=["qwen2", "llama_tied"])
def sharded_model(request, tmp_path_factory):
    """(variant, directory, transformers model): saved in shards of ~20 kB, with tokenizer files."""
    directory = tmp_path_factory.mktemp(f"sharded_{request.param}")
    model = make_tiny_model(request.param, directory / "single", seed=SEED)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="20KB")
    _write_word_tokenizer(directory, model.config.vocab_size)
    return request.param, directory, model


def test_sharded_checkpoint_feeds_every_tensor(sharded_model):
    variant, directory, model = sharded_model
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture should be sharded"
    source = load_model_source(str(directory))
    got = _collect(source)
    assert set(got) == set(expected_weight_shapes(source.spec)) and len(got) == source.num_weights
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    for name, array in got.items():
        assert_exact(array, state[name], what=f"{variant} {name}", seed=SEED)
    if variant == "qwen2":
        assert source.model_config.attention_bias and "model.layers.0.self_attn.q_proj.bias" in got
    else:
        assert source.model_config.tie_word_embeddings and "lm_head.weight" not in got


def test_sharded_engine_matches_transformers_and_reads_the_tokenizer(sharded_model):
    import torch

    variant, directory, model = sharded_model
    engine = Engine(str(directory), max_model_len=64, num_kv_pages=32, page_size=8, show_progress=False)
    prompt = [5, 17, 42, 3, 99, 7]
    ids = list(prompt)
    with torch.no_grad():  # greedy, never stopping at EOS
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    reference = ids[len(prompt):]
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert_exact(out[0].outputs[0].token_ids, reference, what=f"{variant} sharded greedy tokens", seed=SEED)

    tokenizer = engine.tokenizer
    assert tokenizer is not None and tokenizer.eos_token_id == 4
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}])
    assert rendered == "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
    assert engine._core.config.eos_token_ids[-1] == 4  # the tokenizer's EOS stops generation too
    reply = engine.chat([{"role": "user", "content": "w1 w2"}], SamplingParams(temperature=0.0, max_tokens=4),
                        use_tqdm=False)[0]
    assert reply.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert reply.prompt_token_ids[0] == 3 and tokenizer.vocab_size == model.config.vocab_size
    assert reply.outputs[0].text == tokenizer.decode(reply.outputs[0].token_ids)


# ---- (c) dummy weights and the sliding window ---------------------------------------------------

def _config_only_dir(directory, **overrides):
    config = {"architectures": ["MistralForCausalLM"], "vocab_size": 97, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "eos_token_id": 2, "bos_token_id": 1, **overrides}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_dummy_weights_need_no_checkpoint(tmp_path):
    directory = _config_only_dir(tmp_path, sliding_window=None)
    with pytest.raises(ValueError, match="no safetensors weights"):
        Engine(str(directory), show_progress=False)
    engine = Engine(str(directory), load_format="dummy", max_model_len=32, num_kv_pages=16, page_size=8,
                    show_progress=False)
    assert engine.tokenizer is None and engine.max_model_len == 32
    out = engine.generate([[1, 5, 9]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                          use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    again = load_model_source(str(directory), load_format="dummy")
    first, second = _collect(again, seed=3), _collect(again, seed=3)
    assert set(first) == set(expected_weight_shapes(again.spec))
    for name in first:
        assert_exact(first[name], second[name], what=f"dummy {name} is deterministic", seed=3)
    with pytest.raises(ValueError, match="load_format"):
        load_model_source(str(directory), load_format="pt")


def test_sliding_window_caps_max_model_len(tmp_path):
    directory = _config_only_dir(tmp_path, sliding_window=48)
    engine = Engine(str(directory), load_format="dummy", num_kv_pages=16, page_size=8, show_progress=False)
    assert engine.max_model_len == 48
    with pytest.raises(ValueError, match="context length 48 .*sliding window"):
        Engine(str(directory), load_format="dummy", max_model_len=64, show_progress=False)


# ---- (b) GGUF: weights, tokenizer and chat template from one file --------------------------------

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 96, 4, 2, 16, 2
CYCLE_TEXT = "é😀"  # 2 + 4 UTF-8 bytes


def _byte_alphabet():
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(extra)
            extra += 1
    return mapping


def _write_cycle_gguf(path, qtype=None):
    """A llama GGUF whose greedy continuation of "a" (or of a chat prompt, which ends in "\\n") is the
    bytes of CYCLE_TEXT, repeated. Returns the byte tokens' ids."""
    alphabet = _byte_alphabet()
    tokens = [alphabet[byte] for byte in range(256)] + ["ab", "<|im_start|>", "<|im_end|>"]
    token_types = [1] * 257 + [3, 3]
    vocab = len(tokens)
    rng = np.random.default_rng(SEED)
    embed = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
    normed = embed / np.sqrt(np.mean(embed * embed, axis=1, keepdims=True) + 1e-5)
    cycle = [tokens.index(alphabet[byte]) for byte in CYCLE_TEXT.encode("utf-8")]
    lm_head = np.zeros((vocab, HIDDEN), np.float32)
    for position, token_id in enumerate(cycle):  # logits[next] = 10 * |normed[current]|^2 dominates
        lm_head[cycle[(position + 1) % len(cycle)]] += 10 * normed[token_id]
    for start in (alphabet[ord("a")], alphabet[ord("\n")]):
        lm_head[cycle[0]] += 10 * normed[tokens.index(start)]

    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in (("block_count", LAYERS), ("context_length", 128), ("embedding_length", HIDDEN),
                       ("feed_forward_length", INTER), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("rope.dimension_count", HEAD_DIM)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add(name, values):
        if qtype is not None and values.ndim == 2:
            writer.add_tensor(name, gguf.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values)

    add("token_embd.weight", embed)
    for layer in range(LAYERS):
        blk = f"blk.{layer}."
        add(blk + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        add(blk + "attn_q.weight", rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)).astype(np.float32))
        add(blk + "attn_k.weight", rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32))
        add(blk + "attn_v.weight", rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32))
        add(blk + "attn_output.weight", np.zeros((HIDDEN, HEADS * HEAD_DIM), np.float32))
        add(blk + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        add(blk + "ffn_gate.weight", rng.standard_normal((INTER, HIDDEN)).astype(np.float32))
        add(blk + "ffn_up.weight", rng.standard_normal((INTER, HIDDEN)).astype(np.float32))
        add(blk + "ffn_down.weight", np.zeros((HIDDEN, INTER), np.float32))
    add("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output.weight", lm_head)  # kept exact: the automaton depends on it
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return cycle


@pytest.fixture(scope="module")
def cycle_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "cycle.gguf"
    _write_cycle_gguf(path)
    return Engine(str(path), max_model_len=128, num_kv_pages=64, page_size=8, show_progress=False)


def test_gguf_tokenizer_and_chat_template_from_metadata(cycle_engine):
    tokenizer = cycle_engine.tokenizer
    assert tokenizer.eos_token_id == 258 and tokenizer.bos_token_id == 257
    assert tokenizer.encode("ab") == [256]  # the one merge
    assert tokenizer.encode("<|im_start|>x", add_special_tokens=False)[0] == 257
    assert list(cycle_engine._core.config.eos_token_ids) == [258]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_generate_chat_and_stream_multibyte(cycle_engine):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = CYCLE_TEXT * 2
    out = cycle_engine.generate("a", params, use_tqdm=False)[0].outputs[0]
    assert out.text == expected and len(out.token_ids) == 12
    reply = cycle_engine.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)[0].outputs[0]
    assert reply.text == expected
    # Streaming: every delta is whole characters; a token ending inside a character yields nothing.
    deltas = list(cycle_engine.stream("a", SamplingParams(temperature=0.0, max_tokens=8)))
    assert deltas == ["é", "😀", "é"]
    # A partial character at max_tokens is flushed as U+FFFD, as a one-shot decode gives it.
    cut = cycle_engine.generate("a", SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)[0].outputs[0]
    assert cut.text == "é" + cycle_engine.tokenizer.decode(cut.token_ids[2:])
    assert cut.text.endswith("\ufffd")


def test_gguf_stop_strings(cycle_engine):
    out = cycle_engine.generate("a", SamplingParams(temperature=0.0, max_tokens=20, stop=["😀é"]),
                                use_tqdm=False)[0].outputs[0]
    assert out.text == "é" and out.finish_reason == "stop" and out.stop_reason == "😀é"
    kept = cycle_engine.generate("a", SamplingParams(temperature=0.0, max_tokens=20, stop=["😀"],
                                                     include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == "é😀" and kept.finish_reason == "stop"


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1])
def test_gguf_quantized_weights_feed_dequantized(tmp_path, qtype):
    path = tmp_path / "quantized.gguf"
    _write_cycle_gguf(path, qtype=qtype)
    source = load_model_source(str(path))
    got = _collect(source)
    assert set(got) == set(expected_weight_shapes(source.spec)) and len(got) == source.num_weights
    reader = gguf.GGUFReader(str(path))
    stored = {tensor.name: tensor for tensor in reader.tensors}
    ffn_up = stored["blk.1.ffn_up.weight"]
    assert ffn_up.tensor_type == qtype
    assert_exact(got["model.layers.1.mlp.up_proj.weight"],
                 gguf.dequantize(ffn_up.data, ffn_up.tensor_type).reshape(INTER, HIDDEN),
                 what=f"{qtype.name} ffn_up dequantised", seed=SEED)
    dummy = load_model_source(str(path), load_format="dummy")
    assert set(_collect(dummy)) == set(got)


def test_gguf_errors_name_the_culprit(tmp_path):
    path = tmp_path / "cycle.gguf"
    _write_cycle_gguf(path)
    data = path.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated.gguf"):
        Engine(str(tmp_path / "truncated.gguf"), show_progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(ValueError, match="junk.gguf"):
        Engine(str(tmp_path / "junk.gguf"), show_progress=False)
