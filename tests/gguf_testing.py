"""Tiny llama GGUF files for tests, and a map of where each header field of a GGUF file lies.

write_tiny_llama() writes with gguf-py's GGUFWriter the way llama.cpp's converter does (q/k rows
permuted), optionally with a small gpt2 byte-level BPE tokenizer and a chat template so that
lserve.Engine loads the file end to end. map_header() parses a well-formed header with struct
(independently of lserve and gguf-py's reader) so that tests can corrupt one chosen field.

    hf = write_tiny_llama(tmp_path / "tiny.gguf")          # 2 layers, hidden 64, vocab 40
    engine = lserve.Engine(str(tmp_path / "tiny.gguf"), max_num_seqs=2, show_progress=False)
    blob = patch_field(path.read_bytes(), "tensor_offset", "blk.0.attn_q.weight", 2**40)
"""
from __future__ import annotations

import dataclasses
import struct
from typing import List, Optional

import gguf
import numpy as np

SEED = 1234

TINY_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>")


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rows (2, dim) -> GGUF rows (dim, 2)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tiny_vocab(vocab: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a `vocab`-token byte-level BPE vocabulary: the two control
    tokens, then single letters and digits, then merged pairs ("ab", "cd", ...) with their merges."""
    singles = [chr(code) for code in range(ord("a"), ord("z") + 1)] + [str(digit) for digit in range(10)]
    tokens = list(_CONTROL_TOKENS) + singles
    merges = []
    pair_idx = 0
    while len(tokens) < vocab:
        left, right = singles[pair_idx % 26], singles[(pair_idx * 7 + 1) % 36]
        pair_idx += 1
        if left + right in tokens:
            continue
        tokens.append(left + right)
        merges.append(f"{left} {right}")
    tokens = tokens[:vocab]
    types = [3 if token in _CONTROL_TOKENS else 1 for token in tokens]
    return tokens, merges, types


def write_tiny_llama(path, *, num_layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, vocab=40,
                     context_length=512, bias=False, tied=False, extra_tensor=None, rope_freqs=None, metadata=None,
                     skip_keys=(), skip_tensors=(), qtype=None, tokenizer=True, seed=SEED):
    """Writes a tiny llama GGUF to `path` and returns the Hugging Face state dict it encodes.

    metadata: {key: (value, GGUFValueType)} added after the standard keys; skip_keys: standard keys
    left out; skip_tensors: GGUF tensor names left out (still drawn, so the others keep their values).
    tokenizer: add tokenizer.ggml.{model, tokens, merges, token_type} and a chat
    template (tokens alone otherwise). qtype: store 2-D weights quantised to that ggml type.
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    tokens, merges, token_types = tiny_vocab(vocab) if tokenizer else ([f"t{i}" for i in range(vocab)], [], [])
    standard = [
        ("llama.block_count", num_layers, gguf.GGUFValueType.UINT32),
        ("llama.context_length", context_length, gguf.GGUFValueType.UINT32),
        ("llama.embedding_length", hidden, gguf.GGUFValueType.UINT32),
        ("llama.feed_forward_length", inter, gguf.GGUFValueType.UINT32),
        ("llama.attention.head_count", heads, gguf.GGUFValueType.UINT32),
        ("llama.attention.head_count_kv", kv_heads, gguf.GGUFValueType.UINT32),
        ("llama.rope.dimension_count", head_dim, gguf.GGUFValueType.UINT32),
        ("llama.attention.key_length", head_dim, gguf.GGUFValueType.UINT32),
        ("llama.rope.freq_base", 500000.0, gguf.GGUFValueType.FLOAT32),
        ("llama.attention.layer_norm_rms_epsilon", 1e-5, gguf.GGUFValueType.FLOAT32),
        ("tokenizer.ggml.bos_token_id", 3, gguf.GGUFValueType.UINT32),
        ("tokenizer.ggml.eos_token_id", 4, gguf.GGUFValueType.UINT32),
    ]
    for key, value, vtype in standard:
        if key not in skip_keys:
            writer.add_key_value(key, value, vtype)
    if tokenizer:
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    if tokenizer:
        writer.add_array("tokenizer.ggml.token_type", token_types)
        writer.add_array("tokenizer.ggml.merges", merges)
        writer.add_string("tokenizer.chat_template", TINY_CHAT_TEMPLATE)
    for key, (value, vtype) in (metadata or {}).items():
        writer.add_key_value(key, value, vtype)
    hf = {}

    def add(gguf_name, hf_name, shape, permute_heads=0):
        values = rng.standard_normal(shape).astype(np.float32)
        if gguf_name in skip_tensors:
            return
        hf[hf_name] = values
        stored = llama_cpp_permute(values, permute_heads) if permute_heads else values
        if qtype is not None and stored.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quantize(stored, qtype), raw_dtype=qtype)
            hf[hf_name] = gguf.dequantize(gguf.quantize(values, qtype), qtype)  # rows permute, blocks stay whole
        else:
            writer.add_tensor(gguf_name, stored)

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for layer in range(num_layers):
        b, h = f"blk.{layer}.", f"model.layers.{layer}."
        add(b + "attn_norm.weight", h + "input_layernorm.weight", (hidden,))
        add(b + "attn_q.weight", h + "self_attn.q_proj.weight", (heads * head_dim, hidden), heads)
        add(b + "attn_k.weight", h + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden), kv_heads)
        add(b + "attn_v.weight", h + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden))
        if bias:
            add(b + "attn_q.bias", h + "self_attn.q_proj.bias", (heads * head_dim,), heads)
            add(b + "attn_k.bias", h + "self_attn.k_proj.bias", (kv_heads * head_dim,), kv_heads)
            add(b + "attn_v.bias", h + "self_attn.v_proj.bias", (kv_heads * head_dim,))
        add(b + "attn_output.weight", h + "self_attn.o_proj.weight", (hidden, heads * head_dim))
        add(b + "ffn_norm.weight", h + "post_attention_layernorm.weight", (hidden,))
        add(b + "ffn_gate.weight", h + "mlp.gate_proj.weight", (inter, hidden))
        add(b + "ffn_up.weight", h + "mlp.up_proj.weight", (inter, hidden))
        add(b + "ffn_down.weight", h + "mlp.down_proj.weight", (hidden, inter))
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, hidden))
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


