"""A KV pool too small for all requests at once still finishes every request, correctly,
through recompute preemption; pages all come back afterwards."""
from __future__ import annotations

import numpy as np
import pytest

from lserve_testing import assert_exact
from tiny_models import make_tiny_model

pytest.importorskip("torch")
from lserve import Engine, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_preempt")
    make_tiny_model("llama", directory, seed=3)
    return directory


def test_small_pool_preempts_and_finishes(llama_dir):
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 211, size=n)] for n in (40, 7, 25, 60, 13, 33, 50, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = Engine(str(llama_dir), max_model_len=128, num_kv_pages=512, page_size=8, show_progress=False)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    assert roomy.stats().num_preemptions == 0

    # 16 pages of 8 tokens = 128 tokens: exactly max_model_len, far below the ~400 needed at once.
    tight = Engine(str(llama_dir), max_model_len=128, num_kv_pages=16, page_size=8, max_num_batched_tokens=32,
                   show_progress=False)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    stats = tight.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be too small"
    for index, (out, ref) in enumerate(zip(outputs, expected)):
        assert out.outputs[0].finish_reason == "length"
        assert_exact(out.outputs[0].token_ids, ref, what=f"prompt {index} under preemption")
    assert stats.num_free_pages == stats.num_total_pages
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_kv_cache_smaller_than_max_model_len_is_rejected(llama_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(str(llama_dir), max_model_len=128, num_kv_pages=4, page_size=8, show_progress=False)
