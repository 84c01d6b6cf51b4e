"""`pip install .` gives a working `lserve serve` (issue 13, item 6).

Fast: every third-party module the server (and its load tester, `lserve bench serve`) imports belongs
to a base dependency in pyproject.toml; a command that needs an optional extra says so in one line,
naming the extra, before it loads a model. Slow: the README's install into a fresh virtual environment
(no extras), then `lserve serve` on SmolLM2 until /health and a completion answer.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lserve import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "lserve"
SERVER_SOURCES = sorted((PACKAGE / "server").glob("*.py")) + [PACKAGE / "bench" / "serve.py"]

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def _imported_modules(path: pathlib.Path) -> set:
    """Top-level names of every module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_server_imports_are_base_dependencies():
    dependencies = {_requirement_name(requirement) for requirement in _pyproject()["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    third_party = set()
    for path in SERVER_SOURCES:
        third_party |= {name for name in _imported_modules(path)
                        if name not in sys.stdlib_module_names and name not in ("lserve", "__future__")}
    assert {"fastapi", "uvicorn", "pydantic", "starlette", "httpx"} <= third_party  # the scan sees them
    missing = {}
    for module in sorted(third_party):
        owners = {_normalize(owner) for owner in distributions.get(module, [])}
        assert owners, f"{module} is imported by the server but not installed here"
        if not owners & dependencies:
            missing[module] = sorted(owners)
    assert not missing, f"imported by the server, not in [project] dependencies: {missing}"


def test_server_is_no_longer_an_extra():
    project = _pyproject()["project"]
    assert project["optional-dependencies"].get("serve", []) == []
    for extra in ("calibrate", "eval", "bench"):
        assert extra in project["optional-dependencies"], extra


def _hide(monkeypatch, *modules: str) -> None:
    """Makes `import module` fail (ImportError) and find_spec say it is missing."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _one_line_error(capsys, extra: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lserve: error:"), err
    assert f"pip install 'lserve[{extra}]'" in err, err
    return err


def _forbid(monkeypatch, target: str, attribute: str) -> None:
    def slow_work(*args, **kwargs):
        raise AssertionError(f"{target}.{attribute} ran before the missing extra was reported")

    monkeypatch.setattr(f"{target}.{attribute}", slow_work)


def test_calibrate_names_its_extra_before_loading(monkeypatch, capsys, tmp_path):
    _hide(monkeypatch, "transformers")
    _forbid(monkeypatch, "lserve.calibrate.trainer", "load_hf_model")
    _forbid(monkeypatch, "lserve.calibrate", "calibrate")
    assert cli.main(["calibrate", "--out", str(tmp_path / "p.tsv"), "--quiet"]) == 2
    assert "transformers" in _one_line_error(capsys, "calibrate")
    from lserve.calibrate.trainer import CalibrationConfig, calibrate
    from lserve.extras import MissingExtraError

    with pytest.raises(MissingExtraError, match=r"lserve\[calibrate\]"):
        calibrate("smollm2-135m-instruct", CalibrationConfig())


def test_eval_names_its_extra_before_running(monkeypatch, capsys, tmp_path):
    _forbid(monkeypatch, "lserve.eval.niah", "run_niah")
    _hide(monkeypatch, "matplotlib")
    assert cli.main(["eval", "niah", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "h.png")]) == 2
    assert "matplotlib" in _one_line_error(capsys, "eval")
    _hide(monkeypatch, "torch")
    assert cli.main(["eval", "niah", "--out", str(tmp_path / "r.json"), "--sparsity", "lserve", "--recall"]) == 2
    assert "torch" in _one_line_error(capsys, "eval")


def test_bench_names_its_extra_before_running(monkeypatch, capsys):
    _forbid(monkeypatch, "lserve.bench.latency", "bench_lserve")
    _hide(monkeypatch, "torch", "transformers")
    assert cli.main(["bench", "latency"]) == 2
    _one_line_error(capsys, "bench")
    assert cli.main(["bench", "kernels"]) == 2
    _one_line_error(capsys, "bench")


def test_serve_checks_its_dependencies_before_loading(monkeypatch, capsys):
    _forbid(monkeypatch, "lserve.cli", "_engine_from_args")
    _hide(monkeypatch, "uvicorn")
    assert cli.main(["serve", "--model", "smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "uvicorn" in err and "pip install lserve" in err, err


# ---- the README's install, for real ------------------------------------------------------------------------

def _copy_source(destination: pathlib.Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored): no build output comes along."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.mark.slow
def test_pip_install_gives_a_working_server(tmp_path, smollm2_gguf):
    """`pip install .` (no extras) into a fresh venv, then `lserve serve` answers /health and a completion.
    LSERVE_CUDA=OFF keeps the build to the CPU core (about 10 minutes on 2 cores, plus the downloads of the
    build requirements); everything else is the README's command."""
    import socket

    import httpx

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the source from")
    source, venv = tmp_path / "src", tmp_path / "venv"
    _copy_source(source)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SKBUILD_CMAKE_DEFINE"] = "LSERVE_CUDA=OFF"
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "install.log"
    with open(log, "w") as handle:
        installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "."], cwd=source, env=env,
                                   stdout=handle, stderr=subprocess.STDOUT, timeout=3600)
    assert installed.returncode == 0, log.read_text()[-5000:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server_log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(venv / "bin" / "lserve"), "serve", "--model", str(smollm2_gguf), "--port", str(port),
                               "--max-model-len", "256", "--quiet", "--log-level", "warning"],
                              cwd=tmp_path, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        healthy = False
        while time.monotonic() < deadline and server.poll() is None:
            try:
                healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if healthy:
                break
            time.sleep(0.2)
        assert healthy, (tmp_path / "serve.log").read_text()[-5000:]
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200 and response.json()["choices"][0]["text"], response.text
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
