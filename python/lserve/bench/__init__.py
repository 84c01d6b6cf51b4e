"""`lserve bench ...`: benchmarks. `lserve bench serve` load-tests a running server (bench/serve.py);
`lserve bench latency` times one request's TTFT and decode steps against transformers (bench/latency.py);
`lserve bench kernels` times the CUDA attention and GEMM ops against torch (bench/kernels.py).

Importing this package stays light; each benchmark imports its dependencies when it runs.
"""
from __future__ import annotations

import argparse


def add_bench_parser(commands) -> argparse.ArgumentParser:
    """Registers `bench` and its benchmarks on the CLI's subparsers."""
    parser = commands.add_parser("bench", help="benchmarks", description="lserve benchmarks.")
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    benches.required = True
    serve = benches.add_parser("serve", help="load-test a running OpenAI-compatible server",
                               description="Concurrent streaming clients against a running server: TTFT, TPOT, "
                                           "ITL, end-to-end latency and throughput.")
    from lserve.bench import serve as serve_bench

    serve_bench.add_arguments(serve)
    serve.set_defaults(handler=serve_bench.main)
    latency = benches.add_parser("latency", help="TTFT and per-token latency vs transformers (random weights)",
                                 description="Time to first token and per-token decode latency of one request "
                                             "at several context lengths, lserve vs Hugging Face transformers "
                                             "(sdpa) on the same GPU, random weights of a model shape.")
    from lserve.bench import latency as latency_bench

    latency_bench.add_arguments(latency)
    latency.set_defaults(handler=latency_bench.main)
    kernels = benches.add_parser("kernels", help="CUDA attention and GEMM ops vs torch SDPA / matmul",
                                 description="lserve's CUDA prefill and decode attention and GEMMs against torch's "
                                             "SDPA (cuDNN, flash) and F.linear on Llama-3-8B shapes.")
    from lserve.bench import kernels as kernels_bench

    kernels_bench.add_arguments(kernels)
    kernels.set_defaults(handler=kernels_bench.main)
    return parser
