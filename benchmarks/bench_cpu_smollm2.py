"""CPU throughput of SmolLM2-135M-Instruct: lserve vs Hugging Face transformers in the same run.

Prefill tokens/s at 512 and 2048 prompt tokens (one request, one step); decode tokens/s at batch 1
and 8 (steady-state steps after the prefill). Writes JSON (--output) and prints a table.
Usage: python benchmarks/bench_cpu_smollm2.py [--gguf PATH] [--output results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _prompt(length: int, seed: int, vocab: int = 49152) -> list:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, vocab - 100, size=length)]


def bench_lserve(path: str, prefill_lengths, decode_batches, decode_steps: int, repeats: int) -> dict:
    from lserve import Engine, SamplingParams

    engine = Engine(path, max_model_len=4096, max_num_batched_tokens=4096, show_progress=False)
    results = {}
    for length in prefill_lengths:
        times = []
        for rep in range(repeats):
            engine.add_request(None, _prompt(length, rep), SamplingParams(temperature=0.0, max_tokens=1))
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            times.append(time.perf_counter() - start)
        results[f"prefill_{length}_tok_per_s"] = length / min(times)
    for batch in decode_batches:
        params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True)
        for index in range(batch):
            engine.add_request(None, _prompt(64, 100 + index), params)
        engine.step()  # prefill of all prompts (one step: 64 * batch tokens fit the budget)
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        elapsed = time.perf_counter() - start
        results[f"decode_b{batch}_tok_per_s"] = batch * steps / elapsed
    return results


def bench_transformers(path: str, prefill_lengths, decode_batches, decode_steps: int, repeats: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              torch_dtype=torch.float32).eval()
    results = {}
    with torch.no_grad():
        for length in prefill_lengths:
            times = []
            for rep in range(repeats):
                ids = torch.tensor([_prompt(length, rep)])
                start = time.perf_counter()
                model(ids)
                times.append(time.perf_counter() - start)
            results[f"prefill_{length}_tok_per_s"] = length / min(times)
        for batch in decode_batches:
            ids = torch.tensor([_prompt(64, 100 + index) for index in range(batch)])
            out = model(ids, use_cache=True)
            past = out.past_key_values
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(decode_steps):
                out = model(next_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            elapsed = time.perf_counter() - start
            results[f"decode_b{batch}_tok_per_s"] = batch * decode_steps / elapsed
    return results


def bench_machine() -> dict:
    """The floors: fp32 GEMM GFLOP/s torch reaches on SmolLM2's MLP shape (2048 x 576 x 1536) and
    the memory copy GB/s of a 512 MiB buffer (what bounds decode at small batch)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    src = np.ones(128 << 20, dtype=np.float32)
    dst = np.empty_like(src)
    copy = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        copy = min(copy, time.perf_counter() - start)
    return {"gemm_gflops": 2 * 2048 * 576 * 1536 / best / 1e9, "copy_gb_per_s": 2 * src.nbytes / copy / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: resolve smollm2-135m-instruct)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    path = args.gguf
    if path is None:
        from lserve.models import resolve_model

        path = str(resolve_model("smollm2-135m-instruct").path)
    lengths, batches = (512, 2048), (1, 8)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
        "machine_floors": bench_machine(),
        "lserve": bench_lserve(path, lengths, batches, args.decode_steps, args.repeats),
        "transformers": bench_transformers(path, lengths, batches, args.decode_steps, args.repeats),
    }
    floors = report["machine_floors"]
    print(f"torch fp32 GEMM {floors['gemm_gflops']:.1f} GFLOP/s, memory copy {floors['copy_gb_per_s']:.1f} GB/s")
    print(f"{'metric':<28}{'lserve':>12}{'transformers':>14}{'ratio':>8}")
    for key in report["lserve"]:
        ours, theirs = report["lserve"][key], report["transformers"][key]
        print(f"{key:<28}{ours:>12.1f}{theirs:>14.1f}{ours / theirs:>8.2f}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
