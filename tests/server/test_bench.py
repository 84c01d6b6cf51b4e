"""`lserve bench serve` against a fake-engine server: report layout, JSON fields, exact token counts."""
from __future__ import annotations

import json

import pytest

from fake_engine import FakeEngine
from lserve.bench.serve import _percentile, sample_prefix_prompts, sample_prompts
from lserve.cli import build_parser
from lserve.server.app import build_app
from server_utils import ThreadedServer


def test_prompts_are_seeded_and_within_range():
    first = sample_prompts(20, 40, 8, 0.25, seed=3)
    assert first == sample_prompts(20, 40, 8, 0.25, seed=3)
    assert first != sample_prompts(20, 40, 8, 0.25, seed=4)
    assert all(30 <= len(text.split()) == words <= 50 and 6 <= outputs <= 10 for text, words, outputs in first)


def test_prefix_prompts_share_their_prefixes():
    prompts = sample_prefix_prompts(8, 50, 3, 10, 4, 0.0, seed=1)
    assert prompts == sample_prefix_prompts(8, 50, 3, 10, 4, 0.0, seed=1)
    heads = [" ".join(text.split()[:50]) for text, _, _ in prompts]
    assert len(set(heads)) == 3 and heads[0] == heads[3] == heads[6] and heads[0] != heads[1]
    assert all(len(text.split()) == words == 60 for text, words, _ in prompts)
    assert len({" ".join(text.split()[50:]) for text, _, _ in prompts}) == 8
    with pytest.raises(ValueError, match="prefix-len"):
        sample_prefix_prompts(2, 0, 1, 10, 4, 0.0, seed=1)


def test_percentile_interpolates():
    assert _percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert _percentile([5.0], 99) == 5.0
    assert _percentile(list(range(101)), 99) == 99.0


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_serve(tmp_path, capsys, endpoint):
    with ThreadedServer(build_app(FakeEngine(step_delay=0.002, max_model_len=1024), "fake")) as server:
        output_json = tmp_path / "result.json"
        args = build_parser().parse_args([
            "bench", "serve", "--base-url", server.base_url, "--endpoint", endpoint, "--num-prompts", "12",
            "--max-concurrency", "4", "--random-input-len", "20", "--random-output-len", "6",
            "--random-range-ratio", "0.5", "--metric-percentiles", "50,99", "--output-json", str(output_json),
            "--disable-tqdm"])
        assert args.handler(args) == 0
    report = capsys.readouterr().out
    for line in ("============ Serving Benchmark Result ============", "Successful requests:                     12",
                 "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):", "P50 E2EL (ms):",
                 "-----Time per Output Token (excl. 1st token)------", "Output token throughput (tok/s):"):
        assert line in report, report
    result = json.loads(output_json.read_text())
    assert result["completed"] == 12 and result["model_id"] == "fake" and not any(result["errors"])
    assert result["total_output_tokens"] == sum(result["output_lens"])
    assert all(3 <= n <= 9 for n in result["output_lens"])
    assert all(n > 0 for n in result["input_lens"])
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "p50_e2el_ms", "request_throughput"):
        assert result[key] > 0, key


def test_bench_serve_without_a_server_is_a_clear_error():
    import socket

    from lserve.bench.serve import main

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = build_parser().parse_args(["bench", "serve", "--port", str(port), "--num-prompts", "2", "--disable-tqdm"])
    with pytest.raises(ValueError, match="no server answers"):
        main(args)
