"""CPU: LServe sparse attention vs dense on SmolLM2-135M-Instruct at a long context, same run.

One request of --context prompt tokens: prefill seconds (one chunked prefill of the whole prompt),
then decode tokens/s over --decode-steps steps (batch 1, greedy, ignore_eos), for "dense" and for
"lserve" with the shipped head pattern and a scaled config (prefill local window and decode budget
from the flags, so sparsity bites at this length). Also reports the streaming-head KV bytes held
and the dense-head pages the first decode step read. Writes JSON (--output), prints a table.
Usage: python benchmarks/bench_cpu_sparse.py [--gguf PATH] [--context 4096] [--output results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def run(path: str, sparsity, context: int, decode_steps: int) -> dict:
    from lserve import Engine
    from lserve.bench.latency import time_request

    engine = Engine(path, max_model_len=context + decode_steps + 8, max_num_batched_tokens=2048,
                    show_progress=False, sparsity=sparsity)
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 49000, size=context)]
    first_step = []
    prefill, steps, decode = time_request(engine, prompt, decode_steps,
                                          on_first_decode_step=lambda e: first_step.append(e._core.stats()))
    stats = first_step[0]
    return {"prefill_s": prefill, "prefill_tok_per_s": context / prefill, "decode_tok_per_s": steps / decode,
            "decode_steps": steps, "streaming_kv_bytes_in_use": int(stats.streaming_kv_bytes_in_use),
            "first_decode_step_pages_selected": int(stats.last_step_pages_selected),
            "first_decode_step_pages_total": int(stats.last_step_pages_total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: resolve smollm2-135m-instruct)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prefill-local", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    from lserve.models import resolve_model
    from lserve.sparsity import SparsityConfig

    path = args.gguf or str(resolve_model("smollm2-135m-instruct").path)
    sparse = SparsityConfig.preset("lserve", model=path, prefill_local_tokens=args.prefill_local,
                                   decode_token_budget=args.budget)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
              "context": args.context, "prefill_local_tokens": args.prefill_local, "decode_token_budget": args.budget,
              "dense": run(path, None, args.context, args.decode_steps),
              "lserve": run(path, sparse, args.context, args.decode_steps)}
    print(f"{'metric':<26}{'dense':>12}{'lserve':>12}{'ratio':>8}")
    for key in ("prefill_s", "prefill_tok_per_s", "decode_tok_per_s"):
        dense, ours = report["dense"][key], report["lserve"][key]
        print(f"{key:<26}{dense:>12.2f}{ours:>12.2f}{ours / dense:>8.2f}")
    ours = report["lserve"]
    print(f"lserve: streaming-head KV in use {ours['streaming_kv_bytes_in_use'] / 2**20:.1f} MiB; the first decode "
          f"step read {ours['first_decode_step_pages_selected']} of {ours['first_decode_step_pages_total']} dense-head pages")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
