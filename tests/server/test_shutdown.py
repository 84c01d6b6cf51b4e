"""SIGTERM on a server process (fake engine): running streams finish, or end with "abort" once the
grace period is over; the process exits with status 0 within a few seconds."""
from __future__ import annotations

import json
import pathlib
import signal
import threading
import time

import pytest

from server_utils import ServerProcess, free_port, stream_in_background

HERE = pathlib.Path(__file__).resolve().parent


def start_server(step_delay: float, grace: float) -> ServerProcess:
    port = free_port()
    return ServerProcess([str(HERE / "fake_server_main.py"), str(port), str(step_delay), str(grace)], port,
                         startup_timeout=60)


@pytest.mark.parametrize("max_tokens, expected_finish", [(20, "length"), (120, "abort")])
def test_sigterm_is_graceful(max_tokens, expected_finish):
    server = start_server(step_delay=0.02, grace=0.5)
    process, base_url = server.process, server.base_url
    try:
        first_chunk, result = threading.Event(), {}
        body = {"prompt": "bye", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        thread = stream_in_background(base_url + "/v1/completions", body, first_chunk, result)
        assert first_chunk.wait(10)
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=15)
        elapsed = time.monotonic() - sent_at
        thread.join(5)
        output = server.output()
    finally:
        server.kill()
    assert returncode == 0, output
    assert elapsed < 5.0, f"shutdown took {elapsed:.1f}s"
    events = result["events"]
    assert result.get("status") == 200 and "error" not in result and events[-1] == "[DONE]", result
    finishes = [json.loads(event)["choices"][0]["finish_reason"] for event in events[:-1]]
    assert finishes[-1] == expected_finish
