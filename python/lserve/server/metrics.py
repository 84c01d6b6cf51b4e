"""Server metrics in the Prometheus text exposition format (version 0.0.4), vLLM's names under `lserve:`.

ServerMetrics is written by the engine thread (token timings, counts) and read by /metrics on the
event loop, so every access holds one lock. Gauges (running, waiting, KV-cache usage) come from the
engine's stats() snapshot at render time. The format is small enough to write here rather than
depend on prometheus_client: https://prometheus.io/docs/instrumenting/exposition_formats/
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds in seconds; vLLM's for the same metrics, which span CPU and GPU latencies.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

Labels = Sequence[Tuple[str, str]]


def escape_label_value(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels) + "}"


class Histogram:
    """Cumulative-bucket histogram: counts[i] observations <= bounds[i], plus sum and count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.bucket_counts = [0] * len(self.bounds)  # non-cumulative; cumulated when rendered
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        if index < len(self.bounds):
            self.bucket_counts[index] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: Labels) -> List[str]:
        lines = []
        cumulative = 0
        for bound, count in zip(self.bounds, self.bucket_counts):
            cumulative += count
            lines.append(f"{name}_bucket{format_labels([*labels, ('le', format_value(bound))])} {cumulative}")
        lines.append(f"{name}_bucket{format_labels([*labels, ('le', '+Inf')])} {self.count}")
        lines.append(f"{name}_sum{format_labels(labels)} {format_value(self.sum)}")
        lines.append(f"{name}_count{format_labels(labels)} {self.count}")
        return lines


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> List[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class ServerMetrics:
    """Counters and histograms of one server. Thread-safe: record_* on the engine thread, render anywhere.

    Example:
        >>> metrics = ServerMetrics("smollm2")
        >>> metrics.record_first_token(0.12, num_prompt_tokens=7)
        >>> "lserve:time_to_first_token_seconds_count" in metrics.render(None)
        True
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.request_success_total: Dict[str, int] = {}

    def record_first_token(self, ttft_s: float, num_prompt_tokens: int) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)
            self.prompt_tokens_total += num_prompt_tokens

    def record_tokens(self, num_tokens: int, time_per_token_s: Optional[float]) -> None:
        """num_tokens new tokens; time_per_token_s is None for the step that produced the first token."""
        with self._lock:
            self.generation_tokens_total += num_tokens
            if time_per_token_s is not None:
                self.tpot.observe(time_per_token_s)

    def record_finished(self, finish_reason: Optional[str], e2e_s: float) -> None:
        with self._lock:
            self.e2e.observe(e2e_s)
            reason = finish_reason or "unknown"
            self.request_success_total[reason] = self.request_success_total.get(reason, 0) + 1

    def render(self, stats) -> str:
        """The exposition text; stats is the engine's stats() snapshot (or None before the first)."""
        labels = [("model_name", self.model_name)]
        sample = format_labels(labels)
        lines: List[str] = []
        if stats is not None:
            # Bytes of every KV tier (dense pages, streaming slots and prefill rings) when the engine
            # reports them; pages otherwise.
            total_bytes = int(getattr(stats, "kv_cache_bytes", 0) or 0)
            total = max(int(stats.num_total_pages), 0)
            if total_bytes > 0:
                usage = int(stats.kv_cache_bytes_in_use) / total_bytes
            else:
                usage = 0.0 if total == 0 else 1.0 - int(stats.num_free_pages) / total
            lines += _family("lserve:num_requests_running", "gauge", "Number of requests in the running batch.",
                             [f"lserve:num_requests_running{sample} {format_value(stats.num_running)}"])
            lines += _family("lserve:num_requests_waiting", "gauge", "Number of requests waiting to be scheduled.",
                             [f"lserve:num_requests_waiting{sample} {format_value(stats.num_waiting)}"])
            lines += _family("lserve:kv_cache_usage_perc", "gauge", "KV-cache usage; 1 means 100 percent.",
                             [f"lserve:kv_cache_usage_perc{sample} {format_value(usage)}"])
            lines += _family("lserve:num_preemptions_total", "counter", "Cumulative number of preemptions.",
                             [f"lserve:num_preemptions_total{sample} {format_value(stats.num_preemptions)}"])
            if getattr(stats, "prefix_caching", False):
                lines += _family("lserve:prefix_cache_queries_total", "counter",
                                 "Prompt tokens looked up in the prefix cache at admission.",
                                 [f"lserve:prefix_cache_queries_total{sample} "
                                  f"{format_value(stats.prefix_cache_queries)}"])
                lines += _family("lserve:prefix_cache_hits_total", "counter",
                                 "Prompt tokens found in the prefix cache (not computed again).",
                                 [f"lserve:prefix_cache_hits_total{sample} {format_value(stats.prefix_cache_hits)}"])
                lines += _family("lserve:prefix_cache_pages", "gauge",
                                 "KV pages named in the prefix cache (in use or evictable; evictable pages count "
                                 "as free in kv_cache_usage_perc).",
                                 [f"lserve:prefix_cache_pages{sample} {format_value(stats.num_cached_pages)}"])
            if getattr(stats, "num_stream_slots", 0):  # sparse attention (LServe) is on
                lines += _family("lserve:sparse_pages_selected", "gauge",
                                 "KV pages the dense heads read in the last step (sum over layers and heads).",
                                 [f"lserve:sparse_pages_selected{sample} "
                                  f"{format_value(stats.last_step_pages_selected)}"])
                lines += _family("lserve:sparse_pages_total", "gauge",
                                 "KV pages dense attention would have read in the last step.",
                                 [f"lserve:sparse_pages_total{sample} {format_value(stats.last_step_pages_total)}"])
                lines += _family("lserve:streaming_kv_bytes", "gauge",
                                 "Bytes of the streaming heads' KV cache (constant per running sequence).",
                                 [f"lserve:streaming_kv_bytes{sample} {format_value(stats.streaming_kv_bytes)}"])
                lines += _family("lserve:streaming_kv_bytes_in_use", "gauge",
                                 "Streaming-head KV bytes held by running sequences.",
                                 [f"lserve:streaming_kv_bytes_in_use{sample} "
                                  f"{format_value(stats.streaming_kv_bytes_in_use)}"])
        with self._lock:
            lines += _family("lserve:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
                             [f"lserve:prompt_tokens_total{sample} {format_value(self.prompt_tokens_total)}"])
            lines += _family("lserve:generation_tokens_total", "counter", "Number of generation tokens processed.",
                             [f"lserve:generation_tokens_total{sample} {format_value(self.generation_tokens_total)}"])
            lines += _family("lserve:request_success_total", "counter", "Count of finished requests by reason.",
                             [f"lserve:request_success_total{format_labels([*labels, ('finished_reason', reason)])} "
                              f"{format_value(count)}"
                              for reason, count in sorted(self.request_success_total.items())])
            lines += _family("lserve:time_to_first_token_seconds", "histogram",
                             "Histogram of time to first token in seconds.",
                             self.ttft.render("lserve:time_to_first_token_seconds", labels))
            lines += _family("lserve:time_per_output_token_seconds", "histogram",
                             "Histogram of time per output token in seconds.",
                             self.tpot.render("lserve:time_per_output_token_seconds", labels))
            lines += _family("lserve:e2e_request_latency_seconds", "histogram",
                             "Histogram of end to end request latency in seconds.",
                             self.e2e.render("lserve:e2e_request_latency_seconds", labels))
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> Dict[str, float]:
    """Sample lines of an exposition text as {"name{labels}": value}, and {"name": value} for each
    sample too (the last one wins when several share a name). For tests and the benchmark."""
    samples: Dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
        samples[key.split("{", 1)[0]] = float(value)
    return samples
