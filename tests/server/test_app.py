"""The HTTP server on a fake engine: the official openai client, SSE, errors, metrics, disconnects.

Each test talks to a real uvicorn server on 127.0.0.1 (a background thread), so streaming and
client disconnects go through real sockets; no model is loaded.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from fake_engine import FakeEngine
from lserve.server.app import build_app
from lserve.server.metrics import parse_metrics
from server_utils import ThreadedServer, parse_sse

openai = pytest.importorskip("openai")

MODEL = "fake"


@pytest.fixture(scope="module")
def fake_engine():
    return FakeEngine(step_delay=0.001)


@pytest.fixture(scope="module")
def server(fake_engine):
    with ThreadedServer(build_app(fake_engine, MODEL)) as running:
        yield running


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)


def metrics_of(http) -> dict:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


def assert_error(response, status: int, param=None, match: str = ""):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["object"] == "error"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert match.lower() in error["message"].lower(), error["message"]
    if param is not None:
        assert error["param"] == param


# ---- the openai client ------------------------------------------------------------------------------

def test_openai_completion(client, fake_engine):
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "text_completion" and completion.model == MODEL
    assert len(choice.text) == 5 and choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(fake_engine.tokenizer.encode("Hello"))
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5


def test_openai_chat(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi <eos>"}],
                                          max_tokens=20, temperature=0)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and chat.usage.completion_tokens == 4  # EOS after three tokens
    assert len(choice.message.content) == 3


def test_openai_streaming_matches_non_streaming(client):
    full = client.completions.create(model=MODEL, prompt="stream me", max_tokens=12, temperature=0)
    pieces, finish = [], None
    for chunk in client.completions.create(model=MODEL, prompt="stream me", max_tokens=12, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == full.choices[0].text and finish == "length"

    chat_pieces, usage = [], None
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=7,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        elif chunk.choices[0].delta.content:
            chat_pieces.append(chunk.choices[0].delta.content)
    chat_full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                               max_tokens=7, temperature=0)
    assert "".join(chat_pieces) == chat_full.choices[0].message.content
    assert usage.completion_tokens == 7 and usage.prompt_tokens == chat_full.usage.prompt_tokens


def test_openai_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="random", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_n_and_multiple_prompts(client):
    completion = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=4, n=2, temperature=1.0, seed=3)
    assert [choice.index for choice in completion.choices] == [0, 1, 2, 3]
    assert completion.choices[0].text != completion.choices[1].text
    assert completion.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3,
                                          max_tokens=3, seed=1)
    assert sorted(choice.index for choice in chat.choices) == [0, 1, 2]


def test_logprobs(client):
    completion = client.completions.create(model=MODEL, prompt="lp", max_tokens=4, temperature=0, logprobs=5)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset == [0, 1, 2, 3]
    assert all(len(top) == 5 for top in logprobs.top_logprobs)
    assert min(min(top.values()) for top in logprobs.top_logprobs) == -9999.0  # -inf clamped
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    assert all(len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode()) for entry in content)


def test_stop_strings_are_not_streamed(client, http):
    full = client.completions.create(model=MODEL, prompt="stop test", max_tokens=30, temperature=0).choices[0].text
    stop = full[10:13]
    expected = full[: full.find(stop)]
    stopped = client.completions.create(model=MODEL, prompt="stop test", max_tokens=30, temperature=0, stop=[stop])
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    events = parse_sse(http.post("/v1/completions", json={"prompt": "stop test", "max_tokens": 30, "temperature": 0,
                                                          "stop": [stop], "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert "".join(event["choices"][0]["text"] for event in events[:-1]) == expected
    assert events[-2]["choices"][0]["stop_reason"] == stop
    included = client.completions.create(model=MODEL, prompt="stop test", max_tokens=30, temperature=0, stop=stop,
                                         extra_body={"include_stop_str_in_output": True})
    assert included.choices[0].text == expected + stop


def test_vllm_extensions_via_extra_body(client):
    completion = client.completions.create(model=MODEL, prompt="Hi <eos>", max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.1,
                                                       "repetition_penalty": 1.1, "min_tokens": 1})
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 6


def test_token_id_prompts_and_echo(http, fake_engine):
    ids = fake_engine.tokenizer.encode("abc")
    body = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 3, "temperature": 0, "echo": True}).json()
    assert body["choices"][0]["text"].startswith("abc") and len(body["choices"][0]["text"]) == 6
    batch = http.post("/v1/completions", json={"prompt": [ids, ids[:2]], "max_tokens": 2}).json()
    assert len(batch["choices"]) == 2 and batch["usage"]["prompt_tokens"] == len(ids) + 2


# ---- SSE framing --------------------------------------------------------------------------------------

def test_sse_framing_and_usage(http):
    response = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "sse"}], "max_tokens": 5, "temperature": 0, "n": 2, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" and "usage" in chunk for chunk in chunks)
    assert [chunk["choices"][0]["delta"] for chunk in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    finishes = [chunk["choices"][0] for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]]
    assert sorted(choice["index"] for choice in finishes) == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    no_usage = parse_sse(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}).text)
    assert all("usage" not in chunk for chunk in no_usage[:-1])


# ---- other endpoints ----------------------------------------------------------------------------------

def test_models_health_version(http, client):
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 128
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_tokenize_detokenize(http, fake_engine):
    body = http.post("/tokenize", json={"prompt": "hey", "return_token_strs": True}).json()
    assert body["tokens"] == fake_engine.tokenizer.encode("hey") and body["count"] == 4
    assert body["token_strs"][1:] == ["h", "e", "y"] and body["max_model_len"] == 128
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hey"}]}).json()
    assert chat["tokens"] == fake_engine.tokenizer.encode("<user>hey\n<assistant>", add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "hey"}
    assert_error(http.post("/detokenize", json={"tokens": [5000]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, "model")


# ---- errors -------------------------------------------------------------------------------------------

def test_malformed_json(http):
    response = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, match="not valid JSON")
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/completions", content=b"", headers={"content-type": "application/json"}), 400)


@pytest.mark.parametrize("endpoint, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokenz": 3}, "max_tokenz"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "foo": 1}, "foo"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"bogus": True}}, "stream_options.bogus"),
])
def test_unknown_fields(http, endpoint, body, param):
    assert_error(http.post(endpoint, json=body), 400, param, match="Extra inputs")


@pytest.mark.parametrize("body, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"seed": -1}, "seed"),
    ({"top_k": -5}, "top_k"),
    ({"temperature": "hot"}, "temperature"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
])
def test_out_of_range_parameters(http, body, param):
    """A 400 naming the parameter; the range checks are the C++ core's, its file:line left out."""
    response = http.post("/v1/completions", json={"prompt": "x", **body})
    assert_error(response, 400, param, match=param)
    assert ".cpp:" not in response.json()["error"]["message"]


