"""Hostile input against `lserve serve` on SmolLM2 in a child process on 127.0.0.1 (issue 13, items 1-3).

A 50 MB body is refused with 413 while /health keeps answering and the server's memory stays flat;
a prompt longer than the context could hold is refused before it is tokenized; inputs that used to
overflow the C++ bindings or break UTF-8 encoding (and so gave a 500 that dropped the keep-alive
connection) are 400s naming the field, on a connection that goes on working; the pending limit counts
sequences (prompts x n), and a request that could never fit gets a 400 naming the limit.
Figures from these tests are in docs/ROBUSTNESS.md (Server under hostile input).
"""
from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest

from server_utils import ServerProcess, free_port

pytest.importorskip("lserve._C", reason="the compiled engine (lserve._C) is not built")

MAX_MODEL_LEN = 512
MAX_PENDING = 50


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    port = free_port()
    process = ServerProcess(["-m", "lserve.cli", "serve", "--model", str(smollm2_gguf), "--port", str(port),
                             "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16",
                             "--max-pending-requests", str(MAX_PENDING), "--shutdown-grace", "1",
                             "--log-level", "warning", "--quiet"], port)
    yield process
    process.kill()


@pytest.fixture(scope="module")
def http(server):
    # One connection, so that a dropped keep-alive connection shows up as a new local port.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=server.base_url, timeout=60, limits=limits) as client:
        yield client


def assert_error(response, status: int, param=None, match: str = "") -> dict:
    assert response.status_code == status, response.text[:2000]
    body = response.json()
    assert body["object"] == "error", body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status, body
    assert error["message"] and match.lower() in error["message"].lower(), error["message"]
    if param is not None:
        assert error["param"] == param, body
    return error


def post_raw(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POSTs body as ASCII JSON: a lone surrogate goes out as the escape "\\ud800", which is valid JSON
    (httpx's own json= would fail to UTF-8-encode it on the client side)."""
    return http.post(path, content=json.dumps(body).encode("ascii"), headers={"content-type": "application/json"})


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---- item 2: every value that crosses into C++ or into the tokenizer is checked -----------------------------

HUGE = 2**31
BAD_INPUTS = [
    # The five that gave a 500 and dropped the connection:
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "top_k": HUGE}, 400, "top_k"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop_token_ids": [HUGE]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hi \ud800 there", "max_tokens": 1}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 1}, 400, "messages"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    # Their relatives: every other field that reaches the engine, out of range.
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "top_k": 2**64}, 400, "top_k"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop_token_ids": [1, -1]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2**63}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "min_tokens": HUGE}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "logprobs": HUGE}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "n": HUGE}, 400, "n"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "n": 2, "best_of": HUGE}, 400, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "temperature": 1e39}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "repetition_penalty": 1e-50}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "stop": ["\ud800"]}, 400, "stop"),
    ("/v1/completions", {"prompt": [1, HUGE], "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 2**64]], "max_tokens": 1}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                              "top_logprobs": HUGE}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
     400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x\ud800"}]}, 400, "messages"),
    ("/detokenize", {"tokens": [1, HUGE]}, 400, "tokens"),
    ("/detokenize", {"tokens": [2**64]}, 400, "tokens"),
    ("/v1/completions", {"model": "\ud800", "prompt": "Hi", "max_tokens": 1}, 404, "model"),
]


def test_bad_values_are_4xx_on_a_live_connection(http):
    port = local_port(http.get("/health"))
    failures = []
    for path, body, status, param in BAD_INPUTS:
        try:
            assert_error(post_raw(http, path, body), status, param)
        except (AssertionError, httpx.HTTPError) as error:
            failures.append(f"{path} {json.dumps(body)[:120]}: {type(error).__name__}: {error}")
        try:
            health = http.get("/health")
        except httpx.HTTPError:  # the reset surfaced here instead; the next request reconnects
            health = http.get("/health")
        assert health.status_code == 200
        if local_port(health) != port:
            failures.append(f"{path} {json.dumps(body)[:120]}: the keep-alive connection was dropped")
            port = local_port(health)
    assert not failures, "\n".join(failures)
    # The same connection still serves real work.
    response = http.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                   "temperature": 0})
    assert response.status_code == 200 and local_port(response) == port


def test_valid_extremes_still_work(http):
    body = {"prompt": "Hi", "max_tokens": 2, "top_k": HUGE - 1, "seed": 2**63 - 1, "stop_token_ids": [HUGE - 1],
            "temperature": 0.7}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text


# ---- item 3: the pending limit counts sequences -------------------------------------------------------------

def test_request_that_can_never_fit_is_400_naming_the_limit(http):
    # 8 prompts x n=128 = 1,024 sequences under a limit of 50: the bypass of issue 13.
    body = {"prompt": [f"prompt {index}" for index in range(8)], "n": 128, "max_tokens": 1}
    error = assert_error(http.post("/v1/completions", json=body), 400, match=str(MAX_PENDING))
    assert "1024" in error["message"] and "max-pending-requests" in error["message"], error
    # 5,000 prompts of n=1: no retry could ever help, so not 503 "retry later".
    body = {"prompt": ["x"] * 5000, "max_tokens": 1}
    error = assert_error(http.post("/v1/completions", json=body), 400, match=str(MAX_PENDING))
    assert "5000" in error["message"], error
    # Exactly the limit fits (when nothing else is pending).
    body = {"prompt": [f"prompt {index}" for index in range(5)], "n": 10, "max_tokens": 1}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_pending_limit_counts_sequences(server, http):
    """40 sequences (5 prompts x n=8) are pending; 8 prompts x n=2 = 16 more would exceed 50: 503 now,
    200 once the first request is gone. Counting prompts (5 + 8 = 13) let it through."""
    busy = {"prompt": [f"Tell a long story number {index}." for index in range(5)], "n": 8, "max_tokens": 400,
            "ignore_eos": True, "temperature": 1.0, "stream": True}
    extra = {"prompt": [f"extra {index}" for index in range(8)], "n": 2, "max_tokens": 1}
    with httpx.Client(base_url=server.base_url, timeout=60) as streaming:
        with streaming.stream("POST", "/v1/completions", json=busy) as response:
            assert response.status_code == 200
            # Hold the iterator: a dropped one is finalized at once, and httpx then closes the connection,
            # which aborts the request and frees its sequences (racing the request below).
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    break
            assert_error(http.post("/v1/completions", json=extra), 503, match="overloaded")
    deadline = time.monotonic() + 30
    while True:  # the aborts of the closed stream are applied between engine steps
        response = http.post("/v1/completions", json=extra)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 16


