"""CPU attention op throughput for long prompts, next to the machine's fp32 FMA peak.

One sequence prefilled in chunks of --chunk query rows (the engine's token budget) over its own
paged float32 (or bfloat16) cache, SmolLM2-135M's shape by default (9 query / 3 KV heads,
head_dim 64, 16-token pages). FLOPs count only causally visible (query, key) pairs:
4 * head_dim per pair and query head (Q.K and P.V, one multiply-add = 2 FLOPs).
The FMA peak runs a C loop of independent ymm FMA chains on every core (compiled here with
explicit -mavx2 -mfma, never -march=native; -O3 keeps the ten chains in registers, -O2 left them
in memory and measured a third of the rate); it needs a C compiler, else it is skipped.
--e2e GGUF times the engine's whole prefill instead (tokens/s, --chunk = max_num_batched_tokens).
Usage: PYTHONPATH=python python benchmarks/bench_cpu_attention.py [--lengths 512 2048 4096 8000]
       [--so /tmp/attn_before/_C.cpython-311-x86_64-linux-gnu.so] [--e2e model.gguf] [--output results.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

PAGE = 16

_FMA_PEAK_C = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static long iters;
static void* work(void* arg) {
  __m256 a[10]; const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < 10; ++i) a[i] = _mm256_set1_ps((float)i);
  for (long it = 0; it < iters; ++it)
    for (int i = 0; i < 10; ++i) a[i] = _mm256_fmadd_ps(a[i], x, y);
  float sink = 0; for (int i = 0; i < 10; ++i) sink += a[i][0];
  *(float*)arg = sink; return NULL;
}
int main(int argc, char** argv) {
  int threads = atoi(argv[1]); iters = atol(argv[2]);
  pthread_t t[256]; float sinks[256]; struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < threads; ++i) pthread_create(&t[i], NULL, work, &sinks[i]);
  for (int i = 0; i < threads; ++i) pthread_join(t[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  printf("%f\n", threads * (double)iters * 10 * 8 * 2 / s / 1e9);
  return 0;
}
"""


def fma_peak_gflops(threads: int) -> float | None:
    """Best of 3 runs of 10 independent 8-lane FMA chains per thread (GFLOP/s), or None without cc."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "fma.c"), os.path.join(tmp, "fma")
        with open(src, "w") as f:
            f.write(_FMA_PEAK_C)
        try:
            subprocess.run(["cc", "-O3", "-mavx2", "-mfma", "-pthread", src, "-o", exe], check=True,
                           capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        runs = [float(subprocess.run([exe, str(threads), "200000000"], check=True, capture_output=True,
                                     text=True).stdout) for _ in range(3)]
        return max(runs)


def load_module(so_path: str | None):
    if so_path is None:
        from lserve import _C
        return _C
    spec = importlib.util.spec_from_file_location("_C", so_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_prefill(backend, length: int, chunk: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                  cache_dtype: torch.dtype, repeats: int, seed: int = 0) -> dict:
    """Times every chunk of one sequence's prefill over its cache (the keys already in place)."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = math.ceil(length / PAGE)
    shape = (num_pages, PAGE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    query = torch.randn(length, num_qo_heads, head_dim, generator=gen)
    output = torch.empty_like(query)
    page_indices = torch.randperm(num_pages, generator=gen).to(torch.int32)
    chunks = [(start, min(length, start + chunk)) for start in range(0, length, chunk)]
    best = math.inf
    for _ in range(repeats):
        elapsed = 0.0
        for start, end in chunks:
            kv_len = end
            pages = math.ceil(kv_len / PAGE)
            args = (query[start:end], k_cache, v_cache, torch.tensor([0, end - start], dtype=torch.int32),
                    torch.tensor([0, pages], dtype=torch.int32), page_indices[:pages].clone(),
                    torch.tensor([kv_len], dtype=torch.int32), output[start:end], 1.0 / math.sqrt(head_dim))
            t0 = time.perf_counter()
            backend.attention(*args)
            elapsed += time.perf_counter() - t0
        best = min(best, elapsed)
    pairs = length * (length + 1) // 2
    flops = 4.0 * head_dim * num_qo_heads * pairs
    return {"length": length, "seconds": best, "gflops": flops / best / 1e9,
            "ns_per_pair_head": best / (pairs * num_qo_heads) * 1e9}


def bench_engine_prefill(gguf: str, lengths, chunk: int, repeats: int) -> dict:
    """End-to-end prefill tokens/s of one request per length (greedy, one output token)."""
    from lserve import Engine, SamplingParams

    engine = Engine(gguf, max_model_len=max(lengths) + 16, max_num_batched_tokens=chunk, show_progress=False)
    engine.add_request(None, list(range(100, 164)), SamplingParams(temperature=0.0, max_tokens=1))  # warm-up
    while engine.has_unfinished_requests():
        engine.step()
    results = {}
    for length in lengths:
        best = math.inf
        for rep in range(repeats):
            prompt = [int(t) for t in np.random.default_rng(rep).integers(100, 49000, size=length)]
            engine.add_request(None, prompt, SamplingParams(temperature=0.0, max_tokens=1))
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            best = min(best, time.perf_counter() - start)
        results[length] = length / best
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8000])
    parser.add_argument("--chunk", type=int, default=2048, help="query rows per call (the engine's token budget)")
    parser.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("QO", "KV"))
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--so", help="path of a _C module to time instead of lserve's")
    parser.add_argument("--no-peak", action="store_true")
    parser.add_argument("--e2e", metavar="GGUF", help="time end-to-end engine prefill of this model instead")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.e2e:
        rates = bench_engine_prefill(args.e2e, args.lengths, args.chunk, args.repeats)
        print(f"engine prefill, chunk {args.chunk}, load {os.getloadavg()[0]:.2f}: "
              + "  ".join(f"{length}: {rate:.1f} tok/s" for length, rate in rates.items()))
        if args.output:
            with open(args.output, "w") as f:
                json.dump({"prefill_tok_per_s": rates, "loadavg": os.getloadavg()}, f, indent=1)
        return

    module = load_module(args.so)
    backend = module.Backend("cpu", args.threads)
    cache_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.cache_dtype]
    peak = None if args.no_peak else fma_peak_gflops(args.threads)
    rows = [bench_prefill(backend, length, args.chunk, args.heads[0], args.heads[1], args.head_dim, cache_dtype,
                          args.repeats) for length in args.lengths]
    result = {"backend": backend.name, "so": args.so or "lserve._C", "cache_dtype": args.cache_dtype,
              "chunk": args.chunk, "heads": args.heads, "head_dim": args.head_dim,
              "fma_peak_gflops": peak, "loadavg": os.getloadavg(), "rows": rows}
    print(f"{result['backend']}  {args.cache_dtype}  chunk {args.chunk}  load {os.getloadavg()[0]:.2f}"
          + (f"  fp32 FMA peak {peak:.1f} GFLOP/s" if peak else ""))
    for row in rows:
        share = f"  {100 * row['gflops'] / peak:5.1f}% of peak" if peak else ""
        print(f"  {row['length']:6d} tokens  {row['seconds'] * 1e3:9.1f} ms  {row['gflops']:6.1f} GFLOP/s  "
              f"{row['ns_per_pair_head']:.3f} ns/(pair*head){share}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