# ---- a map of the header ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Field:
    """One fixed-size little-endian field of the header."""

    kind: str    # count | key_length | value_type | string_length | array_type | array_length | int | float
                 # | name_length | n_dims | dim | ggml_type | tensor_offset
    offset: int
    size: int    # bytes
    label: str   # the metadata key or tensor name it belongs to ("header" for version and counts)


@dataclasses.dataclass
class HeaderMap:
    fields: List[Field]
    header_end: int            # end of the tensor infos
    data_offset: int           # start of the tensor data (aligned)
    tensor_offsets: List[int]  # each tensor's offset field (relative to data_offset), in file order


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
                   12: "<d"}
_RECORDED_ITEMS = 4  # array items whose fields are recorded (the tokens array has thousands)


def map_header(blob: bytes) -> HeaderMap:
    """Parses a well-formed GGUF header (as gguf-py writes it) and records where each field lies."""
    fields: List[Field] = []
    pos = 0

    def take(fmt: str, kind: Optional[str], label: str):
        nonlocal pos
        value = struct.unpack_from(fmt, blob, pos)[0]
        if kind is not None:
            fields.append(Field(kind, pos, struct.calcsize(fmt), label))
        pos += struct.calcsize(fmt)
        return value

    def take_string(kind: Optional[str], label: Optional[str]) -> str:
        """A length-prefixed string; its length field is labelled `label`, or the string itself."""
        nonlocal pos
        length_offset = pos
        length = take("<Q", None, "")
        text = blob[pos:pos + length].decode("utf-8")
        pos += length
        if kind is not None:
            fields.append(Field(kind, length_offset, 8, label if label is not None else text))
        return text

    def take_value(vtype: int, key: str, record: bool) -> None:
        if vtype == 8:
            take_string("string_length" if record else None, key)
        elif vtype == 9:
            item_type = take("<I", "array_type" if record else None, key)
            count = take("<Q", "array_length" if record else None, key)
            for item_idx in range(count):
                take_value(item_type, key, record and item_idx < _RECORDED_ITEMS)
        else:
            kind = ("float" if vtype in (6, 12) else "int") if record else None
            take(_SCALAR_FORMATS[vtype], kind, key)

    take("<I", None, "magic")
    take("<I", "int", "header")  # version
    num_tensors = take("<Q", "count", "header")
    num_kv = take("<Q", "count", "header")
    alignment = 32
    for _ in range(num_kv):
        key = take_string("key_length", None)
        vtype = take("<I", "value_type", key)
        take_value(vtype, key, True)
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", blob, pos - 4)[0]
    tensor_offsets = []
    for _ in range(num_tensors):
        name = take_string("name_length", None)
        num_dims = take("<I", "n_dims", name)
        for _ in range(num_dims):
            take("<Q", "dim", name)
        take("<I", "ggml_type", name)
        tensor_offsets.append(take("<Q", "tensor_offset", name))
    data_offset = (pos + alignment - 1) // alignment * alignment
    return HeaderMap(fields, pos, data_offset, tensor_offsets)


def patch_field(blob: bytes, kind: str, label: str, value, occurrence: int = 0) -> bytes:
    """`blob` with the `occurrence`-th header field of this kind and label set to `value` (an int,
    or a float for kind "float"); e.g. patch_field(blob, "dim", "blk.1.ffn_up.weight", 95, occurrence=1)."""
    matches = [field for field in map_header(blob).fields if field.kind == kind and field.label == label]
    if len(matches) <= occurrence:
        raise KeyError(f"no {kind} field #{occurrence} for {label!r}")
    field = matches[occurrence]
    out = bytearray(blob)
    if kind == "float":
        struct.pack_into("<f" if field.size == 4 else "<d", out, field.offset, value)
    else:
        out[field.offset:field.offset + field.size] = int(value).to_bytes(field.size, "little")
    return bytes(out)