# ---- item 1: size limits, early length checks, heavy work off the event loop --------------------------------

def test_prompt_longer_than_the_context_could_hold_is_refused_before_tokenizing(http):
    # 3.6 MB of text: well under the default body limit, far over what 512 tokens could spell. Tokenizing
    # it takes seconds on this model (about 1.3 s per MB on one core); the refusal must not wait for that.
    text = "hello world " * 300_000
    for path, body, param in (("/v1/completions", {"prompt": text, "max_tokens": 1}, "prompt"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}, "messages"),
                              ("/tokenize", {"prompt": text}, "prompt")):
        start = time.perf_counter()
        response = http.post(path, json=body)
        elapsed = time.perf_counter() - start
        error = assert_error(response, 400, param, match=str(MAX_MODEL_LEN))
        assert "context length" in error["message"] or "max_model_len" in error["message"], error
        assert elapsed < 1.5, f"{path}: the refusal took {elapsed:.2f} s (tokenizing first?)"


def test_longest_tokens_are_not_refused_early(http):
    """A newline and 80 spaces is one 81-byte token of SmolLM2's vocabulary: 500 of them are 40,500 bytes
    but only 500 tokens, which fit 512 with 4 to generate. The early check must let them through."""
    text = ("\n" + " " * 80) * 500
    count = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["count"]
    assert count == 500
    response = http.post("/v1/completions", json={"prompt": text, "max_tokens": 4, "temperature": 0,
                                                   "add_special_tokens": False})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 500
    # 512 of them cannot fit: refused (by the early check or after tokenizing, either way a 400).
    assert_error(http.post("/v1/completions", json={"prompt": ("\n" + " " * 80) * 512, "max_tokens": 1}), 400,
                 "prompt", match=str(MAX_MODEL_LEN))


def _poll_health(base_url: str, stop: threading.Event, latencies: list) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            response = client.get("/health")
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200
            time.sleep(0.01)


def _refuse_while_polling(server, send) -> tuple:
    """Runs send() (a big request) while another connection polls /health; returns (response, latencies)."""
    latencies: list = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_health, args=(server.base_url, stop, latencies), daemon=True)
    poller.start()
    time.sleep(0.2)  # some polls before the big request, so that the poller's connection is open
    try:
        response = send()
        time.sleep(0.2)
    finally:
        stop.set()
        poller.join(30)
    return response, latencies


def test_50mb_body_is_413_while_health_answers(server):
    """/health is polled on its own connection while a 50 MB completion request is refused. On a 2-core
    machine shared with other work the bound is loose: median < 0.1 s, worst < 0.5 s (before the fix
    one poll waited for the whole body to be parsed and tokenized, tens of seconds)."""
    payload = b'{"prompt": "' + b"hello world " * (50_000_000 // 12) + b'", "max_tokens": 1}'
    rss_before = rss_bytes(server.process.pid)
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        response, latencies = _refuse_while_polling(
            server, lambda: client.post("/v1/completions", content=payload,
                                        headers={"content-type": "application/json"}))
        assert_error(response, 413, match="bytes")
        # Chunked (no Content-Length): the cap applies while the body streams in.
        def chunks():
            for start in range(0, len(payload), 1 << 20):
                yield payload[start:start + (1 << 20)]

        chunked, chunked_latencies = _refuse_while_polling(server, lambda: client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}))
        assert "content-length" not in chunked.request.headers
        assert_error(chunked, 413, match="bytes")
    latencies += chunked_latencies
    assert len(latencies) >= 10, latencies
    assert statistics.median(latencies) < 0.1 and max(latencies) < 0.5, \
        f"/health latencies during the refusal: median {statistics.median(latencies):.3f} s, max {max(latencies):.3f} s"
    time.sleep(0.5)
    growth = rss_bytes(server.process.pid) - rss_before
    print(f"\n/health during two 50 MB refusals: {len(latencies)} polls, median "
          f"{statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms; RSS growth "
          f"{growth / 2**20:.1f} MiB")
    assert growth < 64 * 2**20, f"the server grew by {growth / 2**20:.0f} MiB after refusing"
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_big_prompt_under_the_body_limit_leaves_health_and_memory_alone(server):
    """4 MB of prompt passes the body limit (default: twice the longest prompt 512 tokens can spell, plus
    4 MiB) and is refused by the length check: /health answers meanwhile, and memory comes back."""
    text = "hello world " * 330_000
    rss_before = rss_bytes(server.process.pid)
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        response, latencies = _refuse_while_polling(
            server, lambda: client.post("/v1/completions", json={"prompt": text, "max_tokens": 1}))
    assert_error(response, 400, "prompt", match=str(MAX_MODEL_LEN))
    assert max(latencies) < 0.5, latencies
    time.sleep(0.5)
    growth = rss_bytes(server.process.pid) - rss_before
    assert growth < 64 * 2**20, f"the server grew by {growth / 2**20:.0f} MiB after refusing"
