"""`lserve bench latency`: time to first token and per-token decode latency of one request, lserve vs
Hugging Face transformers (sdpa) on the same GPU, with random weights of a model shape.

For each context length: lserve (`Engine(load_format="dummy")`, chunked prefill of
--chunk tokens per step) and transformers (`LlamaForCausalLM` from the same config, bf16, sdpa,
the whole prompt in one forward with `logits_to_keep=1`, then greedy decode with its KV cache).
TTFT = prompt submitted -> first token on the host; TPOT = mean time of the next --decode-steps
tokens. Each figure is the best of --repeats. JSON out (--out) and an optional PNG (--plot).

    lserve bench latency --model llama3-8b --lengths 8192,32768 --out latency.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Dict, List, Tuple

from lserve.extras import require_extra

# Shapes of well-known models (config.json fields); weights are random.
SHAPES: Dict[str, Dict] = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                      bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, hidden_act="silu",
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192)),
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, hidden_act="silu"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama3-8b", help=f"shape: {', '.join(SHAPES)} (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (0 = the model's)")
    parser.add_argument("--lengths", default="8192,32768,131072", help="prompt lengths, comma-separated")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=16384, help="lserve's max_num_batched_tokens")
    parser.add_argument("--page-size", type=int, default=None, help="lserve's KV page size (default: the engine's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true", help="lserve without CUDA graphs")
    parser.add_argument("--out", default="latency.json")
    parser.add_argument("--plot", default=None, help="PNG of TTFT and TPOT per length (needs matplotlib)")


def _config(args) -> Dict:
    if args.model not in SHAPES:
        raise ValueError(f"unknown model shape {args.model!r} (known: {', '.join(SHAPES)})")
    config = dict(SHAPES[args.model])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    return config


def _prompt(length: int, vocab: int) -> List[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(length).integers(100, vocab - 100, size=length)]


def time_request(engine, prompt: List[int], decode_steps: int, on_first_decode_step=None) -> Tuple[float, int, float]:
    """Runs one greedy request alone on `engine` (lserve.Engine): (seconds to the first token, decode
    steps after it, their seconds). on_first_decode_step(engine) runs after the first decode step,
    while the request still holds its pages."""
    from lserve import SamplingParams

    engine.add_request(None, prompt, SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True))
    start = time.perf_counter()
    produced = 0
    while produced == 0:  # prefill chunks until the first token
        produced += sum(len(out.new_token_ids) for out in engine._core.step())
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    steps = 0
    while engine._core.has_unfinished_requests():
        engine._core.step()
        steps += 1
        if steps == 1 and on_first_decode_step is not None:
            on_first_decode_step(engine)
    return ttft, steps, time.perf_counter() - start


def bench_lserve(model_dir: str, config: Dict, lengths: List[int], args) -> Dict:
    from lserve import Engine

    engine = Engine(model_dir, load_format="dummy", device=args.device, dtype="bfloat16",
                    max_model_len=max(lengths) + args.decode_steps + 1, max_num_seqs=1,
                    max_num_batched_tokens=args.chunk, page_size=args.page_size, show_progress=False,
                    enforce_eager=getattr(args, "enforce_eager", False),
                    enable_prefix_caching=False)  # repeats of one prompt must prefill, not hit the cache
    results = {}
    for length in lengths:
        prompt = _prompt(length, config["vocab_size"])
        best_ttft, best_tpot = float("inf"), float("inf")
        for _ in range(args.repeats):
            ttft, steps, seconds = time_request(engine, prompt, args.decode_steps)
            best_ttft, best_tpot = min(best_ttft, ttft), min(best_tpot, seconds / max(steps, 1))
        results[str(length)] = {"ttft_s": best_ttft, "tpot_s": best_tpot}
        print(f"lserve       {length:>7}: TTFT {best_ttft * 1e3:9.1f} ms  TPOT {best_tpot * 1e3:7.2f} ms", flush=True)
    del engine
    return results


def bench_transformers(config: Dict, lengths: List[int], args) -> Dict:
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
    results = {}
    for length in lengths:
        ids = torch.tensor([_prompt(length, config["vocab_size"])], device=args.device)
        best_ttft, best_tpot = float("inf"), float("inf")
        for _ in range(args.repeats):
            with torch.no_grad():
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(ids, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                token.item()
                ttft = time.perf_counter() - start
                cache = out.past_key_values
                start = time.perf_counter()
                for _ in range(args.decode_steps):
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    token.item()
                tpot = (time.perf_counter() - start) / args.decode_steps
            del out, cache
            torch.cuda.empty_cache()
            best_ttft, best_tpot = min(best_ttft, ttft), min(best_tpot, tpot)
        results[str(length)] = {"ttft_s": best_ttft, "tpot_s": best_tpot}
        print(f"transformers {length:>7}: TTFT {best_ttft * 1e3:9.1f} ms  TPOT {best_tpot * 1e3:7.2f} ms", flush=True)
    del model
    torch.cuda.empty_cache()
    return results


def plot(report: Dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for system in ("lserve", "transformers"):
        if system not in report:
            continue
        lengths = [int(n) for n in report[system]]
        axes[0].plot(lengths, [report[system][str(n)]["ttft_s"] * 1e3 for n in lengths], "o-", label=system)
        axes[1].plot(lengths, [report[system][str(n)]["tpot_s"] * 1e3 for n in lengths], "o-", label=system)
    for ax, title in zip(axes, ("time to first token (ms)", "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{report['model']} ({report['layers']} layers), {report.get('gpu', '')}", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(args: argparse.Namespace) -> int:
    if not args.skip_transformers:
        require_extra("bench", "lserve bench latency (against transformers; --skip-transformers runs without)",
                      ["torch", "transformers"])
    requested = [int(v) for v in str(args.lengths).split(",") if v.strip()]
    if not requested or min(requested) < 1:
        raise ValueError("--lengths needs positive prompt lengths")
    config = _config(args)
    # A prompt plus its decode steps must fit the model's context: 131072 runs as 131072 - steps - 1.
    limit = config["max_position_embeddings"] - args.decode_steps - 1
    lengths = [min(length, limit) for length in requested]
    report: Dict = {"model": args.model, "layers": config["num_hidden_layers"], "date": time.strftime("%Y-%m-%d"),
                    "decode_steps": args.decode_steps, "chunk": args.chunk, "page_size": args.page_size}
    try:
        import torch

        if args.device.startswith("cuda") and torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w") as handle:
            json.dump(config, handle)
        report["lserve"] = bench_lserve(model_dir, config, lengths, args)
    if not args.skip_transformers:
        report["transformers"] = bench_transformers(config, lengths, args)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.out}")
    if args.plot and plot(report, args.plot):
        print(f"wrote {args.plot}")
    return 0
