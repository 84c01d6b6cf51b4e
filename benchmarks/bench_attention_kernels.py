"""Attention kernels (cuda/attention/) against torch SDPA (cuDNN and flash backends) in one run.

Prefill: one causal sequence of N tokens (8K, 32K, 128K), 32 query / 8 KV heads, head_dim 128, bf16,
paged KV (page 64); TFLOP/s = 2 * 2 * 32 * 128 * N^2 / 2 / time. SDPA gets contiguous K/V expanded
to 32 heads (same FLOPs). Decode: one query per sequence, B = 1 and 8, N = 32K and 128K; TB/s = K and
V bytes the kernel must read / time (lserve: the 8 KV heads once; SDPA: its 32 expanded heads).
Also a device-to-device copy (bytes read + written) as the bandwidth ceiling.
Usage: python benchmarks/bench_attention_kernels.py [--out results.json] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "cuda"))
from attention_lib import PREFILL_AUTO, PREFILL_SM80, AttentionLib, PagedBatch, build_library  # noqa: E402

NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 64


def time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def graph_time_ms(fn, calls: int, reps: int) -> float:
    """Median time of one call, from replays of a CUDA graph holding `calls` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, reps, warmup=2) / calls


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=10, warmup=2)
    return 2 * src.numel() / ms / 1e9  # bytes per ms / 1e9 = TB/s


def check_ok(lib, code):
    if code != 0:
        raise RuntimeError(lib.error(code))


