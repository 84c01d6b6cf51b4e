"""lserve.loader.safetensors against files written by the `safetensors` package, and against
hand-made corrupt files: each corruption must raise ValueError naming the file and the reason."""
from __future__ import annotations

import gc
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lserve.loader.safetensors import (SAFETENSORS_DTYPES, iter_safetensors_weights, list_safetensors_weights,
                                       load_safetensors, read_safetensors_header, safetensors_files)
from lserve_testing import assert_exact

SEED = 1234
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
SHAPES = [(), (0, 3), (1,), (19,), (3, 5, 7)]


def _random(shape, dtype, generator):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    high = 255 if dtype == torch.uint8 else 127
    return torch.randint(0, high, shape, generator=generator, dtype=torch.int64).to(dtype)


def _reference(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    if tensor.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return tensor.to(torch.int64).numpy()
    return tensor.numpy()


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    """(path, {name: torch tensor}) holding every dtype the reader supports, at several shapes."""
    generator = torch.Generator().manual_seed(SEED)
    tensors = {f"{tag}.{i}": _random(shape, dtype, generator)
               for tag, dtype in TORCH_DTYPES.items() for i, shape in enumerate(SHAPES)}
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_every_supported_dtype_is_covered():
    assert set(TORCH_DTYPES) == set(SAFETENSORS_DTYPES)


def test_round_trip_every_dtype(every_dtype):
    path, tensors = every_dtype
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        tag = name.split(".")[0]
        array = loaded[name]
        assert array.shape == tuple(tensor.shape), name
        assert array.dtype == (np.float32 if tag == "BF16" else SAFETENSORS_DTYPES[tag]), name
        values = array.astype(np.int64) if tag in ("U16", "U32", "U64") else array
        assert_exact(values, _reference(tensor), what=name, seed=SEED)


def test_bf16_as_uint16_bits(every_dtype):
    path, tensors = every_dtype
    loaded = load_safetensors(path, bf16="uint16")
    for i, _ in enumerate(SHAPES):
        name = f"BF16.{i}"
        bits = tensors[name].view(torch.int16).numpy().view(np.uint16)
        assert loaded[name].dtype == np.uint16
        assert_exact(loaded[name], bits, what=name, seed=SEED)
    assert list_safetensors_weights(path)["BF16.1"].dtype == "BF16"


def test_bad_bf16_mode(every_dtype):
    with pytest.raises(ValueError, match="bf16 must be one of"):
        load_safetensors(every_dtype[0], bf16="bfloat16")


def test_arrays_are_read_only_and_outlive_the_iterator(every_dtype):
    path, tensors = every_dtype
    arrays = dict(iter_safetensors_weights(path.parent))
    gc.collect()
    assert not arrays["F32.4"].flags.writeable
    assert_exact(arrays["F32.4"], tensors["F32.4"].numpy(), what="F32.4", seed=SEED)


def test_header_listing_reads_no_data(every_dtype):
    path, tensors = every_dtype
    infos = read_safetensors_header(path)
    assert set(infos) == set(tensors)
    assert infos["F16.4"].shape == (3, 5, 7) and infos["F16.4"].num_bytes == 3 * 5 * 7 * 2


@pytest.fixture
def sharded(tmp_path):
    generator = torch.Generator().manual_seed(SEED)
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.randn(4, 3, generator=generator),
                                             "b.weight": torch.randn(5, generator=generator).bfloat16()},
        "model-00002-of-00002.safetensors": {"c.weight": torch.randn(2, 2, generator=generator).half()},
    }
    weight_map = {}
    for file_name, tensors in shards.items():
        save_file(tensors, str(tmp_path / file_name))
        weight_map.update({name: file_name for name in tensors})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tmp_path, {name: t for tensors in shards.values() for name, t in tensors.items()}, weight_map


def test_sharded_checkpoint(sharded):
    model_dir, tensors, _ = sharded
    assert [p.name for p in safetensors_files(model_dir)] == ["model-00001-of-00002.safetensors",
                                                              "model-00002-of-00002.safetensors"]
    loaded = dict(iter_safetensors_weights(model_dir))
    assert set(loaded) == set(tensors) == set(list_safetensors_weights(model_dir))
    for name, tensor in tensors.items():
        assert_exact(loaded[name], _reference(tensor), what=name, seed=SEED)


def _rewrite_index(model_dir, weight_map):
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_index_naming_an_absent_tensor(sharded):
    model_dir, _, weight_map = sharded
    _rewrite_index(model_dir, {**weight_map, "d.weight": "model-00002-of-00002.safetensors"})
    with pytest.raises(ValueError, match=r"listed but absent \['d.weight'\]"):
        list_safetensors_weights(model_dir)


