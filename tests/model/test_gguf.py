"""GgufFile (cpp/src/model/gguf.cpp) against gguf-py and transformers.

References: gguf-py's GGUFWriter writes the synthetic files and its GGUFReader / quants.dequantize
read them back; a small struct-based writer below builds corrupt files byte by byte; transformers'
LlamaTensorProcessor and get_gguf_hf_weights_map are the reference for Hugging Face names and the
rotary un-permutation; llama.cpp's forward permutation is written out in gguf_testing.py.
"""
from __future__ import annotations

import math
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from conftest_gguf import gguf_py_reader, shared_gguf_reader, smollm2_gguf_path
from gguf_testing import write_tiny_llama
from lserve import _C
from lserve_testing import assert_exact

SEED = 1234


# ---- helpers -------------------------------------------------------------------------------------

def assert_same_floats(actual, expected, what: str) -> None:
    """Bit-exact float32 equality; NaNs must sit at the same places (payloads may differ)."""
    actual = np.asarray(actual, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert_exact(nan_a, nan_e, what=f"{what} (NaN positions)", seed=SEED)
    keep = ~nan_e
    assert_exact(actual[keep].view(np.uint32), expected[keep].view(np.uint32), what=what, seed=SEED)


# ---- a synthetic file with every metadata type and the six readable tensor types -----------------

METADATA = [
    ("test.u8", 200, VT.UINT8), ("test.i8", -100, VT.INT8), ("test.u16", 60000, VT.UINT16),
    ("test.i16", -30000, VT.INT16), ("test.u32", 4_000_000_000, VT.UINT32), ("test.i32", -2_000_000_000, VT.INT32),
    ("test.f32", 0.1, VT.FLOAT32), ("test.u64", 2**64 - 5, VT.UINT64), ("test.i64", -(2**62), VT.INT64),
    ("test.f64", 1.0 / 3.0, VT.FLOAT64), ("test.bool_true", True, VT.BOOL), ("test.bool_false", False, VT.BOOL),
    ("test.string", "héllo wörld \u2603 \U0001F600", VT.STRING),
]
ARRAYS = [
    ("test.arr_i32", [1, -2, 3, 2**31 - 1], VT.INT32), ("test.arr_u8", [0, 255, 7], VT.UINT8),
    ("test.arr_f32", [0.5, -1.25, 3.0e-7], VT.FLOAT32), ("test.arr_f64", [1e300, -2.5], VT.FLOAT64),
    ("test.arr_bool", [True, False, True], VT.BOOL), ("test.arr_str", ["a", "", "ünï", "<|im_start|>"], VT.STRING),
    ("test.arr_u64", [2**64 - 1, 0], VT.UINT64), ("test.arr_nested", [[1, 2], [3, 4, 5]], None),
]


def _tensors(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, QT | None, np.ndarray]]:
    """name -> (stored array, raw ggml type or None, expected float32 values in torch shape)."""
    out = {}
    values = rng.standard_normal((3, 64)).astype(np.float32) * 3
    values[0, :5] = [0.0, -0.0, np.inf, -np.inf, 1e-40]
    out["t.f32"] = (values, None, values)
    half = (rng.standard_normal((2, 5, 32)) * 100).astype(np.float16)
    half.flat[:4] = np.array([0x0001, 0x8400, 0x7c00, 0x7bff], dtype=np.uint16).view(np.float16)  # subnormal, ...
    out["t.f16"] = (half, None, half.astype(np.float32))
    bf16_bits = rng.integers(0, 2**16, size=(4, 16), dtype=np.uint16)
    out["t.bf16"] = (bf16_bits.view(np.uint8).reshape(4, 32), QT.BF16,
                     (bf16_bits.astype(np.uint32) << 16).view(np.float32))
    for qtype, shape in ((QT.Q8_0, (5, 64)), (QT.Q4_0, (3, 96)), (QT.Q4_1, (7, 32))):
        real = (rng.standard_normal(shape) * rng.uniform(0.01, 10, size=(shape[0], 1))).astype(np.float32)
        out[f"t.{qtype.name.lower()}"] = (gguf.quantize(real, qtype), qtype, None)
        # random bytes: every nibble pattern, negative / subnormal / inf / NaN scales
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(shape[0], shape[1] // block_size * type_size), dtype=np.uint8)
        out[f"t.{qtype.name.lower()}_raw"] = (raw, qtype, None)
    vector = rng.standard_normal(32).astype(np.float32)
    out["t.vector"] = (vector, None, vector)
    return out


def _write_synthetic(path, alignment: int | None = None, extra=None) -> dict:
    rng = np.random.default_rng(SEED)
    writer = gguf.GGUFWriter(str(path), arch="testarch")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype in METADATA:
        writer.add_key_value(key, value, vtype)
    for key, value, sub_type in ARRAYS:
        writer.add_key_value(key, value, VT.ARRAY, sub_type=sub_type)
    tensors = _tensors(rng)
    for name, (array, raw_type, _) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    if extra:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "synthetic.gguf"
    tensors = _write_synthetic(path)
    return path, tensors


def test_synthetic_metadata_matches_gguf_py(synthetic):
    path, _ = synthetic
    ours = _C.GgufFile(path)
    reader = gguf.GGUFReader(path)
    keys = [key for key in reader.fields if not key.startswith("GGUF.")]
    assert ours.keys() == keys
    assert ours.version == 3 and ours.alignment == 32
    for key in keys:
        field = reader.fields[key]
        expected = field.contents()
        got = ours.get(key)
        if field.types[0] == VT.FLOAT32 or (field.types[0] == VT.ARRAY and field.types[-1] == VT.FLOAT32):
            expected = np.asarray(expected, dtype=np.float32).tolist()
            got = np.asarray(got, dtype=np.float32).tolist()
        if key == "test.arr_nested":  # gguf-py's contents() flattens arrays of arrays
            got = [item for inner in got for item in inner]
        assert got == expected, f"{key}: {got!r} != {expected!r}"
    # explicit values, independent of the reader
    assert ours.get("test.u64") == 2**64 - 5
    assert ours.get("test.i64") == -(2**62)
    assert ours.get("test.f32") == float(np.float32(0.1))
    assert ours.get("test.bool_true") is True and ours.get("test.bool_false") is False
    assert ours.get("test.string") == "héllo wörld \u2603 \U0001F600"
    assert ours.get("test.arr_nested") == [[1, 2], [3, 4, 5]]
    assert ours.get("test.arr_bool") == [True, False, True]
    assert ours.get("general.architecture") == "testarch"
    assert ours.value_type("test.arr_str") == ("array", "string")
    assert ours.value_type("test.i16") == ("int16", "int16")


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # gguf-py on NaN scales
def test_synthetic_tensors_match_gguf_py(synthetic):
    path, tensors = synthetic
    ours = _C.GgufFile(path)
    reader = gguf.GGUFReader(path)
    assert ours.tensor_names() == [t.name for t in reader.tensors] == list(tensors)
    for tensor in reader.tensors:
        info = ours.tensor_info(tensor.name)
        assert info["shape"] == [int(x) for x in reversed(tensor.shape)], tensor.name
        assert info["type"] == int(tensor.tensor_type)
        assert info["type_name"] == tensor.tensor_type.name
        assert info["offset"] == tensor.data_offset and info["offset"] % 32 == 0
        assert info["nbytes"] == tensor.n_bytes
        expected = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(info["shape"])
        got = ours.read_f32(tensor.name)
        assert got.dtype == np.float32
        assert_same_floats(got, expected, tensor.name)
        direct = tensors[tensor.name][2]
        if direct is not None:  # independent of gguf-py's reader
            assert_same_floats(got, direct, tensor.name + " (written values)")


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_alignment_and_version_2(tmp_path):
    path = tmp_path / "aligned.gguf"
    _write_synthetic(path, alignment=64)
    ours = _C.GgufFile(path)
    reader = gguf.GGUFReader(path)
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    for tensor in reader.tensors:
        assert ours.tensor_info(tensor.name)["offset"] == tensor.data_offset
        assert_same_floats(ours.read_f32(tensor.name), gguf.dequantize(tensor.data, tensor.tensor_type).reshape(
            ours.tensor_info(tensor.name)["shape"]), tensor.name)
    # Little-endian v2 and v3 share the layout: patch the version field and read it again.
    blob = bytearray(path.read_bytes())
    blob[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(blob))
    assert _C.GgufFile(v2).version == 2
    assert_exact(_C.GgufFile(v2).read_f32("t.q4_1"), ours.read_f32("t.q4_1"), "v2 tensor")


def test_unsupported_type_and_missing_names(tmp_path):
    path = tmp_path / "q5.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("w.q5", gguf.quantize(np.ones((2, 32), np.float32), QT.Q5_0), raw_dtype=QT.Q5_0)
    writer.add_tensor("w.f32", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = _C.GgufFile(path)
    assert ours.tensor_info("w.q5")["type_name"] == "Q5_0"
    with pytest.raises(ValueError, match=r"w\.q5.*Q5_0"):
        ours.read_f32("w.q5")
    assert_exact(ours.read_f32("w.f32"), np.ones(4, np.float32), "f32 next to Q5_0")
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        ours.read_f32("nope")
    with pytest.raises(ValueError, match="missing metadata key 'nope'"):
        ours.get("nope")
    assert issubclass(_C.Error, ValueError)


# ---- corrupt files -------------------------------------------------------------------------------

def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tinfo(name: str, ne, ggml_type: int, offset: int) -> bytes:
    return _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", x) for x in ne) + \
        struct.pack("<I", ggml_type) + struct.pack("<Q", offset)


def _file(kvs, infos, data: bytes, version=3, num_tensors=None, num_kv=None, magic=b"GGUF", alignment=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if num_tensors is None else num_tensors,
                               len(kvs) if num_kv is None else num_kv)
    head += b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def _good_parts():
    kvs = [_kv("general.architecture", 8, _s("llama")), _kv("a.u32", 4, struct.pack("<I", 7)),
           _kv("a.arr", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, 2, 3))]
    infos = [_tinfo("x", [32, 2], 0, 0), _tinfo("y", [32], 8, 256)]
    data = np.arange(64, dtype=np.float32).tobytes() + b"\0" * 0 + bytes(34)
    return kvs, infos, data


def test_handmade_file_reads(tmp_path):
    kvs, infos, data = _good_parts()
    path = tmp_path / "good.gguf"
    path.write_bytes(_file(kvs, infos, data))
    ours = _C.GgufFile(path)
    assert ours.get("a.arr") == [1, 2, 3] and ours.get("a.u32") == 7
    assert_exact(ours.read_f32("x"), np.arange(64, dtype=np.float32).reshape(2, 32), "x")
    assert_exact(ours.read_f32("y"), np.zeros(32, np.float32), "y")


CORRUPTIONS = {
    "bad magic": (lambda k, i, d: _file(k, i, d, magic=b"GGUX"), "bad magic"),
    "version 1": (lambda k, i, d: _file(k, i, d, version=1), "unsupported GGUF version 1"),
    "version 4": (lambda k, i, d: _file(k, i, d, version=4), "unsupported GGUF version 4"),
    "big endian": (lambda k, i, d: _file(k, i, d, version=3 << 24), "big-endian"),
    "absurd tensor count": (lambda k, i, d: _file(k, i, d, num_tensors=2**63), "absurd tensor count"),
    "absurd kv count": (lambda k, i, d: _file(k, i, d, num_kv=2**40), "absurd metadata count"),
    "too many kvs": (lambda k, i, d: _file(k, i, d, num_kv=len(k) + 1), r"type|truncated|unknown|claims"),
    "string length": (lambda k, i, d: _file([struct.pack("<Q", 2**62) + b"ab"] + k[1:], i, d),
                      "claims"),
    "array length": (lambda k, i, d: _file(k[:2] + [_kv("a.arr", 9, struct.pack("<IQ", 5, 2**61))], i, d),
                     "claims .* items"),
    "array item type": (lambda k, i, d: _file(k[:2] + [_kv("a.arr", 9, struct.pack("<IQ", 77, 1))], i, d),
                        "unknown array item type 77"),
    "value type": (lambda k, i, d: _file(k[:2] + [_kv("a.bad", 13, b"")], i, d), "unknown value type 13"),
    "bool value": (lambda k, i, d: _file(k + [_kv("a.bool", 7, b"\x02")], i, d), "bool stored as 2"),
    "duplicate key": (lambda k, i, d: _file(k + [k[1]], i, d), "duplicate metadata key 'a.u32'"),
    "alignment 0": (lambda k, i, d: _file(k + [_kv("general.alignment", 4, struct.pack("<I", 0))], i, d),
                    "general.alignment = 0"),
    "alignment 48": (lambda k, i, d: _file(k + [_kv("general.alignment", 4, struct.pack("<I", 48))], i, d),
                     "not a power of two"),
    "alignment string": (lambda k, i, d: _file(k + [_kv("general.alignment", 8, _s("32"))], i, d),
                         "general.alignment has type string"),
    "n_dims": (lambda k, i, d: _file(k, [_tinfo("x", [32, 2, 1, 1, 1], 0, 0)] + i[1:], d), "'x' has 5 dimensions"),
    "huge dims": (lambda k, i, d: _file(k, [_tinfo("x", [2**40, 2**40], 0, 0)] + i[1:], d), "'x'.*(absurd|more bytes)"),
    "huge dim": (lambda k, i, d: _file(k, [_tinfo("x", [2**63 + 1], 0, 0)] + i[1:], d), "'x' has an absurd dimension"),
    "ggml type": (lambda k, i, d: _file(k, [_tinfo("x", [32, 2], 99, 0)] + i[1:], d), "'x' has unknown ggml type 99"),
    "block size": (lambda k, i, d: _file(k, i[:1] + [_tinfo("y", [33], 8, 256)], d), "'y'.*block size 32"),
    "misaligned": (lambda k, i, d: _file(k, i[:1] + [_tinfo("y", [32], 8, 260)], d), "'y'.*not a multiple of the align"),
    "beyond eof": (lambda k, i, d: _file(k, i[:1] + [_tinfo("y", [32], 8, 2**20)], d), "'y'.*beyond the end"),
    "offset overflow": (lambda k, i, d: _file(k, i[:1] + [_tinfo("y", [32], 8, 2**64 - 32)], d), "'y'.*beyond"),
    "duplicate tensor": (lambda k, i, d: _file(k, [i[0], i[0]], d), "duplicate tensor name 'x'"),
    "empty": (lambda k, i, d: b"", "empty file"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_file_raises(tmp_path, case):
    build, pattern = CORRUPTIONS[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(build(*_good_parts()))
    with pytest.raises(ValueError, match=pattern) as info:
        _C.GgufFile(path)
    assert str(path) in str(info.value), f"{case}: error does not name the file: {info.value}"


def test_truncated_files_raise(synthetic, tmp_path):
    """Cutting a valid file anywhere before the end of its last tensor raises, never crashes."""
    path, _ = synthetic
    blob = path.read_bytes()
    reader_end = max(info["offset"] + info["nbytes"] for info in
                     (_C.GgufFile(path).tensor_info(n) for n in _C.GgufFile(path).tensor_names()))
    header_end = _C.GgufFile(path).data_offset
    cuts = list(range(0, header_end + 1)) + list(range(header_end, reader_end, 97)) + [reader_end - 1]
    cut_path = tmp_path / "cut.gguf"
    for cut in cuts:
        cut_path.write_bytes(blob[:cut])
        with pytest.raises(ValueError, match=r"cut\.gguf"):
            _C.GgufFile(cut_path)


def test_random_byte_flips_never_crash(synthetic, tmp_path):
    """Flipped header bytes either parse (and then every tensor reads or raises) or raise ValueError."""
    path, _ = synthetic
    blob = path.read_bytes()
    header_end = _C.GgufFile(path).data_offset
    rng = np.random.default_rng(SEED)
    bad_path = tmp_path / "flipped.gguf"
    num_raised = 0
    for _ in range(400):
        mutated = bytearray(blob)
        for pos in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
            mutated[pos] = int(rng.integers(0, 256))
        bad_path.write_bytes(bytes(mutated))
        try:
            file = _C.GgufFile(bad_path)
        except ValueError:
            num_raised += 1
            continue
        for name in file.tensor_names():
            try:
                file.read_f32(name)
            except ValueError:
                pass
        for key in file.keys():
            try:
                file.get(key)
            except ValueError:  # strings that are not UTF-8
                pass
    assert num_raised > 0


# ---- llama: config and Hugging Face weights ------------------------------------------------------

def _write_llama(path, **kwargs):
    """A tiny llama GGUF (tests/gguf_testing.py), its vocabulary without a tokenizer model."""
    return write_tiny_llama(path, tokenizer=False, **kwargs)


@pytest.mark.parametrize("bias,tied,qtype", [(False, False, None), (True, True, None), (False, False, QT.Q8_0)])
def test_llama_weights_undo_llama_cpp_permutation(tmp_path, bias, tied, qtype):
    path = tmp_path / "llama.gguf"
    hf = _write_llama(path, bias=bias, tied=tied, qtype=qtype)
    file = _C.GgufFile(path)
    config = _C.gguf_model_config_dict(file)
    assert config["attention_bias"] == bias and config["tie_word_embeddings"] == tied
    got = _C.gguf_hf_weights(file)
    assert sorted(got) == sorted(hf)
    for name, expected in hf.items():
        assert_exact(got[name], expected, name)
    # the same through the streaming callback
    streamed = []
    assert _C.gguf_hf_weights(file, lambda name, array: streamed.append(name)) is None
    assert sorted(streamed) == sorted(hf)


def test_llama_config_fields(tmp_path):
    path = tmp_path / "llama.gguf"
    _write_llama(path, metadata={"llama.rope.scaling.type": ("yarn", VT.STRING),
                                 "llama.rope.scaling.factor": (4.0, VT.FLOAT32),
                                 "llama.rope.scaling.original_context_length": (128, VT.UINT32)})
    config = _C.gguf_model_config_dict(_C.GgufFile(path))
    expected = dict(architecture="LlamaForCausalLM", vocab_size=40, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_qo_heads=4, num_kv_heads=2, head_dim=16, rope_theta=500000.0, partial_rotary_factor=1.0,
                    max_position_embeddings=512, tie_word_embeddings=False, attention_bias=False, bos_token_id=3,
                    eos_token_id=4)
    for key, value in expected.items():
        assert config[key] == value, key
    assert config["rms_norm_eps"] == float(np.float32(1e-5))
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 4.0
    assert config["rope_scaling"]["original_max_position_embeddings"] == 128


def _llama3_divisors(head_dim, theta, factor, low=1.0, high=4.0, original=8192):
    """llama.cpp convert_hf_to_gguf.py's rope_freqs for Meta's llama3 rule."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (theta ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def test_llama3_rope_freqs(tmp_path):
    path = tmp_path / "llama3.gguf"
    hf = _write_llama(path, rope_freqs=_llama3_divisors(16, 500000.0, 8.0))
    file = _C.GgufFile(path)
    scaling = _C.gguf_model_config_dict(file)["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    assert (scaling["low_freq_factor"], scaling["high_freq_factor"]) == (1.0, 4.0)
    assert scaling["original_max_position_embeddings"] == 8192
    assert sorted(_C.gguf_hf_weights(file)) == sorted(hf)  # rope_freqs is config, not a weight
    bad = _llama3_divisors(16, 500000.0, 8.0)
    assert bad[1] == 1.0
    bad[1] = 1.5
    _write_llama(path, rope_freqs=bad)
    with pytest.raises(ValueError, match=r"rope_freqs\.weight\[1\]"):
        _C.gguf_model_config_dict(_C.GgufFile(path))


def test_llama_strict_mapping(tmp_path):
    path = tmp_path / "llama.gguf"
    _write_llama(path, extra_tensor="blk.0.attn_qkv.weight")
    with pytest.raises(ValueError, match=r"blk\.0\.attn_qkv\.weight"):
        _C.gguf_hf_weights(_C.GgufFile(path))
    _write_llama(path, extra_tensor="blk.5.attn_norm.weight")  # a layer the config does not have
    with pytest.raises(ValueError, match=r"blk\.5\.attn_norm\.weight"):
        _C.gguf_hf_weights(_C.GgufFile(path))
    _write_llama(path, tied=True, metadata={"general.architecture": ("qwen3", VT.STRING)})
    with pytest.raises(ValueError, match="architecture 'qwen3'"):
        _C.gguf_model_config_dict(_C.GgufFile(path))
    # an unmappable name is reported as such, even when tensors are missing too
    _write_llama(path, extra_tensor="blk.9.attn_qkv.weight", metadata={"llama.block_count": (3, VT.UINT32)})
    with pytest.raises(ValueError, match=r"cannot map.*blk\.9\.attn_qkv"):
        _C.gguf_hf_weights(_C.GgufFile(path))
    _write_llama(path, metadata={"llama.block_count": (3, VT.UINT32)})  # the config has a layer the file lacks
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.2\."):
        _C.gguf_hf_weights(_C.GgufFile(path))
    _write_llama(path, tied=True, extra_tensor="blk.0.spare.weight")  # an unknown part of a block
    with pytest.raises(ValueError, match=r"blk\.0\.spare\.weight"):
        _C.gguf_hf_weights(_C.GgufFile(path))
    _write_llama(path, metadata={"llama.block_count": (2**31 - 1, VT.UINT32)})  # absurd: fails fast
    with pytest.raises(ValueError, match="layers"):
        _C.gguf_hf_weights(_C.GgufFile(path))
    _write_llama(path, vocab=40, metadata={"llama.embedding_length": (32, VT.UINT32)})
    with pytest.raises(ValueError, match="shapes disagree"):
        _C.gguf_hf_weights(_C.GgufFile(path))


# ---- the real model: SmolLM2-135M-Instruct -------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    return path, _C.GgufFile(path), gguf_py_reader(path)


def test_smollm2_every_tensor_bit_exact(smollm2):
    _, ours, reader = smollm2
    assert ours.tensor_names() == [t.name for t in reader.tensors]
    types = set()
    for tensor in reader.tensors:
        info = ours.tensor_info(tensor.name)
        assert info["offset"] == tensor.data_offset and info["nbytes"] == tensor.n_bytes, tensor.name
        types.add(info["type_name"])
        expected = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(info["shape"])
        assert_same_floats(ours.read_f32(tensor.name), expected, tensor.name)
    assert types == {"Q4_1", "Q8_0", "F32"}


def test_smollm2_metadata(smollm2):
    _, ours, reader = smollm2
    for key in ("general.architecture", "llama.context_length", "llama.rope.freq_base", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        expected = reader.fields[key].contents()
        got = ours.get(key)
        if isinstance(expected, float):
            expected, got = float(np.float32(expected)), float(np.float32(got))
        assert got == expected, key


def test_smollm2_config_matches_transformers(smollm2):
    path, ours, _ = smollm2
    transformers_gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    with shared_gguf_reader(path):
        reference = transformers_gguf.load_gguf_checkpoint(path, return_tensors=False)["config"]
    config = _C.gguf_model_config_dict(ours)
    pairs = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_qo_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
             "rope_theta": "rope_theta", "max_position_embeddings": "max_position_embeddings",
             "tie_word_embeddings": "tie_word_embeddings", "bos_token_id": "bos_token_id",
             "eos_token_id": "eos_token_id"}
    for ours_key, hf_key in pairs.items():
        assert config[ours_key] == reference[hf_key], f"{ours_key}: {config[ours_key]} != {reference[hf_key]}"
    assert config["rope_scaling"]["rope_type"] == "default" and not config["attention_bias"]


def test_smollm2_hf_weights_match_transformers(smollm2):
    """Names and un-permuted values against transformers' own GGUF mapping and tensor processor."""
    path, ours, reader = smollm2
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    config = _C.gguf_model_config_dict(ours)
    hf_config = transformers.LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_qo_heads"], num_key_value_heads=config["num_kv_heads"],
        head_dim=config["head_dim"], tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_config)
    hf_names = list(model.state_dict())

    class TopLevelOnly:  # transformers' map without its per-submodule recursion (~10 s, same result for llama)
        config = hf_config

        def state_dict(self):
            return dict.fromkeys(hf_names)

        def named_children(self):
            return []

    name_map = get_gguf_hf_weights_map(TopLevelOnly(), LlamaTensorProcessor())
    processor = LlamaTensorProcessor(config={"num_attention_heads": config["num_qo_heads"],
                                             "num_key_value_heads": config["num_kv_heads"]})
    checked = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.17.attn_k.weight", "blk.29.attn_q.weight",
               "blk.3.attn_v.weight", "blk.3.attn_output.weight", "blk.29.ffn_down.weight", "blk.0.ffn_norm.weight",
               "token_embd.weight", "output_norm.weight"]
    wanted = {name_map[name]: name for name in checked}
    got = {}

    def keep(hf_name, array):
        got.setdefault("names", []).append(hf_name)
        if hf_name in wanted:
            got[hf_name] = array

    _C.gguf_hf_weights(ours, keep)
    expected_names = {name_map[t.name] for t in reader.tensors}
    assert set(got["names"]) == expected_names
    assert expected_names == set(hf_names) - {"lm_head.weight"}
    by_name = {t.name: t for t in reader.tensors}
    for hf_name, gguf_name in wanted.items():
        tensor = by_name[gguf_name]
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        expected = processor.process(weights=weights, name=gguf_name).weights
        assert_exact(got[hf_name], expected, f"{gguf_name} -> {hf_name}")
