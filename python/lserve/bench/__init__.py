"""`lserve bench ...`: benchmarks. `lserve bench serve` load-tests a running server (bench/serve.py).

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
    return parser
