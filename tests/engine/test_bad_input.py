"""Bad input gets a clear ValueError and the engine goes on serving other requests."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_models import make_tiny_model

pytest.importorskip("torch")
from lserve import Engine, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_bad")
    make_tiny_model("llama", directory, seed=5)
    return directory


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(str(model_dir), max_model_len=64, num_kv_pages=64, page_size=8, show_progress=False)


def test_unknown_model_path(tmp_path):
    with pytest.raises(ValueError, match="not found|does not exist|no such"):
        Engine(str(tmp_path / "nope"), show_progress=False)


def test_unsupported_architecture(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        Engine(str(tmp_path), show_progress=False)


def test_truncated_safetensors(model_dir, tmp_path):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    data = (model_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        Engine(str(tmp_path), show_progress=False)


def test_missing_tensor_named(model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Engine(str(tmp_path), show_progress=False)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-5), "top_k"), (dict(min_p=2.0), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(n=0), "n"), (dict(logprobs=-2), "logprobs"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt, pattern", [
    ([], "empty"), (list(range(3, 70)), "has 67 tokens, but max_model_len is 64"),
    ([5, 999999], r"token 1 has id 999999, outside the vocabulary \[0, "), ([5, -1], "token 1 has id -1, outside"),
])
def test_bad_prompts_then_engine_still_serves(engine, prompt, pattern):
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match=pattern):
        engine.generate([[4, 5, 6], prompt], params, use_tqdm=False)
    # nothing was half-queued, and the engine still works
    assert not engine.has_unfinished_requests()
    out = engine.generate([[4, 5, 6]], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_total_pages


def test_abort_frees_pages_and_spares_others(engine):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = engine.generate([[7, 8, 9, 10]], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("victim", [11, 12, 13], params)
    engine.add_request("keeper", [7, 8, 9, 10], params)
    engine.step()
    assert engine.abort_request("victim")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["victim"].outputs[0].finish_reason == "abort"
    assert finished["keeper"].outputs[0].token_ids == alone
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_total_pages


def test_stop_strings_need_tokenizer_free_path(engine):
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate("text prompt", SamplingParams(max_tokens=2), use_tqdm=False)


def test_bad_engine_args(model_dir):
    for kwargs, field in ((dict(max_num_seqs=0), "max_num_seqs"), (dict(dtype="int8"), "dtype"),
                          (dict(load_format="pt"), "load_format"), (dict(max_model_len=100000), "max_model_len"),
                          (dict(device="tpu"), "device"), (dict(kv_cache_memory=-1), "kv_cache_memory")):
        with pytest.raises(ValueError, match=field):
            Engine(str(model_dir), show_progress=False, **kwargs)


def test_nan_logits_abort_only_their_request(model_dir, tmp_path):
    """A request whose logits turn NaN (here: its prompt holds a token whose embedding row is NaN)
    ends with finish_reason "abort" and the sampler's error; the request batched with it gets
    exactly the tokens it gets alone, and the engine frees every page and goes on serving."""
    from safetensors.numpy import load_file, save_file

    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).exists():
            (tmp_path / name).write_text((model_dir / name).read_text())
    weights = {}
    for path in model_dir.glob("*.safetensors"):
        weights.update(load_file(str(path)))
    poisoned = 7
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].copy()
    weights["model.embed_tokens.weight"][poisoned] = np.nan
    save_file(weights, str(tmp_path / "model.safetensors"))

    def make():
        return Engine(str(tmp_path), max_model_len=64, num_kv_pages=64, page_size=8, show_progress=False)

    bad, good = [5, 9, poisoned, 11], [5, 9, 12, 13, 20]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = make().generate([good], params)[0].outputs[0]
    engine = make()
    bad_out, good_out = (out.outputs[0] for out in engine.generate([bad, good], params))
    assert bad_out.finish_reason == "abort" and "NaN" in (bad_out.error or ""), (bad_out.finish_reason, bad_out.error)
    assert bad_out.token_ids == []
    assert good_out.token_ids == alone.token_ids and good_out.finish_reason == alone.finish_reason
    assert good_out.error is None
    stats = engine._core.stats()
    assert stats.num_running == 0 and stats.num_free_pages == stats.num_total_pages
    assert engine.generate([good], params)[0].outputs[0].token_ids == alone.token_ids


# ---- values the C++ core cannot hold (issue 13): a ValueError naming the field, never an overflow ----------

INT32_OVERFLOW = 2**31


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=INT32_OVERFLOW), "top_k"), (dict(top_k=2**64), "top_k"),
    (dict(stop_token_ids=[5, INT32_OVERFLOW]), "stop_token_ids"), (dict(stop_token_ids=[2**70]), "stop_token_ids"),
    (dict(max_tokens=INT32_OVERFLOW), "max_tokens"), (dict(min_tokens=INT32_OVERFLOW), "min_tokens"),
    (dict(n=INT32_OVERFLOW), "n"), (dict(logprobs=INT32_OVERFLOW), "logprobs"),
    (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"),
    (dict(temperature=1e39), "temperature"), (dict(repetition_penalty=1e-50), "repetition_penalty"),
    (dict(top_p=1e-50), "top_p"), (dict(stop=["ok", "\ud800"]), "stop"),
])
def test_out_of_range_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_largest_values_are_accepted():
    params = SamplingParams(top_k=2**31 - 1, stop_token_ids=[2**31 - 1], seed=2**63 - 1, max_tokens=2**31 - 1,
                            temperature=3e38, repetition_penalty=1e-40)
    assert params.to_core(max_tokens=8, seed=params.seed).top_k == 2**31 - 1


@pytest.mark.parametrize("field, value", [("top_k", INT32_OVERFLOW), ("stop_token_ids", [INT32_OVERFLOW]),
                                          ("logprobs", INT32_OVERFLOW)])
def test_generate_with_params_changed_after_validation(engine, field, value):
    """SamplingParams is a plain dataclass: a field set after __post_init__ reaches the bindings, which
    refuse it by name (ValueError) instead of pybind11's TypeError; the engine goes on serving."""
    params = SamplingParams(temperature=0.0, max_tokens=4)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=field):
        engine.generate([[4, 5, 6]], params, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    out = engine.generate([[4, 5, 6]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=INT32_OVERFLOW), "top_k"), (dict(max_tokens=INT32_OVERFLOW), "max_tokens"),
    (dict(min_tokens=-INT32_OVERFLOW - 1), "min_tokens"), (dict(logprobs=INT32_OVERFLOW), "logprobs"),
    (dict(stop_token_ids=[1, INT32_OVERFLOW]), "stop_token_ids"),
])
def test_core_sampling_params_refuse_int32_overflow(kwargs, field):
    from lserve import _C

    with pytest.raises(ValueError, match=field):
        _C.SamplingParams(**kwargs)


def test_prompt_ids_beyond_int32_are_refused_by_name(engine):
    """The core's binding names the token and its value (ids within int32 get the core's vocabulary check)."""
    with pytest.raises(ValueError, match=rf"prompt_token_ids\[1\].*{INT32_OVERFLOW}"):
        engine.generate([[4, INT32_OVERFLOW]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=rf"prompt_token_ids\[1\].*{2**64}"):
        engine.generate([[4, 2**64]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not engine.has_unfinished_requests()
