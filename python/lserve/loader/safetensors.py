"""A numpy-only safetensors reader: validated headers, memory-mapped tensors, sharded checkpoints.

Format (github.com/huggingface/safetensors): an 8-byte little-endian header length N, N bytes of
JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
data section, which the tensors tile exactly (no overlap, no hole, no trailing byte). Every
violation raises ValueError naming the file and the reason. Tensors are zero-copy views of a
read-only memory map, except BF16: numpy has no bfloat16, so by default BF16 comes back widened to
float32 (exact); bf16="uint16" returns the raw bit patterns instead (a zero-copy view; the dtype
tag "BF16" is in list_safetensors_weights()).

Example:
    >>> for name, array in iter_safetensors_weights("path/to/model_dir"):
    ...     print(name, array.shape, array.dtype)    # model.norm.weight (576,) float32
"""
from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# safetensors dtype tag -> little-endian numpy dtype. BF16 is read as its uint16 bit patterns.
SAFETENSORS_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
BF16_MODES = ("float32", "uint16")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. data_offsets are relative to the data section, which starts at data_start."""

    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: Tuple[int, ...]
    data_offsets: Tuple[int, int]
    path: pathlib.Path
    data_start: int  # absolute byte offset of the data section: 8 + N

    @property
    def num_bytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


def _fail(path: PathLike, reason: str) -> ValueError:
    return ValueError(f"safetensors file '{path}': {reason}")


def _no_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: pathlib.Path, name: str, entry, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor '{name}': header entry is not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise _fail(path, f"tensor '{name}': header entry has no '{key}'")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise _fail(path, f"tensor '{name}': dtype {dtype!r} is not a string")
    if dtype not in SAFETENSORS_DTYPES:
        raise _fail(path, f"tensor '{name}': unsupported dtype {dtype} "
                          f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor '{name}': shape {shape!r} is not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"tensor '{name}': data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    num_elements = 1
    for dim in shape:
        num_elements *= dim
    expected_bytes = num_elements * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected_bytes:
        raise _fail(path, f"tensor '{name}': data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but "
                          f"{dtype} {shape} needs {expected_bytes}")
    return TensorInfo(name, dtype, tuple(shape), (offsets[0], offsets[1]), path, data_start)


def read_safetensors_header(path: PathLike) -> Dict[str, TensorInfo]:
    """The validated header of one file: {name: TensorInfo}, in data order. Reads no tensor data.

    Raises ValueError when the file is too short, the header length runs beyond the file, the
    header is not a JSON object, an entry is malformed or has an unsupported dtype, offsets do not
    match dtype * shape, tensors overlap or leave holes, or the data is truncated.
    """
    path = pathlib.Path(path)
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"file is {file_bytes} bytes, too short for the 8-byte header length")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > file_bytes - 8:
                raise _fail(path, f"header length {header_bytes} runs beyond the file ({file_bytes} bytes)")
            if header_bytes > _MAX_HEADER_BYTES:
                raise _fail(path, f"header length {header_bytes} exceeds the {_MAX_HEADER_BYTES}-byte limit")
            raw = handle.read(header_bytes)
    except OSError as error:
        raise _fail(path, f"cannot be read ({error.strerror or error})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as error:
        raise _fail(path, f"header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ is not an object of strings")

    data_start = 8 + header_bytes
    data_bytes = file_bytes - data_start
    infos = sorted((_parse_entry(path, name, entry, data_start) for name, entry in header.items()),
                   key=lambda info: info.data_offsets)
    end = 0
    for previous, info in zip([None] + infos[:-1], infos):
        begin = info.data_offsets[0]
        if info.data_offsets[1] > data_bytes:
            raise _fail(path, f"truncated: tensor '{info.name}' ends at data byte {info.data_offsets[1]} but the "
                              f"file holds {data_bytes} data bytes")
        if begin < end:
            raise _fail(path, f"tensors '{previous.name}' {list(previous.data_offsets)} and '{info.name}' "
                              f"{list(info.data_offsets)} overlap")
        if begin > end:
            where = f"after '{previous.name}'" if previous else "at the start of the data section"
            raise _fail(path, f"hole of {begin - end} bytes {where} (before '{info.name}')")
        end = info.data_offsets[1]
    if end != data_bytes:
        raise _fail(path, f"{data_bytes - end} trailing bytes after the last tensor")
    return {info.name: info for info in infos}


def _check_bf16_mode(bf16: str) -> None:
    if bf16 not in BF16_MODES:
        raise ValueError(f"bf16 must be one of {BF16_MODES}, got {bf16!r}")


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """(...,) uint16 bfloat16 bit patterns -> (...,) float32, exact (bf16 is float32's top half)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _map(path: pathlib.Path) -> mmap.mmap:
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _tensor(mapped: mmap.mmap, info: TensorInfo, bf16: str) -> np.ndarray:
    dtype = SAFETENSORS_DTYPES[info.dtype]
    count = info.num_bytes // dtype.itemsize
    if count == 0:
        array = np.empty(info.shape, dtype=dtype)
    else:
        array = np.frombuffer(mapped, dtype=dtype, count=count,
                              offset=info.data_start + info.data_offsets[0]).reshape(info.shape)
    if info.dtype == "BF16" and bf16 == "float32":
        return bf16_bits_to_float32(array)
    return array


def _iter_file(path: pathlib.Path, infos: Dict[str, TensorInfo], bf16: str) -> Iterator[Tuple[str, np.ndarray]]:
    if not infos:
        return
    mapped = _map(path)
    if len(mapped) != next(iter(infos.values())).data_start + sum(i.num_bytes for i in infos.values()):
        raise _fail(path, "changed size while being read")
    for name, info in infos.items():
        yield name, _tensor(mapped, info, bf16)


def load_safetensors(path: PathLike, *, bf16: str = "float32") -> Dict[str, np.ndarray]:
    """Every tensor of one .safetensors file: {name: array of its shape}, read-only views of a memory
    map (BF16 widened to float32 unless bf16="uint16").

    Example:
        >>> load_safetensors("model.safetensors")["model.norm.weight"].shape
        (576,)
    """
    _check_bf16_mode(bf16)
    path = pathlib.Path(path)
    return dict(_iter_file(path, read_safetensors_header(path), bf16))


def _read_index(index_path: pathlib.Path) -> Dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"safetensors index '{index_path}' is not valid JSON ({error})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"safetensors index '{index_path}' has no weight_map of tensor name -> file name")
    for shard in set(weight_map.values()):
        if pathlib.PurePath(shard).name != shard or shard in ("", ".", ".."):
            raise ValueError(f"safetensors index '{index_path}' names shard '{shard}', not a file name in its directory")
    return weight_map


def safetensors_files(model_dir: PathLike) -> List[pathlib.Path]:
    """The checkpoint's files: the shards of model.safetensors.index.json (sorted), else
    model.safetensors. `model_dir` may also be a .safetensors file."""
    model_dir = pathlib.Path(model_dir)
    if model_dir.is_file():
        return [model_dir]
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        files = [model_dir / shard for shard in sorted(set(_read_index(index_path).values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"safetensors index '{index_path}' lists shards that do not exist: "
                             f"{', '.join(missing)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise ValueError(f"no safetensors weights in '{model_dir}': neither {INDEX_FILE} nor {SINGLE_FILE} exists")


def _headers(model_dir: PathLike) -> List[Tuple[pathlib.Path, Dict[str, TensorInfo]]]:
    """(file, header) per checkpoint file; with an index, each shard must hold exactly its weight_map names."""
    files = safetensors_files(model_dir)
    headers = [(path, read_safetensors_header(path)) for path in files]
    index_path = pathlib.Path(model_dir) / INDEX_FILE
    if pathlib.Path(model_dir).is_dir() and index_path.is_file():
        weight_map = _read_index(index_path)
        for path, infos in headers:
            listed = {name for name, shard in weight_map.items() if shard == path.name}
            absent, unlisted = sorted(listed - set(infos)), sorted(set(infos) - listed)
            if absent or unlisted:
                raise ValueError(f"safetensors index '{index_path}' disagrees with shard '{path.name}': "
                                 f"listed but absent {absent}, present but not listed {unlisted}")
    return headers


def list_safetensors_weights(model_dir: PathLike) -> Dict[str, TensorInfo]:
    """{name: TensorInfo} over the whole checkpoint (headers only, every file validated).

    Example:
        >>> infos = list_safetensors_weights("model_dir")
        >>> infos["lm_head.weight"].dtype, infos["lm_head.weight"].shape
        ('BF16', (49152, 576))
    """
    result: Dict[str, TensorInfo] = {}
    for path, infos in _headers(model_dir):
        for name, info in infos.items():
            if name in result:
                raise ValueError(f"tensor '{name}' is in both '{result[name].path}' and '{path}'")
            result[name] = info
    return result


def iter_safetensors_weights(model_dir: PathLike, *, bf16: str = "float32") -> Iterator[Tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a checkpoint directory (sharded or single file), in file then
    data order. All headers are validated before the first tensor is yielded; one file is mapped at a
    time, and arrays stay valid after iteration (they keep their map alive).
    """
    _check_bf16_mode(bf16)
    headers = _headers(model_dir)
    seen: Dict[str, pathlib.Path] = {}
    for path, infos in headers:
        for name in infos:
            if name in seen:
                raise ValueError(f"tensor '{name}' is in both '{seen[name]}' and '{path}'")
            seen[name] = path
    for path, infos in headers:
        yield from _iter_file(path, infos, bf16)
