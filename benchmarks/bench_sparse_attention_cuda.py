"""CUDA: one decode step's attention, dense vs LServe sparse, on the Llama-3-8B shape (32 q / 8 KV heads,
d128, bf16, pages of 64), batch 1 at 32K and 128K tokens, through the backend ops the engine calls.

dense:  all 8 KV heads read every page (the split-KV decode kernel).
sparse: half the KV heads stream (sink 128 + window 256 through a 7-page ring) and the other half
        read a selection of decode_token_budget tokens (4096: 64 pages) from the selection store, plus
        page_select itself (scoring every logical page of the 4 dense heads), as in a fresh step.
Times are the mean of --repeat back-to-back calls after a warm-up (the binding synchronises once per
batch of repeats). Writes JSON (--out) and prints a table.
Usage (GPU machine): python benchmarks/bench_sparse_attention_cuda.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def timed(fn, repeat: int) -> float:
    fn(1)
    start = time.perf_counter()
    fn(repeat)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    from lserve import _C

    cuda = _C.Backend("cuda")
    page, heads_q, heads_kv, dim, budget = 64, 32, 8, 128, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        num_pages = math.ceil(context / page)
        q = torch.randn((1, heads_q, dim), device="cuda", generator=gen).bfloat16()
        k = torch.randn((num_pages, page, heads_kv, dim), device="cuda", generator=gen).bfloat16()
        v = torch.randn_like(k)
        qo = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
        indptr = torch.tensor([0, num_pages], dtype=torch.int32, device="cuda")
        indices = torch.arange(num_pages, dtype=torch.int32, device="cuda")
        lens = torch.tensor([context], dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        scale = 1.0 / math.sqrt(dim)

        def dense(n):
            cuda.attention(q, k, v, qo, indptr, indices, lens, out, scale, max_q_len=1, max_kv_len=context, repeat=n)

        # Sparse: 4 dense heads (selection of budget / page pages) + 4 streaming heads (ring).
        half = heads_kv // 2
        qd, qs = q[:, :heads_q // 2].contiguous(), q[:, heads_q // 2:].contiguous()
        kd, vd = k[:, :, :half].contiguous(), v[:, :, :half].contiguous()
        num_select = budget // page
        chosen = np.sort(np.random.default_rng(1).choice(num_pages - 1, num_select - 1, replace=False)).tolist()
        selection = torch.tensor([[chosen + [num_pages - 1]] * half], dtype=torch.int32, device="cuda")
        counts = torch.full((1, half), num_select, dtype=torch.int32, device="cuda")
        slot = torch.zeros(1, dtype=torch.int32, device="cuda")
        base = torch.tensor([num_pages], dtype=torch.int32, device="cuda")
        ring_pages = 2 + 5
        ks = torch.randn((ring_pages, page, half, dim), device="cuda", generator=gen).bfloat16()
        vs = torch.randn_like(ks)
        ring = torch.tensor([[0, 2, 2, 5]], dtype=torch.int32, device="cuda")
        sink = torch.tensor([128], dtype=torch.int32, device="cuda")
        local = torch.tensor([256], dtype=torch.int32, device="cuda")
        outd, outs = torch.empty_like(qd), torch.empty_like(qs)
        logical = page // 16
        kmax = torch.randn((num_pages, logical, half, dim), device="cuda", generator=gen)
        kmin = kmax - torch.rand((num_pages, logical, half, dim), device="cuda", generator=gen)
        store = torch.zeros((1, half, num_select), dtype=torch.int32, device="cuda")
        store_counts = torch.zeros((1, half), dtype=torch.int32, device="cuda")

        def selected(n):
            cuda.attention(qd, kd, vd, qo, indptr, indices, lens, outd, scale, max_q_len=1, max_kv_len=context,
                           repeat=n, selection=selection, selection_count=counts, select_slot=slot, select_base=base)

        def streaming(n):
            cuda.attention(qs, ks, vs, qo, None, None, lens, outs, scale, max_q_len=1, max_kv_len=context, repeat=n,
                           window_sink=sink, window_local=local, stream_ring=ring)

        def select(n):
            for _ in range(n):
                cuda.page_select(qd, kmax, kmin, indptr, indices, lens, store, store_counts, page, True, "center")

        row = {"context": context, "dense_us": 1e6 * timed(dense, args.repeat),
               "selected_us": 1e6 * timed(selected, args.repeat), "streaming_us": 1e6 * timed(streaming, args.repeat),
               "page_select_us": 1e6 * timed(select, max(1, args.repeat // 10))}
        row["sparse_us"] = row["selected_us"] + row["streaming_us"] + row["page_select_us"]
        row["sparse_reuse_us"] = row["selected_us"] + row["streaming_us"]
        row["speedup_fresh"] = row["dense_us"] / row["sparse_us"]
        row["speedup_reuse"] = row["dense_us"] / row["sparse_reuse_us"]
        kv_bytes = 2 * context * heads_kv * dim * 2
        row["dense_tb_per_s"] = kv_bytes / (row["dense_us"] * 1e-6) / 1e12
        rows.append(row)
    print(f"{'context':>8} {'dense us':>9} {'selected':>9} {'stream':>8} {'select':>8} {'x fresh':>8} {'x reuse':>8}"
          f" {'dense TB/s':>10}")
    for r in rows:
        print(f"{r['context']:>8} {r['dense_us']:>9.1f} {r['selected_us']:>9.1f} {r['streaming_us']:>8.1f} "
              f"{r['page_select_us']:>8.1f} {r['speedup_fresh']:>8.2f} {r['speedup_reuse']:>8.2f} "
              f"{r['dense_tb_per_s']:>10.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "rows": rows},
                      handle, indent=1)


if __name__ == "__main__":
    main()
