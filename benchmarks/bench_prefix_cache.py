"""Prefix caching on the CPU: time to first token of a long prompt cold, then of a request sharing
most of it (issue 14's figure), with SmolLM2-135M-Instruct.

    PYTHONPATH=python python3 benchmarks/bench_prefix_cache.py --prompt-len 4096 --shared-len 3584

Three engines' worth of runs in one process: caching on (cold prompt A, then prompt B = the first
--shared-len tokens of A + new tokens), and caching off (B alone) as the reference. Each TTFT is one
request of max_tokens=1 (prefill plus one sampled token). Prints a JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from lserve import Engine, SamplingParams


def ttft(engine: Engine, prompt: list) -> tuple:
    start = time.perf_counter()
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--shared-len", type=int, default=3584)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    max_model_len = args.prompt_len + 64
    cached = Engine(args.model, max_model_len=max_model_len, show_progress=False)
    plain = Engine(args.model, max_model_len=max_model_len, show_progress=False, enable_prefix_caching=False)
    results = []
    for repeat in range(args.repeats):
        prompt_a = [int(t) for t in rng.integers(100, 40000, size=args.prompt_len)]
        prompt_b = prompt_a[: args.shared_len] + [int(t) for t in rng.integers(100, 40000, size=args.prompt_len - args.shared_len)]
        cold, _ = ttft(cached, prompt_a)
        warm, out = ttft(cached, prompt_b)
        reference, ref_out = ttft(plain, prompt_b)
        results.append({"cold_s": cold, "warm_s": warm, "uncached_b_s": reference,
                        "num_cached_tokens": out.num_cached_tokens,
                        "same_token": out.outputs[0].token_ids == ref_out.outputs[0].token_ids})
        cached.reset_prefix_cache()
    cold = min(r["cold_s"] for r in results)
    warm = min(r["warm_s"] for r in results)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                      "prompt_len": args.prompt_len, "shared_len": args.shared_len, "runs": results,
                      "best_cold_s": cold, "best_warm_s": warm, "speedup": cold / warm}, indent=1))


if __name__ == "__main__":
    main()
