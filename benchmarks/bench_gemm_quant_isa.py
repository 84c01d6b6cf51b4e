"""Block-format GEMV/GEMM time per CPU ISA level (LSERVE_CPU_ISA), SmolLM2-135M's linear shapes.

Each level the CPU has runs in its own process (the level is read when a CPU backend is made); the
weights are random blocks of the given format, the input random. Prints one line per (level, layout, M)
with the time per call of the whole layer set and the weight bytes streamed per second. Layouts: "rows"
(as stored) and "packed" (Backend::pack_gemm_weight, as a model loads them; each gemm call packs first,
so its time per call is the difference of 2 r and r repeats, over r).

    python benchmarks/bench_gemm_quant_isa.py [--format q4_1] [--threads N] [--layouts rows,packed] [--json out.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# SmolLM2-135M-Instruct: (out_features, in_features) of one layer's q|k|v, o, gate|up, down.
LAYER = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def run_level(fmt: str, threads: int, rows: int, repeat: int, layout: str) -> dict:
    from lserve import _C

    backend = _C.Backend("cpu", threads)
    rng = np.random.default_rng(0)
    weights = [rng.integers(0, 256, size=(n, k // 32 * BLOCK_BYTES[fmt]), dtype=np.uint8) for n, k in LAYER]
    for w in weights:  # finite fp16 scales: clear the exponent's top bit of each block's scale (and min)
        blocks = w.reshape(w.shape[0], -1, BLOCK_BYTES[fmt])
        blocks[:, :, 1] &= 0x3B
        if fmt == "q4_1":
            blocks[:, :, 3] &= 0x3B
    inputs = [rng.standard_normal((rows, k), dtype=np.float32) for _, k in LAYER]
    outputs = [np.empty((rows, n), dtype=np.float32) for n, _ in LAYER]
    pack = layout == "packed"

    def once(times):
        start = time.perf_counter()
        for x, w, y in zip(inputs, weights, outputs):
            backend.gemm(x, w, None, y, repeat=times, weight_dtype=fmt, pack=pack)
        return time.perf_counter() - start
    once(repeat)
    best = float("inf")
    for _ in range(5):
        per_call = (once(2 * repeat) - once(repeat)) / repeat if pack else once(repeat) / repeat
        best = min(best, per_call)
    nbytes = sum(w.nbytes for w in weights)
    return {"isa": _C.cpu_isa(), "format": fmt, "layout": layout, "rows": rows, "threads": threads,
            "us_per_layer": best * 1e6, "weight_gb_per_s": nbytes / best / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="q4_1", choices=sorted(BLOCK_BYTES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--layouts", default="rows,packed")
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for layout in args.layouts.split(","):
            for rows in map(int, args.rows.split(",")):
                print(json.dumps(run_level(args.format, args.threads, rows, max(1, args.repeat // rows), layout)),
                      flush=True)
        return 0
    from lserve import _C

    results = []
    for level in _C.cpu_isas():
        env = dict(os.environ, LSERVE_CPU_ISA=level)
        out = subprocess.run([sys.executable, __file__, "--child", "--format", args.format, "--threads",
                              str(args.threads), "--rows", args.rows, "--repeat", str(args.repeat),
                              "--layouts", args.layouts],
                             env=env, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            result = json.loads(line)
            results.append(result)
            print(f"{result['isa']:11s} {result['format']} {result['layout']:6s} M={result['rows']:3d} "
                  f"threads {result['threads']}: "
                  f"{result['us_per_layer']:8.1f} us per layer, {result['weight_gb_per_s']:6.2f} GB/s of weights")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
