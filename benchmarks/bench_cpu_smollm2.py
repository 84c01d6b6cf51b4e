"""CPU throughput of SmolLM2-135M-Instruct: lserve (per --dtype: native q4_1 weights and/or the
float32 reference) vs llama.cpp (llama-cpp-python, optional) and Hugging Face transformers
(--transformers) in the same run.

Prefill tokens/s at 512, 2048, 4096 and 8000 prompt tokens (one request; lserve and llama.cpp in
chunks of 2048 / n_batch 2048); decode tokens/s at batch 1 and 8 (steady-state steps after the
prefill). With --rounds 2 the engines alternate A B A B and each figure is the best round. Also
the floors: read bandwidth (numpy sum over 1 GiB) and the Q4_1 bytes one decode token streams.
Writes JSON (--output) and prints a table with the load average of each engine's round, and each
lserve engine's ratios to llama.cpp round by round (the CPU backend's name, with its thread pool's
polling policy, goes into the JSON).
llama.cpp (llama-cpp-python built with OpenMP) spin-waits between graph nodes by default; on a shared
host run with OMP_WAIT_POLICY=passive (on the loaded 2-core VM, 2026-12-05, its batch-1 decode went
from 0.3 to 32 tokens/s).
Usage: python benchmarks/bench_cpu_smollm2.py [--dtype native,float32] [--lengths 512,2048]
       [--rounds 2] [--output results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _prompt(length: int, seed: int, vocab: int = 49152) -> list:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, vocab - 100, size=length)]


def bench_lserve(path: str, prefill_lengths, decode_batches, decode_steps: int, repeats: int,
                 dtype: str = "native") -> dict:
    from lserve import Engine, SamplingParams

    max_len = max(list(prefill_lengths) + [128]) + 64
    engine = Engine(path, dtype=dtype, max_model_len=min(max_len, 8192), max_num_batched_tokens=2048,
                    max_num_seqs=8, kv_cache_memory=int(1.1 * 737280 / 16 * max_len) + (64 << 20), show_progress=False)
    results = {}
    for length in prefill_lengths:
        times = []
        for rep in range(repeats if length <= 2048 else 1):
            engine.add_request(None, _prompt(length, rep), SamplingParams(temperature=0.0, max_tokens=1))
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            times.append(time.perf_counter() - start)
        results[f"prefill_{length}_tok_per_s"] = length / min(times)
    for batch in decode_batches:
        params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True)
        for index in range(batch):
            engine.add_request(None, _prompt(64, 100 + index), params)
        engine.step()  # prefill of all prompts (one step: 64 * batch tokens fit the budget)
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        elapsed = time.perf_counter() - start
        results[f"decode_b{batch}_tok_per_s"] = batch * steps / elapsed
    return results


def bench_llama_cpp(path: str, prefill_lengths, decode_batches, decode_steps: int, repeats: int) -> dict:
    """llama.cpp through llama-cpp-python's low-level API: prefill in n_batch 2048 chunks, decode
    of `batch` sequences (one seq_id each) one token per sequence per llama_decode."""
    import llama_cpp

    max_len = max(list(prefill_lengths) + [128]) + 64
    # Llama() loads the model; its own context has one sequence (the wrapper does not pass
    # n_seq_max), so the benchmark makes its own: 8 sequences over one unified KV cache, as lserve's
    # page pool (without kv_unified llama.cpp would give each sequence n_ctx / 8 cells).
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=os.cpu_count(), logits_all=False, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = max(max_len, 8 * (64 + 2 * decode_steps))
    params.n_batch = 2048
    params.n_ubatch = 512
    params.n_seq_max = 8
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = os.cpu_count()
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch_buf = llama_cpp.llama_batch_init(2048, 0, 8)
    memory = llama_cpp.llama_get_memory(ctx)

    def decode(entries) -> None:  # entries: (token, position, seq_id, wants_logits)
        for start in range(0, len(entries), 2048):
            chunk = entries[start:start + 2048]
            batch_buf.n_tokens = len(chunk)
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch_buf.token[i] = token
                batch_buf.pos[i] = pos
                batch_buf.n_seq_id[i] = 1
                batch_buf.seq_id[i][0] = seq
                batch_buf.logits[i] = logits
            if llama_cpp.llama_decode(ctx, batch_buf) != 0:
                raise RuntimeError("llama_decode failed")

    results = {}
    for length in prefill_lengths:
        times = []
        for rep in range(repeats if length <= 2048 else 1):
            llama_cpp.llama_memory_clear(memory, True)
            tokens = _prompt(length, rep)
            start = time.perf_counter()
            decode([(t, p, 0, p == length - 1) for p, t in enumerate(tokens)])
            times.append(time.perf_counter() - start)
        results[f"prefill_{length}_tok_per_s"] = length / min(times)
    for batch in decode_batches:
        llama_cpp.llama_memory_clear(memory, True)
        entries = []
        for seq in range(batch):
            entries += [(t, p, seq, p == 63) for p, t in enumerate(_prompt(64, 100 + seq))]
        decode(entries)
        start = time.perf_counter()
        for step in range(decode_steps):  # the token fed back does not change the cost
            decode([(100 + step, 64 + step, seq, True) for seq in range(batch)])
        elapsed = time.perf_counter() - start
        results[f"decode_b{batch}_tok_per_s"] = batch * decode_steps / elapsed
    llama_cpp.llama_batch_free(batch_buf)
    llama_cpp.llama_free(ctx)
    return results


def bench_transformers(path: str, prefill_lengths, decode_batches, decode_steps: int, repeats: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              torch_dtype=torch.float32).eval()
    results = {}
    with torch.no_grad():
        for length in prefill_lengths:
            times = []
            for rep in range(repeats):
                ids = torch.tensor([_prompt(length, rep)])
                start = time.perf_counter()
                model(ids)
                times.append(time.perf_counter() - start)
            results[f"prefill_{length}_tok_per_s"] = length / min(times)
        for batch in decode_batches:
            ids = torch.tensor([_prompt(64, 100 + index) for index in range(batch)])
            out = model(ids, use_cache=True)
            past = out.past_key_values
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(decode_steps):
                out = model(next_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            elapsed = time.perf_counter() - start
            results[f"decode_b{batch}_tok_per_s"] = batch * decode_steps / elapsed
    return results


def bench_machine(path: str) -> dict:
    """The floors: read bandwidth (numpy sum over a 1 GiB float32 array, best of 3) and the bytes of
    weights one decode token streams (every layer matrix once, plus the tied Q8_0 lm_head; the
    embedding lookup reads one row), so decode at batch 1 cannot beat bandwidth / bytes."""
    import gguf

    reader = gguf.GGUFReader(path)
    token_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") or t.name == "output.weight")
    if not any(t.name == "output.weight" for t in reader.tensors):  # tied: the lm_head reads token_embd
        token_bytes += sum(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    src = np.ones(256 << 20, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    bandwidth = src.nbytes / best
    return {"read_gb_per_s": bandwidth / 1e9, "decode_bytes_per_token": token_bytes,
            "decode_b1_floor_tok_per_s": bandwidth / token_bytes}


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: resolve smollm2-135m-instruct)")
    parser.add_argument("--output", default=None)
    parser.add_argument("--dtype", default="native,float32", help="lserve weight dtypes, comma-separated")
    parser.add_argument("--lengths", default="512,2048,4096,8000", help="prefill lengths, comma-separated")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes, comma-separated")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the engines this many times (A B A B)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--transformers", action="store_true", help="also run transformers (fp32)")
    args = parser.parse_args()
    path = args.gguf
    if path is None:
        from lserve.models import resolve_model

        path = str(resolve_model("smollm2-135m-instruct").path)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    runners = {f"lserve_{dtype}": (lambda dtype=dtype: bench_lserve(path, lengths, batches, args.decode_steps,
                                                                     args.repeats, dtype))
               for dtype in args.dtype.split(",")}
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401

            runners["llama.cpp"] = lambda: bench_llama_cpp(path, lengths, batches, args.decode_steps, args.repeats)
        except ImportError:
            print("llama-cpp-python not installed: no llama.cpp column")
    if args.transformers:
        runners["transformers"] = lambda: bench_transformers(path, lengths, batches, args.decode_steps, args.repeats)
    from lserve import _C

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "lserve_cpu_backend": _C.Backend("cpu", 0).name,  # threads, polling policy, ISA level
        "date": time.strftime("%Y-%m-%d"),
        "machine_floors": bench_machine(path),
        "rounds": [],
    }
    best: dict = {}
    for round_idx in range(args.rounds):
        for name, run in runners.items():
            before = load_average()
            figures = run()
            report["rounds"].append({"engine": name, "round": round_idx, "load_before": before,
                                     "load_after": load_average(), "figures": figures})
            for key, value in figures.items():
                best.setdefault(name, {})[key] = max(value, best.get(name, {}).get(key, 0.0))
            print(f"round {round_idx} {name}: load {before:.2f} -> {load_average():.2f}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    report["best"] = best
    # Per round, each lserve engine over llama.cpp in the same round (a target must hold in every one).
    by_round = {(r["engine"], r["round"]): r["figures"] for r in report["rounds"]}
    for name in (n for n in runners if n.startswith("lserve") and "llama.cpp" in runners):
        for round_idx in range(args.rounds):
            ours, theirs = by_round[(name, round_idx)], by_round[("llama.cpp", round_idx)]
            ratios = {k: ours[k] / theirs[k] for k in ours if theirs.get(k)}
            report.setdefault("ratios", []).append({"engine": name, "round": round_idx, "ratios": ratios})
            print(f"round {round_idx} {name} / llama.cpp: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    floors = report["machine_floors"]
    print(f"read bandwidth {floors['read_gb_per_s']:.1f} GB/s, {floors['decode_bytes_per_token'] / 1e6:.1f} MB per "
          f"decode token: floor {floors['decode_b1_floor_tok_per_s']:.0f} tok/s at batch 1")
    names = list(runners)
    print(f"{'metric (best round)':<28}" + "".join(f"{name:>18}" for name in names))
    for key in best[names[0]]:
        print(f"{key:<28}" + "".join(f"{best[name].get(key, float('nan')):>18.1f}" for name in names))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
