"""Prometheus exposition: cumulative buckets, +Inf, sum/count, label escaping, gauges from stats."""
from __future__ import annotations

from types import SimpleNamespace

from lserve.server.metrics import Histogram, ServerMetrics, escape_label_value, parse_metrics


def test_histogram_buckets_are_cumulative():
    histogram = Histogram([0.1, 1.0, 10.0])
    for value in (0.05, 0.1, 0.5, 20.0):
        histogram.observe(value)
    lines = histogram.render("h", [("m", "x")])
    assert lines == ['h_bucket{m="x",le="0.1"} 2', 'h_bucket{m="x",le="1.0"} 3', 'h_bucket{m="x",le="10.0"} 3',
                     'h_bucket{m="x",le="+Inf"} 4', 'h_sum{m="x"} 20.65', 'h_count{m="x"} 4']


def test_label_escaping():
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_render_names_and_values():
    metrics = ServerMetrics('m"1')
    metrics.record_first_token(0.2, num_prompt_tokens=7)
    metrics.record_tokens(1, None)
    metrics.record_tokens(2, 0.05)
    metrics.record_finished("length", 1.5)
    stats = SimpleNamespace(num_running=3, num_waiting=2, num_total_pages=100, num_free_pages=75, num_preemptions=4)
    text = metrics.render(stats)
    assert text.endswith("\n")
    samples = parse_metrics(text)
    label = '{model_name="m\\"1"}'
    assert samples["lserve:num_requests_running" + label] == 3
    assert samples["lserve:num_requests_waiting" + label] == 2
    assert samples["lserve:kv_cache_usage_perc" + label] == 0.25
    assert samples["lserve:num_preemptions_total" + label] == 4
    assert samples["lserve:prompt_tokens_total" + label] == 7
    assert samples["lserve:generation_tokens_total" + label] == 3
    assert samples["lserve:time_to_first_token_seconds_count" + label] == 1
    assert samples["lserve:time_per_output_token_seconds_sum" + label] == 0.05
    assert samples['lserve:request_success_total{model_name="m\\"1",finished_reason="length"}'] == 1
    for family in ("num_requests_running gauge", "kv_cache_usage_perc gauge", "prompt_tokens_total counter",
                   "time_to_first_token_seconds histogram", "time_per_output_token_seconds histogram"):
        assert f"# TYPE lserve:{family}\n" in text


def test_render_before_first_stats():
    text = ServerMetrics("m").render(None)
    assert "lserve:num_requests_running" not in text and "lserve:prompt_tokens_total" in text


def test_sparse_attention_figures_only_when_sparsity_is_on():
    dense = SimpleNamespace(num_running=1, num_waiting=0, num_total_pages=10, num_free_pages=5, num_preemptions=0,
                            num_stream_slots=0)
    assert "sparse_pages_selected" not in ServerMetrics("m").render(dense)
    sparse = SimpleNamespace(num_running=1, num_waiting=0, num_total_pages=10, num_free_pages=5, num_preemptions=0,
                             num_stream_slots=4, last_step_pages_selected=120, last_step_pages_total=480,
                             streaming_kv_bytes=1 << 20, streaming_kv_bytes_in_use=1 << 18)
    samples = parse_metrics(ServerMetrics("m").render(sparse))
    label = '{model_name="m"}'
    assert samples["lserve:sparse_pages_selected" + label] == 120
    assert samples["lserve:sparse_pages_total" + label] == 480
    assert samples["lserve:streaming_kv_bytes" + label] == 1 << 20
    assert samples["lserve:streaming_kv_bytes_in_use" + label] == 1 << 18


def test_kv_cache_usage_counts_every_tier_in_bytes():
    """With sparse attention the usage covers dense pages and streaming slots/rings, by bytes: free
    dense pages do not make a server whose streaming slots are all taken look empty."""
    stats = SimpleNamespace(num_running=2, num_waiting=5, num_total_pages=100, num_free_pages=90, num_preemptions=0,
                            kv_cache_bytes=1000, kv_cache_bytes_in_use=600)
    samples = parse_metrics(ServerMetrics("m").render(stats))
    assert samples['lserve:kv_cache_usage_perc{model_name="m"}'] == 0.6
