"""`lserve bench kernels`: lserve's CUDA attention and GEMM ops against torch in one run.

Everything goes through `_C.Backend("cuda")`, the ops the engine calls (prefill chunks take the
TMA + wgmma kernel on sm_90, decode steps the split-KV kernel), with torch tensors over DLPack.
- Prefill attention: one causal sequence of N tokens, Llama-3-8B's attention shape (32 query / 8 KV
  heads, head_dim 128), bf16, pages of 64 tokens in order. TFLOP/s = 2 * 2 * 32 * 128 * N^2 / 2 /
  time. torch SDPA (cuDNN and flash backends) on contiguous K/V expanded to 32 heads, same FLOPs.
- Decode attention: one query token per sequence, batch B, N tokens each. TB/s = the K and V bytes
  of the 8 KV heads / time (what any kernel must read), for lserve and for SDPA alike; next to the
  device-to-device copy bandwidth (bytes read + written), the ceiling.
- GEMMs: Llama-3-8B's projections (qkv, o, gate_up, down, lm_head) at M tokens, bf16, against
  torch.nn.functional.linear.
lserve's ops are timed as `repeat` launches between two host waits (wall clock / repeat); torch's
with CUDA events around the same number of launches. JSON out and an optional PNG.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict

from lserve.extras import require_extra

NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 64
GEMM_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill-lengths", default="8192,32768,131072")
    parser.add_argument("--decode-lengths", default="32768,131072")
    parser.add_argument("--decode-batches", default="1,8")
    parser.add_argument("--gemm-tokens", default="8192,8", help="M of the GEMMs, comma-separated")
    parser.add_argument("--out", default="kernels.json")
    parser.add_argument("--plot", default=None, help="PNG of the ratios to torch (needs matplotlib)")


def _ints(text: str):
    return [int(v) for v in str(text).split(",") if v.strip()]


def _torch_ms(torch, fn: Callable[[], None], calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def _lserve_ms(op: Callable[[int], None], calls: int) -> float:
    op(1)  # warm-up (and the first launch's setup)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        op(calls)
        best = min(best, (time.perf_counter() - start) * 1e3 / calls)
    return best


def _paged(torch, batch: int, length: int, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    pages = batch * (length // PAGE_SIZE)
    shape = (pages, PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    page_indptr = torch.arange(0, pages + 1, length // PAGE_SIZE, device="cuda", dtype=torch.int32)
    page_indices = torch.arange(pages, device="cuda", dtype=torch.int32)
    kv_lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    return k_cache, v_cache, page_indptr, page_indices, kv_lens


def _expanded(torch, cache, batch: int, length: int):
    # (pages, page, kv_heads, d) -> (batch, 32 heads, length, d), contiguous, for SDPA
    x = cache.view(batch, length, NUM_KV_HEADS, HEAD_DIM).permute(0, 2, 1, 3)
    return x.repeat_interleave(NUM_QO_HEADS // NUM_KV_HEADS, dim=1).contiguous()


def bench_prefill(torch, backend, length: int) -> Dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k_cache, v_cache, page_indptr, page_indices, kv_lens = _paged(torch, 1, length, seed=length)
    query = torch.randn((length, NUM_QO_HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16)
    output = torch.empty_like(query)
    qo_indptr = torch.tensor([0, length], device="cuda", dtype=torch.int32)
    scale = HEAD_DIM ** -0.5
    calls = max(1, 32768 * 4 // length)

    def ours(repeat: int) -> None:
        backend.attention(query, k_cache, v_cache, qo_indptr, page_indptr, page_indices, kv_lens, output, scale,
                          max_q_len=length, max_kv_len=length, repeat=repeat)

    flops = 2 * 2 * NUM_QO_HEADS * HEAD_DIM * length * length / 2
    result = {"lserve_tflops": flops / _lserve_ms(ours, calls) / 1e9}
    q = query.permute(1, 0, 2).unsqueeze(0)
    k, v = _expanded(torch, k_cache, 1, length), _expanded(torch, v_cache, 1, length)
    for name, which in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(which):
                ms = _torch_ms(torch, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), calls)
            result[f"sdpa_{name}_tflops"] = flops / ms / 1e9
        except RuntimeError as error:  # a backend this torch build or GPU lacks
            result[f"sdpa_{name}_error"] = str(error).splitlines()[0]
    del k, v, q
    torch.cuda.empty_cache()
    return result


def bench_decode(torch, backend, batch: int, length: int) -> Dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k_cache, v_cache, page_indptr, page_indices, kv_lens = _paged(torch, batch, length, seed=batch * length)
    query = torch.randn((batch, NUM_QO_HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16)
    output = torch.empty_like(query)
    qo_indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    scale = HEAD_DIM ** -0.5

    def ours(repeat: int) -> None:
        backend.attention(query, k_cache, v_cache, qo_indptr, page_indptr, page_indices, kv_lens, output, scale,
                          max_q_len=1, max_kv_len=length, repeat=repeat)

    kv_bytes = 2 * batch * length * NUM_KV_HEADS * HEAD_DIM * 2
    result = {"lserve_tbps": kv_bytes / _lserve_ms(ours, 50) / 1e9}
    q = query.unsqueeze(2)
    k, v = _expanded(torch, k_cache, batch, length), _expanded(torch, v_cache, batch, length)
    for name, which in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(which):
                ms = _torch_ms(torch, lambda: F.scaled_dot_product_attention(q, k, v), 50)
            result[f"sdpa_{name}_tbps"] = kv_bytes / ms / 1e9
        except RuntimeError as error:
            result[f"sdpa_{name}_error"] = str(error).splitlines()[0]
    del k, v
    torch.cuda.empty_cache()
    return result


def bench_gemm(torch, backend, tokens: int, out_features: int, in_features: int) -> Dict:
    import torch.nn.functional as F

    x = torch.randn((tokens, in_features), device="cuda", dtype=torch.bfloat16)
    w = torch.randn((out_features, in_features), device="cuda", dtype=torch.bfloat16) * 0.02
    y = torch.empty((tokens, out_features), device="cuda", dtype=torch.bfloat16)
    flops = 2 * tokens * out_features * in_features
    calls = 20 if tokens >= 1024 else 200
    ours = _lserve_ms(lambda repeat: backend.gemm(x, w, None, y, repeat=repeat), calls)
    theirs = _torch_ms(torch, lambda: F.linear(x, w), calls)
    return {"lserve_tflops": flops / ours / 1e9, "torch_tflops": flops / theirs / 1e9}


def copy_tbps(torch) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / _torch_ms(torch, lambda: dst.copy_(src), 10) / 1e9


def main(args: argparse.Namespace) -> int:
    require_extra("bench", "lserve bench kernels", ["torch"])
    import torch

    from lserve import _C

    if not _C.has_cuda_backend or not torch.cuda.is_available():
        raise ValueError("lserve bench kernels needs a GPU and lserve built with its CUDA backend")
    backend = _C.Backend("cuda")
    report: Dict = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "shape": f"{NUM_QO_HEADS} q / {NUM_KV_HEADS} kv heads, d{HEAD_DIM}, bf16, page {PAGE_SIZE}",
                    "copy_tbps": copy_tbps(torch), "prefill": {}, "decode": {}, "gemm": {}}
    print(f"{report['gpu']}: device-to-device copy {report['copy_tbps']:.2f} TB/s", flush=True)
    for length in _ints(args.prefill_lengths):
        row = report["prefill"][str(length)] = bench_prefill(torch, backend, length)
        print(f"prefill {length:>7}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()
                                                    if isinstance(v, float)), flush=True)
    for batch in _ints(args.decode_batches):
        for length in _ints(args.decode_lengths):
            row = report["decode"][f"B{batch}_{length}"] = bench_decode(torch, backend, batch, length)
            print(f"decode B={batch} {length:>7}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                                 if isinstance(v, float)), flush=True)
    for tokens in _ints(args.gemm_tokens):
        for name, (out_features, in_features) in GEMM_SHAPES.items():
            row = report["gemm"][f"{name}_M{tokens}"] = bench_gemm(torch, backend, tokens, out_features, in_features)
            print(f"gemm {name:>8} M={tokens:>5}: lserve {row['lserve_tflops']:.0f}, torch {row['torch_tflops']:.0f} "
                  f"TFLOP/s ({row['lserve_tflops'] / row['torch_tflops']:.2f}x)", flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
        _plot(report, args.plot)
    return 0


def _plot(report: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels, ratios = [], []
    for length, row in report["prefill"].items():
        if "sdpa_cudnn_tflops" in row:
            labels.append(f"prefill {int(length) // 1024}K")
            ratios.append(row["lserve_tflops"] / row["sdpa_cudnn_tflops"])
    for key, row in report["decode"].items():
        labels.append(f"decode {key}")
        ratios.append(row["lserve_tbps"] / report["copy_tbps"])
    for key, row in report["gemm"].items():
        labels.append(f"gemm {key}")
        ratios.append(row["lserve_tflops"] / row["torch_tflops"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar(range(len(ratios)), ratios)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("lserve / peer")
    ax.set_title(f"{report['gpu']}: prefill vs cuDNN SDPA, decode vs copy bandwidth, GEMM vs torch", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