def test_chat_out_of_range_parameters(http):
    messages = [{"role": "user", "content": "x"}]
    assert_error(http.post("/v1/chat/completions", json={"messages": messages, "top_logprobs": 3}), 400, "top_logprobs")
    assert_error(http.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 0}), 400,
                 "max_completion_tokens")
    assert_error(http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": -2}), 400, "max_tokens")
    assert_error(http.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400,
                 "messages", match="robot")


def test_prompt_too_long(http):
    assert_error(http.post("/v1/completions", json={"prompt": "x" * 200}), 400, "prompt", match="context length")
    assert_error(http.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 100}), 400, "max_tokens",
                 match="context length")
    long_chat = {"messages": [{"role": "user", "content": "y" * 200}], "stream": True}
    assert_error(http.post("/v1/chat/completions", json=long_chat), 400, "messages", match="context length")


def test_unknown_model_and_route(http, client):
    assert_error(http.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "model", match="gpt-4")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_server_goes_on_after_errors(http, client):
    for _ in range(3):
        http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        http.post("/v1/completions", json={"prompt": "x" * 500})
    assert client.completions.create(model=MODEL, prompt="still here", max_tokens=3).choices[0].text


# ---- concurrency --------------------------------------------------------------------------------------

def test_64_concurrent_streams_match_solo(server, http, fake_engine):
    prompts = [f"client {index} says hello" for index in range(64)]

    async def stream_one(client, prompt):
        text = ""
        async with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                                                  "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    solo = [http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
            ["choices"][0]["text"] for prompt in prompts]
    steps_before = len(fake_engine.batch_sizes)

    async def all_at_once():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(stream_one(client, prompt) for prompt in prompts))

    assert asyncio.run(all_at_once()) == solo
    assert max(fake_engine.batch_sizes[steps_before:]) > 8  # the clients shared batches
    assert len(fake_engine.calling_threads) == 1


# ---- disconnects, overload, failures (their own servers) ---------------------------------------------

def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_pages(stream):
    engine = FakeEngine(step_delay=0.01)
    with ThreadedServer(build_app(engine, MODEL)) as running, httpx.Client(base_url=running.base_url) as http:
        body = {"prompt": "long one", "max_tokens": 100, "temperature": 0, "stream": stream}
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        break
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body, timeout=0.2)
        assert wait_for(lambda: metrics_of(http)["lserve:kv_cache_usage_perc"] == 0.0
                        and metrics_of(http)["lserve:num_requests_running"] == 0)
        samples = metrics_of(http)
        assert samples["lserve:generation_tokens_total"] < 100
        assert samples['lserve:request_success_total{model_name="fake",finished_reason="abort"}'] == 1


def test_metrics_count_tokens(server, http):
    before = metrics_of(http)
    http.post("/v1/completions", json={"prompt": "count", "max_tokens": 5, "temperature": 0})
    after = metrics_of(http)
    assert after["lserve:generation_tokens_total"] - before["lserve:generation_tokens_total"] == 5
    assert after["lserve:prompt_tokens_total"] - before["lserve:prompt_tokens_total"] == 6
    assert after["lserve:time_to_first_token_seconds_count"] == before["lserve:time_to_first_token_seconds_count"] + 1
    assert after["lserve:time_per_output_token_seconds_count"] >= before["lserve:time_per_output_token_seconds_count"]


def test_overload_and_shutdown_give_503():
    engine = FakeEngine(step_delay=0.01)
    app = build_app(engine, MODEL, max_pending_requests=1)
    with ThreadedServer(app) as running, httpx.Client(base_url=running.base_url, timeout=10) as http:
        body = {"prompt": "busy", "max_tokens": 100, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503, match="overloaded")
        assert wait_for(lambda: app.state.engine_loop.num_pending == 0)
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        app.state.engine_loop.begin_shutdown()
        assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503, match="shutting down")


def test_engine_failure_gives_503_and_unhealthy():
    engine = FakeEngine(step_delay=0.005)
    with ThreadedServer(build_app(engine, MODEL)) as running, \
            httpx.Client(base_url=running.base_url, timeout=10) as http:
        engine.fail_next_step = RuntimeError("device lost")
        assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 50}), 503, match="device lost")
        assert_error(http.get("/health"), 503)
        assert_error(http.post("/v1/completions", json={"prompt": "x", "stream": True}), 503, match="device lost")