def interleaved_ms(fns: dict, reps: int) -> dict:
    """Median ms of each callable, timed round-robin so that clock and temperature drift hit all alike."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def bench_prefill(lib, n: int, reps: int) -> dict:
    """lserve on pages in order (a fresh prompt on an empty pool) and on shuffled pages, the mma.sync
    kernel once, and SDPA on contiguous K/V expanded to 32 heads; timed round-robin."""
    flops = 4 * NUM_QO_HEADS * HEAD_DIM * n * n / 2
    batch = PagedBatch([(n, n)], NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, torch.bfloat16, seed=n,
                       spare_pages=0, shuffle=False)
    shuffled = PagedBatch([(n, n)], NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, torch.bfloat16, seed=n,
                          spare_pages=0, shuffle=True)
    out = torch.empty_like(batch.q)
    args, args_shuffled = batch.args(out), shuffled.args(out)
    k, v = batch.seq_kv(0)
    group = NUM_QO_HEADS // NUM_KV_HEADS
    q4 = batch.q.transpose(0, 1).unsqueeze(0).contiguous()  # (1, H, N, D)
    k4 = k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    v4 = v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    del k, v

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)
        return run

    fns = {"lserve": lambda: check_ok(lib, lib.prefill(args, PREFILL_AUTO)),
           "lserve_shuffled_pages": lambda: check_ok(lib, lib.prefill(args_shuffled, PREFILL_AUTO)),
           "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    row = {"tokens": n}
    for name, ms in interleaved_ms(fns, reps).items():
        row[name] = {"ms": ms, "tflops": flops / ms / 1e9}
    ms = time_ms(lambda: check_ok(lib, lib.prefill(args, PREFILL_SM80)), 1)
    row["lserve_sm80"] = {"ms": ms, "tflops": flops / ms / 1e9}
    return row


def bench_decode(lib, batch_size: int, n: int) -> dict:
    """Shuffled pages of 64 tokens; 'lserve_page16' repeats it with pages of 16 tokens."""
    kv_bytes = batch_size * n * NUM_KV_HEADS * HEAD_DIM * 2 * 2
    row = {"batch": batch_size, "tokens": n}
    for name, page in (("lserve_page16", 16), ("lserve", PAGE_SIZE)):
        batch = PagedBatch([(1, n)] * batch_size, NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, page, torch.bfloat16,
                           seed=batch_size * n, spare_pages=0)
        out = torch.empty_like(batch.q)
        args = batch.args(out)
        splits = lib.num_splits(args)
        workspace = lib.decode_workspace(args, splits)
        ms = graph_time_ms(lambda: check_ok(lib, lib.decode(args, splits, workspace)), calls=20, reps=10)
        row[name] = {"ms": ms, "tbps": kv_bytes / ms / 1e9}
        row["splits"] = splits
    group = NUM_QO_HEADS // NUM_KV_HEADS
    q4 = batch.q.unsqueeze(2)  # (B, H, 1, D)
    ks, vs = zip(*(batch.seq_kv(s) for s in range(batch_size)))
    k4 = torch.stack(ks).repeat_interleave(group, dim=2).transpose(1, 2).contiguous()  # (B, H, N, D)
    del ks
    v4 = torch.stack(vs).repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
    del vs, batch
    sdpa_bytes = kv_bytes * group
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = time_ms(lambda: F.scaled_dot_product_attention(q4, k4, v4), reps=20, warmup=3)
            row[name] = {"ms": ms, "tbps": sdpa_bytes / ms / 1e9}
        except RuntimeError as e:
            row[name] = {"error": str(e)[:200]}
    return row


def sweep_decode_splits(lib, n: int) -> dict:
    """B=1 decode time by split count (tuning data for decode_num_splits)."""
    batch = PagedBatch([(1, n)], NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, torch.bfloat16, seed=n,
                       spare_pages=0)
    kv_bytes = n * NUM_KV_HEADS * HEAD_DIM * 2 * 2
    out = torch.empty_like(batch.q)
    args = batch.args(out)
    row = {}
    for splits in (16, 33, 66, 99, 132, 198, 256):
        workspace = lib.decode_workspace(args, splits)
        ms = graph_time_ms(lambda: check_ok(lib, lib.decode(args, splits, workspace)), calls=20, reps=10)
        row[str(splits)] = round(kv_bytes / ms / 1e9, 3)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="8K/32K prefill and 32K decode only")
    parser.add_argument("--sweep", action="store_true", help="also decode TB/s by split count (B=1)")
    opts = parser.parse_args()
    lib = AttentionLib(build_library())
    props = torch.cuda.get_device_properties(0)
    result = {"date": datetime.date.today().isoformat(), "gpu": props.name, "sms": props.multi_processor_count,
              "torch": torch.__version__, "copy_tbps": copy_bandwidth(), "prefill": [], "decode": []}
    if opts.sweep:
        result["decode_split_sweep_tbps"] = {n: sweep_decode_splits(lib, n) for n in (32768, 131072)}
        print("split sweep", json.dumps(result["decode_split_sweep_tbps"]), flush=True)
    for b in (1, 8):
        for n in (32768,) if opts.quick else (32768, 131072):
            result["decode"].append(bench_decode(lib, b, n))
            print("decode", json.dumps(result["decode"][-1]), flush=True)
            torch.cuda.empty_cache()
    prefill_sizes = [(8192, 15), (32768, 7)] + ([] if opts.quick else [(131072, 3)])
    for n, reps in prefill_sizes:
        result["prefill"].append(bench_prefill(lib, n, reps))
        print("prefill", json.dumps(result["prefill"][-1]), flush=True)
        torch.cuda.empty_cache()
    if opts.out:
        pathlib.Path(opts.out).write_text(json.dumps(result, indent=2))

    def fmt(entry, key):
        return f"{entry[key]:8.1f}" if key in entry else "   error"

    print(f"\n{result['gpu']} {result['date']}  D2D copy {result['copy_tbps']:.2f} TB/s")
    print("prefill TFLOP/s  tokens   lserve shuffled   sm80    cuDNN    flash  lserve/cuDNN")
    for r in result["prefill"]:
        ratio = r["lserve"]["tflops"] / r["sdpa_cudnn"]["tflops"] if "tflops" in r.get("sdpa_cudnn", {}) else 0
        print(f"{'':15s} {r['tokens']:7d} {fmt(r['lserve'], 'tflops')} {fmt(r['lserve_shuffled_pages'], 'tflops')}"
              f" {fmt(r['lserve_sm80'], 'tflops')} {fmt(r['sdpa_cudnn'], 'tflops')} {fmt(r['sdpa_flash'], 'tflops')}"
              f"   {ratio:.2f}")
    print("decode TB/s      B  tokens splits  lserve page16  flash(32h) cuDNN(32h)  lserve/copy")
    for r in result["decode"]:
        print(f"{'':13s} {r['batch']:4d} {r['tokens']:7d} {r['splits']:6d}  {r['lserve']['tbps']:6.2f}"
              f" {r['lserve_page16']['tbps']:6.2f}  {r['sdpa_flash'].get('tbps', float('nan')):9.2f}"
              f"  {r['sdpa_cudnn'].get('tbps', float('nan')):9.2f}  {r['lserve']['tbps'] / result['copy_tbps']:.2f}")


if __name__ == "__main__":
    main()
