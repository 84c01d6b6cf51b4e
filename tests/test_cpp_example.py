"""examples/cpp builds against the installed package (find_package(lserve)) and gives the same greedy
tokens as the Python API."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

import lserve

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config_dir() -> pathlib.Path:
    path = pathlib.Path(lserve.cmake_prefix_path) / "lserve"
    if not (path / "lserveConfig.cmake").exists():
        pytest.skip(f"lserve's CMake package is not installed at {path} (pip install . installs it)")
    return path


def _run(argv, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_cpp_example_matches_python(smollm2_gguf, tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    config_dir = _config_dir()
    build = tmp_path / "build"
    _run(["cmake", "-S", str(REPO / "examples" / "cpp"), "-B", str(build), f"-Dlserve_DIR={config_dir}",
          "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build), "-j", "2"])

    from lserve import Engine, SamplingParams

    engine = Engine(str(smollm2_gguf), max_model_len=2048, show_progress=False)
    ids = engine.tokenizer.encode("The quick brown fox")
    expected = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    result = _run([str(build / "lserve_generate"), str(smollm2_gguf), "12", *map(str, ids)], env={**os.environ})
    got = [int(t) for t in result.stdout.split()]
    assert got == expected.outputs[0].token_ids
