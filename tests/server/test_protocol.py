"""Request models: unknown fields refused, OpenAI defaults, mapping onto SamplingParams."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from lserve.server import protocol as p


def test_unknown_field_is_refused():
    with pytest.raises(ValidationError, match="Extra inputs"):
        p.CompletionRequest(prompt="x", temprature=0.5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], stream_options={"include_usag": True})


def test_completion_defaults_follow_openai():
    request = p.CompletionRequest(prompt="x")
    params = request.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.n, params.logprobs) == (16, 1.0, 1.0, 1, None)


def test_chat_maps_logprobs_and_max_completion_tokens():
    request = p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=3,
                                      max_tokens=9, max_completion_tokens=5, top_k=4, seed=11, stop="\n")
    params = request.to_sampling_params()
    assert (params.logprobs, params.max_tokens, params.top_k, params.seed, params.stop_list) == (3, 5, 4, 11, ["\n"])
    assert p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]).to_sampling_params().logprobs is None


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_prompt_forms(prompt):
    assert p.CompletionRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"n": 0}, "n"),
])
def test_out_of_range_names_the_field(fields, param):
    request = p.CompletionRequest(prompt="x", **fields)
    with pytest.raises(ValueError) as error:
        request.to_sampling_params()
    assert p.sampling_error_param(str(error.value), chat=False) == param


def test_unsupported_options_are_reported():
    assert p.CompletionRequest(prompt="x", logit_bias={"1": 2.0}).unsupported()[0] == "logit_bias"
    assert p.CompletionRequest(prompt="x", suffix="y").unsupported()[0] == "suffix"
    assert p.CompletionRequest(prompt="x", n=2, best_of=3).unsupported()[0] == "best_of"
    assert p.CompletionRequest(prompt="x", stream_options={"include_usage": True}).unsupported()[0] == "stream_options"
    chat = p.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    assert chat.unsupported()[0] == "tools"
    assert p.CompletionRequest(prompt="x", n=2, best_of=2, logit_bias={}).unsupported() is None


def test_message_content_parts_are_joined():
    message = p.ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert message.template_dict() == {"role": "user", "content": "a\nb"}
    with pytest.raises(ValueError, match="image_url"):
        p.ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}]).template_dict()


def test_delta_leaves_out_unset_fields():
    assert p.DeltaMessage().model_dump() == {}
    assert p.DeltaMessage(content="x").model_dump_json() == '{"content":"x"}'
    assert p.clamp_logprob(float("-inf")) == p.LOGPROB_FLOOR
