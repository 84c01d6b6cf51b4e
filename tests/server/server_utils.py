"""Test helpers: an app served by uvicorn on a free port in a background thread, and SSE parsing."""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import List

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadedServer:
    """`with ThreadedServer(app) as server:` serves app at server.base_url until the block ends."""

    def __init__(self, app, timeout_graceful_shutdown: float = 5.0) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=timeout_graceful_shutdown)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = ""

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def parse_sse(body: str) -> List[object]:
    """The data payloads of an event stream: dicts, and the string "[DONE]"."""
    events = []
    for block in body.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data line: {block!r}"
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


class ServerProcess:
    """A server in a child process (`python -m lserve.cli serve ...` or a script), up once /health is 200.

    The child gets the parent's lserve and tests/server/ on PYTHONPATH; its combined output is kept in a file so a
    failure can show it without the pipe ever filling up.
    """

    def __init__(self, argv: List[str], port: int, startup_timeout: float = 180.0) -> None:
        import os
        import pathlib
        import subprocess
        import sys
        import tempfile

        import lserve

        here = pathlib.Path(__file__).resolve().parent
        # The child imports the same lserve as this process: the installed package under CI, python/
        # in a development checkout.
        package_root = pathlib.Path(lserve.__file__).resolve().parents[1]
        paths = [str(package_root), str(here), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in paths if path))
        self.log = tempfile.NamedTemporaryFile("w+", prefix="lserve-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen([sys.executable, *argv], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{port}"
        self._wait_healthy(startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server was not healthy after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as handle:
            return handle.read()[-20000:]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def stream_in_background(url: str, body: dict, first_chunk: threading.Event, result: dict) -> threading.Thread:
    """POSTs a streaming request on a thread; result gets "status", "events" (data payloads) or "error".
    first_chunk is set at the first data line (or when the request ends without one)."""
    import httpx

    def run():
        events = []
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as response:
                result["status"] = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first_chunk.set()
        except httpx.HTTPError as error:
            result["error"] = error
        result["events"] = events
        first_chunk.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
