"""`lserve bench serve`: load-test a running OpenAI-compatible server with concurrent streaming clients.

Prompts are seeded random word sequences (common English words, about one token each) whose
lengths follow a uniform distribution around --random-input-len; every request streams with
ignore_eos so it generates exactly --random-output-len tokens, and reads exact token counts from the
final usage chunk. Reports TTFT, TPOT (excluding the first token), ITL and end-to-end latency
(mean, median, std, chosen percentiles) and throughputs, laid out as vLLM's benchmark_serving
prints them; --output-json writes the summary plus per-request figures.

--dataset prefix makes a shared-prefix workload: --num-prefixes long random "documents" of
--prefix-len words, each request one of them (in turn) followed by its own random question of
--random-input-len words, as when several questions are asked of the same documents. The report
adds the prefix-cache hit rate: prompt tokens the server reported cached
(usage.prompt_tokens_details.cached_tokens) over all prompt tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Dict, List, Optional

# Frequent English words: each is one token (with its leading space) in GPT-2-style BPE vocabularies.
WORDS = tuple(dict.fromkeys((
    "the of and to in is was for that on as with by he at from his it an were are which this be or had not "
    "but first one their its new after who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can "
    "state about national out known university united then made also team three could part what film "
    "him well these high being between both second under while four them south early season war under "
    "because since through government until north album people number several main house series local "
    "group each year life west north during public music county river same game work own name those small "
    "long family great home light water place line end good road power state last right large day way "
    "history young did city head side order east level book form much found best show take back make love"
).split()))


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: List[float] = field(default_factory=list)
    cached_tokens: int = 0
    generated_text: str = ""
    error: str = ""


def sample_prompts(num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> List[tuple]:
    """[(prompt_text, target_input_len, output_len)] with lengths uniform in len * [1 - r, 1 + r]."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        num_words = rng.randint(max(1, int(input_len * (1 - range_ratio))), max(1, int(input_len * (1 + range_ratio))))
        num_outputs = rng.randint(max(1, int(output_len * (1 - range_ratio))),
                                  max(1, int(output_len * (1 + range_ratio))))
        prompts.append((" ".join(rng.choice(WORDS) for _ in range(num_words)), num_words, num_outputs))
    return prompts


def sample_prefix_prompts(num_prompts: int, prefix_len: int, num_prefixes: int, input_len: int, output_len: int,
                          range_ratio: float, seed: int) -> List[tuple]:
    """The shared-prefix workload: request i is prefix i % num_prefixes (prefix_len words) followed by
    its own random question (sample_prompts' lengths); [(prompt_text, target_input_len, output_len)]."""
    if prefix_len < 1 or num_prefixes < 1:
        raise ValueError(f"--prefix-len and --num-prefixes must be >= 1, got {prefix_len} and {num_prefixes}")
    rng = random.Random(seed + 7)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(prefix_len)) for _ in range(num_prefixes)]
    questions = sample_prompts(num_prompts, input_len, output_len, range_ratio, seed)
    return [(prefixes[index % num_prefixes] + " " + text, prefix_len + words, outputs)
            for index, (text, words, outputs) in enumerate(questions)]


def _payload(args: argparse.Namespace, model: str, prompt: str, output_len: int) -> dict:
    payload = {"model": model, "max_tokens": output_len, "temperature": args.temperature, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    if args.endpoint.endswith("chat/completions"):
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    return payload


def _delta_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(client, url: str, payload: dict) -> RequestResult:
    """Streams one request; TTFT at the first chunk carrying text, ITL between text chunks."""
    result = RequestResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])
                    return result
                now = time.perf_counter()
                text = _delta_text(chunk)
                if text:
                    if not result.generated_text and result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.generated_text += text
                usage = chunk.get("usage")
                if usage:
                    result.prompt_len = usage.get("prompt_tokens", 0)
                    result.output_len = usage.get("completion_tokens", 0)
                    result.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        result.latency = time.perf_counter() - start
        result.success = result.ttft > 0.0 or result.output_len == 0
    except Exception as error:  # a failed request is counted, not fatal
        result.error = f"{type(error).__name__}: {error}"
    return result