def test_index_missing_a_present_tensor(sharded):
    model_dir, _, weight_map = sharded
    _rewrite_index(model_dir, {k: v for k, v in weight_map.items() if k != "a.weight"})
    with pytest.raises(ValueError, match=r"present but not listed \['a.weight'\]"):
        list(iter_safetensors_weights(model_dir))


def test_index_naming_a_missing_shard(sharded):
    model_dir, _, weight_map = sharded
    _rewrite_index(model_dir, {**weight_map, "c.weight": "model-00003-of-00003.safetensors"})
    with pytest.raises(ValueError, match="do not exist: .*model-00003-of-00003"):
        list_safetensors_weights(model_dir)


@pytest.mark.parametrize("index_text, reason", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "no weight_map"),
    ('{"weight_map": {"a.weight": "../elsewhere.safetensors"}}', "not a file name"),
])
def test_bad_index(sharded, index_text, reason):
    model_dir = sharded[0]
    (model_dir / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(ValueError, match=reason):
        list_safetensors_weights(model_dir)


def test_directory_without_weights(tmp_path):
    with pytest.raises(ValueError, match="no safetensors weights"):
        list(iter_safetensors_weights(tmp_path))


# ---- hand-made files --------------------------------------------------------------------------

def _write(path, header, data: bytes, header_len=None):
    raw = json.dumps(header).encode() if isinstance(header, (dict, list)) else header
    prefix = struct.pack("<Q", len(raw) if header_len is None else header_len)
    path.write_bytes(prefix + raw + data)
    return path


def _f32(offsets, shape=(4,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


@pytest.fixture
def valid_file(tmp_path):
    tensors = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4), "y": torch.ones(7, dtype=torch.float16)}
    path = tmp_path / "valid.safetensors"
    save_file(tensors, str(path))
    return path


def test_truncated_files(valid_file, tmp_path):
    data = valid_file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cuts = {0: "too short", 4: "too short", 7: "too short", 8: "runs beyond", 8 + header_len // 2: "runs beyond",
            8 + header_len - 1: "runs beyond", 8 + header_len: "truncated", 8 + header_len + 5: "truncated",
            len(data) - 1: "truncated"}
    for cut, reason in cuts.items():
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=reason) as error:
            load_safetensors(path)
        assert str(path) in str(error.value), f"cut at {cut}: {error.value}"


def test_corrupt_header_json(valid_file):
    data = bytearray(valid_file.read_bytes())
    data[8 + 3] = ord("#")
    valid_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="header is not valid JSON") as error:
        read_safetensors_header(valid_file)
    assert str(valid_file) in str(error.value)


def test_header_length_beyond_file(valid_file):
    data = valid_file.read_bytes()
    valid_file.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ValueError, match=f"header length {1 << 40} runs beyond the file"):
        load_safetensors(valid_file)


@pytest.mark.parametrize("header, data_bytes, reason", [
    ({"a": _f32((0, 16)), "b": _f32((8, 24))}, 24, r"'a' \[0, 16\] and 'b' \[8, 24\] overlap"),
    ({"a": _f32((0, 16)), "b": _f32((20, 36))}, 36, "hole of 4 bytes after 'a'"),
    ({"a": _f32((4, 20))}, 20, "hole of 4 bytes at the start"),
    ({"a": _f32((0, 16))}, 20, "4 trailing bytes"),
    ({"a": _f32((0, 16), shape=(3,))}, 16, "span 16 bytes but F32 \\[3\\] needs 12"),
    ({"a": _f32((16, 0))}, 16, "0 <= begin <= end"),
    ({"a": _f32((0, 16), shape=(4, -1))}, 16, "not a list of non-negative ints"),
    ({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, 4, "unsupported dtype F8_E4M3"),
    ({"a": {"dtype": "F32", "shape": [4]}}, 16, "has no 'data_offsets'"),
    ({"a": [1, 2]}, 0, "not an object"),
    ([1, 2], 0, "JSON list, not an object"),
    ({"__metadata__": {"format": 1}}, 0, "__metadata__"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": 1}', 4, "duplicate key 'a'"),
    (b"\xff\xfe{}", 0, "not valid JSON"),
])
def test_malformed_headers(tmp_path, header, data_bytes, reason):
    path = _write(tmp_path / "bad.safetensors", header, bytes(data_bytes))
    with pytest.raises(ValueError, match=reason) as error:
        load_safetensors(path)
    assert f"safetensors file '{path}'" in str(error.value)


def test_empty_checkpoint_and_metadata(tmp_path):
    path = _write(tmp_path / "empty.safetensors", {"__metadata__": {"format": "pt"}}, b"")
    assert load_safetensors(path) == {}
