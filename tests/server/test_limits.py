"""Body-size cap, unexpected errors and the pending limit on a fake engine (fast; the real-model
versions are in test_hardening.py): a real uvicorn server on 127.0.0.1 in a background thread."""
from __future__ import annotations

import httpx
import pytest

from fake_engine import FakeEngine
from lserve.server.app import build_app, default_max_body_bytes
from server_utils import ThreadedServer

MODEL = "fake"


def assert_error(response, status: int, param=None, match: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["object"] == "error"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert match.lower() in error["message"].lower(), error["message"]
    if param is not None:
        assert error["param"] == param, body
    return error


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def one_connection(base_url: str) -> httpx.Client:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.Client(base_url=base_url, timeout=30, limits=limits)


def test_body_limit_with_and_without_content_length():
    app = build_app(FakeEngine(), MODEL, max_request_body_bytes=2000)
    with ThreadedServer(app) as running, one_connection(running.base_url) as http:
        small = b'{"prompt": "' + b"a" * 1900 + b'", "max_tokens": 1}'
        assert len(small) <= 2000
        assert http.post("/v1/completions", content=small, headers={"content-type": "application/json"}).status_code \
            == 400  # 1,900 characters of prompt: over the fake engine's 128 tokens, but read and answered
        big = b'{"prompt": "' + b"a" * 2000 + b'", "max_tokens": 1}'
        error = assert_error(http.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
                             413, match="2000 bytes")
        assert error["type"] == "RequestTooLargeError"

        def chunks():
            for start in range(0, len(big), 500):
                yield big[start:start + 500]

        response = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_error(response, 413, match="2000 bytes")
        assert http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_default_body_limit_follows_the_context():
    class Bounded:
        max_token_text_bytes = 81

    assert default_max_body_bytes(512, Bounded()) == 2 * 512 * 81 + (4 << 20)
    assert default_max_body_bytes(8192, Bounded()) > default_max_body_bytes(512, Bounded())
    assert default_max_body_bytes(512, None) >= 4 << 20  # no tokenizer: the fallback bound
    assert build_app(FakeEngine(), MODEL).state.max_request_body_bytes == default_max_body_bytes(128, None)


class _BuggyTokenizer:
    """A tokenizer with a bug: any prompt containing "boom" raises something that is not ValueError."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def encode(self, text, add_special_tokens=True):
        if "boom" in text:
            raise KeyError("a bug")
        return self.inner.encode(text, add_special_tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_unexpected_error_is_a_json_500_on_a_live_connection(caplog):
    engine = FakeEngine()
    engine.tokenizer = _BuggyTokenizer(engine.tokenizer)
    with ThreadedServer(build_app(engine, MODEL)) as running, one_connection(running.base_url) as http:
        port = local_port(http.get("/health"))
        with caplog.at_level("ERROR", logger="lserve.server"):
            error = assert_error(http.post("/v1/completions", json={"prompt": "boom", "max_tokens": 2}), 500,
                                 match="KeyError")
        assert error["type"] == "InternalServerError"
        assert any("unexpected error" in record.message for record in caplog.records)
        response = http.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})
        assert response.status_code == 200 and local_port(response) == port


def test_request_over_the_pending_limit_is_400_naming_it():
    app = build_app(FakeEngine(), MODEL, max_pending_requests=10)
    with ThreadedServer(app) as running, httpx.Client(base_url=running.base_url, timeout=30) as http:
        error = assert_error(http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 4, "max_tokens": 1}),
                             400, "n", match="12 sequences")
        assert "max-pending-requests" in error["message"] and "10" in error["message"]
        assert_error(http.post("/v1/completions", json={"prompt": ["x"] * 11, "max_tokens": 1}), 400, "prompt",
                     match="11 sequences")
        assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "n": 11, "max_tokens": 1}), 400, "n", match="11")
        response = http.post("/v1/completions", json={"prompt": ["a", "b"], "n": 5, "max_tokens": 1})
        assert response.status_code == 200 and len(response.json()["choices"]) == 10


@pytest.mark.parametrize("body, param", [({"prompt": "x\ud800"}, "prompt"),
                                         ({"messages": [{"role": "user", "content": "\udc00"}]}, "messages")])
def test_tokenize_refuses_text_that_is_not_unicode(body, param):
    import json

    with ThreadedServer(build_app(FakeEngine(), MODEL)) as running, one_connection(running.base_url) as http:
        response = http.post("/tokenize", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert_error(response, 400, param, match="not valid Unicode")