async def _resolve_model(client, base_url: str, model: Optional[str]) -> str:
    import httpx

    try:
        response = await client.get(f"{base_url}/v1/models")
    except httpx.HTTPError as error:
        raise ValueError(f"no server answers at {base_url} ({type(error).__name__}: {error}); start one with "
                         f"`lserve serve` or pass --base-url/--host/--port") from None
    if model:
        return model
    if response.status_code != 200:
        raise ValueError(f"{base_url}/v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]["id"]


async def run_benchmark(args: argparse.Namespace) -> dict:
    import httpx

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if args.dataset == "prefix":
        prompts = sample_prefix_prompts(args.num_prompts, args.prefix_len, args.num_prefixes, args.random_input_len,
                                        args.random_output_len, args.random_range_ratio, args.seed)
    else:
        prompts = sample_prompts(args.num_prompts, args.random_input_len, args.random_output_len,
                                 args.random_range_ratio, args.seed)
    concurrency = args.max_concurrency or args.num_prompts
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        model = await _resolve_model(client, base_url, args.model)
        url = base_url + args.endpoint
        semaphore = asyncio.Semaphore(concurrency)
        rng = random.Random(args.seed + 1)
        progress = None
        if not args.disable_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(prompts), desc="Requests")

        async def one(prompt: str, output_len: int) -> RequestResult:
            async with semaphore:
                result = await send_request(client, url, _payload(args, model, prompt, output_len))
            if progress is not None:
                progress.update(1)
            return result

        print(f"Benchmarking {url} with {len(prompts)} prompts, max concurrency {concurrency}, "
              f"request rate {args.request_rate}", flush=True)
        start = time.perf_counter()
        tasks = []
        for prompt, _, output_len in prompts:
            tasks.append(asyncio.create_task(one(prompt, output_len)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.close()
    return summarize(args, model, results, duration)


def _percentile(values: List[float], percent: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * percent / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats_ms(name: str, values: List[float], percentiles: List[float]) -> Dict[str, float]:
    ms = [value * 1000.0 for value in values]
    out = {f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
           f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
           f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0}
    for percent in percentiles:
        out[f"p{_percent_label(percent)}_{name}_ms"] = _percentile(ms, percent)
    return out


def _percent_label(percent: float) -> str:
    return str(int(percent)) if float(percent).is_integer() else str(percent)


def summarize(args: argparse.Namespace, model: str, results: List[RequestResult], duration: float) -> dict:
    percentiles = [float(value) for value in args.metric_percentiles.split(",")]
    ok = [result for result in results if result.success]
    ttfts = [result.ttft for result in ok]
    tpots = [(result.latency - result.ttft) / (result.output_len - 1) for result in ok if result.output_len > 1]
    itls = [gap for result in ok for gap in result.itl]
    e2els = [result.latency for result in ok]
    total_input = sum(result.prompt_len for result in ok)
    total_output = sum(result.output_len for result in ok)
    summary = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if args.endpoint.endswith("chat/completions") else "openai",
        "model_id": model,
        "num_prompts": len(results),
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "max_concurrency": args.max_concurrency,
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_output / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_input + total_output) / duration if duration > 0 else 0.0,
        "total_cached_tokens": sum(result.cached_tokens for result in ok),
        "prefix_cache_hit_rate": sum(result.cached_tokens for result in ok) / total_input if total_input else 0.0,
    }
    selected = {name.strip() for name in args.percentile_metrics.split(",")}
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        if name in selected:
            summary.update(_stats_ms(name, values, percentiles))
    summary.update({
        "input_lens": [result.prompt_len for result in results],
        "output_lens": [result.output_len for result in results],
        "ttfts": [result.ttft for result in results],
        "itls": [result.itl for result in results],
        "e2els": [result.latency for result in results],
        "generated_texts": [result.generated_text for result in results],
        "errors": [result.error for result in results],
    })
    return summary


_SECTIONS = (("ttft", "Time to First Token", "TTFT"),
             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
             ("itl", "Inter-token Latency", "ITL"),
             ("e2el", "End-to-end Latency", "E2EL"))


def format_report(summary: dict, args: argparse.Namespace) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value) -> None:
        if isinstance(value, float):
            lines.append("{:<40} {:<10.2f}".format(label, value))
        else:
            lines.append("{:<40} {:<10}".format(label, value))

    row("Successful requests:", summary["completed"])
    if summary["failed"]:
        row("Failed requests:", summary["failed"])
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"])
    row("Total generated tokens:", summary["total_output_tokens"])
    row("Request throughput (req/s):", summary["request_throughput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total Token throughput (tok/s):", summary["total_token_throughput"])
    row("Prefix cache hit rate (%):", 100.0 * summary["prefix_cache_hit_rate"])
    selected = {name.strip() for name in args.percentile_metrics.split(",")}
    percentiles = [float(value) for value in args.metric_percentiles.split(",")]
    for name, title, short in _SECTIONS:
        if name not in selected:
            continue
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {short} (ms):", summary[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", summary[f"median_{name}_ms"])
        for percent in percentiles:
            label = _percent_label(percent)
            row(f"P{label} {short} (ms):", summary[f"p{label}_{name}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1", help="server host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="server port (default: %(default)s)")
    parser.add_argument("--endpoint", default="/v1/completions",
                        help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: %(default)s)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="concurrent clients (default: all requests at once)")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals; inf sends all at once (default: %(default)s)")
    parser.add_argument("--dataset", default="random", choices=["random", "prefix"],
                        help="random prompts, or prompts sharing --num-prefixes long prefixes (default: %(default)s)")
    parser.add_argument("--prefix-len", type=int, default=1024,
                        help="--dataset prefix: words (about tokens) of each shared prefix (default: %(default)s)")
    parser.add_argument("--num-prefixes", type=int, default=4,
                        help="--dataset prefix: distinct shared prefixes (default: %(default)s)")
    parser.add_argument("--random-input-len", type=int, default=128,
                        help="mean prompt length in tokens (--dataset prefix: of the part after the prefix)")
    parser.add_argument("--random-output-len", type=int, default=64, help="mean output length in tokens")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths are uniform in len * [1 - r, 1 + r] (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: greedy)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate exactly the requested output length (default: on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals (default: %(default)s)")
    parser.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                        help="comma-separated metrics to report (default: %(default)s)")
    parser.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles (default: 99)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    for name, value in (("--num-prompts", args.num_prompts), ("--random-input-len", args.random_input_len),
                        ("--random-output-len", args.random_output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {args.request_rate}")
    unknown = {name.strip() for name in args.percentile_metrics.split(",")} - {"ttft", "tpot", "itl", "e2el"}
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}; choose from ttft, tpot, itl, e2el")
    try:
        percentiles = [float(value) for value in args.metric_percentiles.split(",")]
    except ValueError:
        raise ValueError(f"--metric-percentiles must be comma-separated numbers, got {args.metric_percentiles!r}")
    if not all(0 < value <= 100 for value in percentiles):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {args.metric_percentiles!r}")
    summary = asyncio.run(run_benchmark(args))
    print(format_report(summary, args), flush=True)
    errors = [error for error in summary["errors"] if error]
    if errors:
        print(f"{len(errors)} request(s) failed; first error: {errors[0]}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return 0 if summary["completed"] > 0 else 1
