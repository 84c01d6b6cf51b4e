"""A numpy-only safetensors reader: header validation, memory-mapped tensors, sharded checkpoints.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data. BF16 tensors come back as float32 (exact); F16/F32/I32/I64 keep their dtype.

Example:
    >>> for name, array in iter_safetensors_weights("model_dir"):
    ...     print(name, array.shape, array.dtype)
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Dict, Iterator, List, Tuple

import numpy as np

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2), "I32": (np.int32, 4),
           "I64": (np.int64, 8), "F64": (np.float64, 8), "U8": (np.uint8, 1), "I8": (np.int8, 1)}
_MAX_HEADER = 100 << 20


def _read_header(path: pathlib.Path) -> Tuple[Dict, int, int]:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"safetensors file '{path}' is truncated: no header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER):
            raise ValueError(f"safetensors file '{path}': header length {header_len} runs beyond the file ({size} bytes)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"safetensors file '{path}': header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file '{path}': header is not a JSON object")
    return header, 8 + header_len, size


def _entries(path: pathlib.Path) -> List[Tuple[str, str, Tuple[int, ...], int, int]]:
    header, data_start, size = _read_header(path)
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"safetensors file '{path}': tensor '{name}' has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise ValueError(f"safetensors file '{path}': tensor '{name}' has unsupported dtype {dtype}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != count * _DTYPES[dtype][1]:
            raise ValueError(f"safetensors file '{path}': tensor '{name}' offsets [{begin}, {end}) do not match "
                             f"{dtype} {list(shape)}")
        if data_start + end > size:
            raise ValueError(f"safetensors file '{path}' is truncated: tensor '{name}' ends at byte "
                             f"{data_start + end} of {size}")
        entries.append((name, dtype, shape, data_start + begin, data_start + end))
    ordered = sorted(entries, key=lambda e: e[3])
    for previous, current in zip(ordered, ordered[1:]):
        if current[3] < previous[4]:
            raise ValueError(f"safetensors file '{path}': tensors '{previous[0]}' and '{current[0]}' overlap")
    return entries


def _to_array(mapped: np.memmap, dtype: str, shape, begin: int, end: int) -> np.ndarray:
    np_dtype, _ = _DTYPES[dtype]
    array = np.frombuffer(mapped, dtype=np_dtype, count=(end - begin) // np.dtype(np_dtype).itemsize, offset=begin)
    if dtype == "BF16":  # exact widening: bf16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.reshape(shape)


def load_safetensors(path) -> Dict[str, np.ndarray]:
    """All tensors of one file, as numpy arrays (views of a read-only memory map, BF16 widened)."""
    path = pathlib.Path(path)
    entries = _entries(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: _to_array(mapped, dtype, shape, begin, end) for name, dtype, shape, begin, end in entries}


def safetensors_files(model_dir) -> List[pathlib.Path]:
    """The checkpoint files of a directory: the index's shards, or model.safetensors."""
    model_dir = pathlib.Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"'{index}' is not a valid safetensors index (needs a weight_map)") from None
        files = sorted({model_dir / shard for shard in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"safetensors shards listed in '{index}' are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in '{model_dir}'")
    return files


def list_safetensors_weights(model_dir) -> List[str]:
    """Every tensor name across the checkpoint (headers only); duplicates across shards raise."""
    names: Dict[str, pathlib.Path] = {}
    for path in safetensors_files(model_dir):
        for name, *_ in _entries(path):
            if name in names:
                raise ValueError(f"tensor '{name}' appears in both '{names[name]}' and '{path}'")
            names[name] = path
    return list(names)


def iter_safetensors_weights(model_dir) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, array) for every tensor of the checkpoint, one shard mapped at a time."""
    for path in safetensors_files(model_dir):
        entries = _entries(path)
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        for name, dtype, shape, begin, end in entries:
            yield name, _to_array(mapped, dtype, shape, begin, end)
        del mapped
