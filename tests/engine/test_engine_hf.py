"""lserve vs Hugging Face transformers on tiny random Llama, Mistral and Qwen2 checkpoints (fp32):
logits within 1e-4 relative (whole prompts and chunked prefill), identical 32-token greedy
continuations, and batched generation equal to one-at-a-time."""
from __future__ import annotations

import numpy as np
import pytest

from lserve_testing import assert_exact, assert_rel_close
from tiny_models import TINY_VARIANTS, make_tiny_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lserve import Engine, SamplingParams  # noqa: E402

PROMPT_LENGTHS = [1, 5, 16, 17, 31, 64, 100]


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = make_tiny_model(request.param, directory, seed=len(request.param))
    return request.param, directory, model


def _prompt(length: int, seed: int, vocab: int = 211) -> list:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, vocab, size=length)]


def _hf_logits(model, ids: list) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _engine(directory, **kwargs) -> Engine:
    defaults = dict(max_model_len=512, show_progress=False, capture_logits=True, num_kv_pages=256, page_size=16)
    defaults.update(kwargs)
    return Engine(str(directory), **defaults)


@pytest.mark.parametrize("chunk", [2048, 7, 16])
def test_prefill_logits_match(tiny, chunk):
    kind, directory, model = tiny
    engine = _engine(directory, max_num_batched_tokens=chunk)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for length in PROMPT_LENGTHS:
        ids = _prompt(length, seed=length)
        engine.add_request(None, ids, params)
        logits = None
        while engine._core.has_unfinished_requests():
            for out in engine._core.step():
                if out.logits is not None:
                    logits = out.logits
        expected = _hf_logits(model, ids)[-1]
        assert_rel_close(logits, expected, 1e-4, what=f"{kind} prompt {length} chunk {chunk}", seed=length)


def test_greedy_matches_transformers(tiny):
    kind, directory, model = tiny
    engine = _engine(directory)
    for length in (3, 17, 40):
        ids = _prompt(length, seed=100 + length)
        out = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32),
                              use_tqdm=False)[0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                 pad_token_id=0)[0, length:].tolist()
        assert_exact(out.outputs[0].token_ids, ref, what=f"{kind} greedy, prompt {length}")
        assert out.outputs[0].finish_reason == "length"


def test_decode_logits_match(tiny):
    kind, directory, model = tiny
    engine = _engine(directory, max_num_batched_tokens=9)
    ids = _prompt(23, seed=7)
    engine.add_request("r", ids, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    rows, tokens = [], []
    while engine._core.has_unfinished_requests():
        for out in engine._core.step():
            if out.logits is not None:
                rows.append(out.logits)
                tokens.extend(out.new_token_ids)
    expected = _hf_logits(model, ids + tokens)[len(ids) - 1:len(ids) - 1 + len(rows)]
    assert_rel_close(np.stack(rows), expected, 1e-4, what=f"{kind} decode logits")


def test_batched_equals_single(tiny):
    kind, directory, model = tiny
    prompts = [_prompt(n, seed=1000 + n) for n in (1, 9, 33, 16, 70, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    single_engine = _engine(directory, capture_logits=False)
    singles = [single_engine.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batched_engine = _engine(directory, capture_logits=False, max_num_batched_tokens=40)
    batched = [o.outputs[0].token_ids for o in batched_engine.generate(prompts, params, use_tqdm=False)]
    for index, (a, b) in enumerate(zip(batched, singles)):
        assert_exact(a, b, what=f"{kind} prompt {index} batched vs single")
