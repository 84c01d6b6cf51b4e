"""Greedy agreement of SmolLM2-135M-Instruct (Q4_1 GGUF) across four systems (issue 16): transformers
fp32 on the dequantised GGUF (the reference), lserve dtype="native" (q4_1/q8_0 blocks, 8-bit
activations), lserve dtype="float32" and llama.cpp (llama-cpp-python, raw logits, argmax here).
Prompts and token ids come from tests/engine/test_smollm2.py; every system gets the same ids and
N new tokens with EOS masked until N (min_tokens = N, as the test). Per pair and prompt: identical,
first differing index, and the reference's top-1 minus top-2 logit margin there.
Usage: python benchmarks/agreement_smollm2.py [--gguf PATH] [--max-tokens 32] [--limit K]
       [--output out.json]
"""
from __future__ import annotations

import os

# llama.cpp's OpenMP threads spin between graph nodes by default; on a shared 2-core host that stalls
# everything else (see bench_cpu_smollm2.py). Set before any OpenMP runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import metadata  # noqa: E402

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_THREADS = 2
# (system, reference): the margin reported is the reference's, along the reference's own continuation.
PAIRS = [("native", "transformers"), ("float32", "transformers"), ("llama.cpp", "transformers"),
         ("native", "llama.cpp")]


def load_test_prompts():
    """PLAIN_PROMPTS, CHAT_PROMPTS and _prompt_ids of tests/engine/test_smollm2.py, imported as is so
    the token ids are the test's."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "engine")]
    import test_smollm2

    return test_smollm2.PLAIN_PROMPTS, test_smollm2.CHAT_PROMPTS, test_smollm2._prompt_ids


def margins_of(logits: np.ndarray, masked_ids) -> tuple:
    """logits (num_positions, vocab) -> (top-1 minus top-2 with masked_ids at -inf, the same on the raw
    logits), each a list of num_positions floats."""
    def top2_gap(values: np.ndarray) -> list:
        top = np.sort(np.partition(values, -2, axis=-1)[:, -2:], axis=-1)
        return [float(t1 - t2) for t2, t1 in top]

    masked = logits.copy()
    masked[:, list(masked_ids)] = -np.inf
    return top2_gap(masked), top2_gap(logits)


def run_transformers(path: pathlib.Path, prompts, num_tokens: int) -> tuple:
    """Greedy continuations as the test computes them, and the per-position margins teacher-forced
    along them (one forward over prompt + continuation: causal, so position i sees only its prefix)."""
    import torch
    import transformers

    torch.set_num_threads(NUM_THREADS)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    tokens, margins, raw_margins, mismatches = [], [], [], []
    with torch.no_grad():
        for ids in prompts:
            ref = model.generate(torch.tensor([ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                 do_sample=False, pad_token_id=2)[0, len(ids):].tolist()
            logits = model(torch.tensor([ids + ref])).logits[0, len(ids) - 1:len(ids) - 1 + num_tokens].numpy()
            masked, raw = margins_of(logits, eos_ids)
            logits[:, eos_ids] = -np.inf
            forced = logits.argmax(-1).tolist()  # generate() (KV cache) vs one forward: should agree
            mismatches += [(len(tokens), i) for i, (a, b) in enumerate(zip(forced, ref)) if a != b]
            tokens.append(ref)
            margins.append(masked)
            raw_margins.append(raw)
    info = {"eos_token_ids": eos_ids, "teacher_forced_argmax_mismatches": mismatches,
            "generation_config": model.generation_config.to_diff_dict()}
    return tokens, margins, raw_margins, info


def make_lserve(path: pathlib.Path, dtype: str):
    from lserve import Engine

    engine = Engine(str(path), dtype=dtype, max_model_len=1024, num_threads=NUM_THREADS, show_progress=False)
    if engine.dtype != dtype:
        raise RuntimeError(f"asked lserve for dtype {dtype!r}, got {engine.dtype!r}")
    return engine


def run_lserve(engine, prompts, num_tokens: int) -> list:
    from lserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens)
    tokens = []
    for ids in prompts:  # one at a time, as the test: no batching effects
        out = engine.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        tokens.append(list(out.outputs[0].token_ids))
    return tokens


def run_llama_cpp(path: pathlib.Path, prompts, texts, num_tokens: int, masked_ids) -> tuple:
    """llama.cpp's low-level API: the prompt ids decoded as given (nothing prepended), then one token
    per llama_decode. llama_get_logits_ith returns the model's output row before any sampler runs; the
    argmax here, with masked_ids at -inf (min_tokens), is greedy without repetition penalty. Also
    llama.cpp's own tokenization of texts (add_special, parse_special), to show BOS/tokenizer gaps."""
    import llama_cpp

    from llama_cpp import _logger

    _logger.set_verbose(False)  # errors only
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    vocab = llama_cpp.llama_model_get_vocab(model)
    vocab_size = llama_cpp.llama_vocab_n_tokens(vocab)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 1024
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = NUM_THREADS
    if params.n_samplers != 0:  # backend samplers would make llama_get_logits_ith a sampled row
        raise RuntimeError("llama.cpp context has backend samplers: its logits would not be raw")
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(ids, start_pos: int) -> np.ndarray:
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(ids) - 1
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        row = llama_cpp.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(row, shape=(vocab_size,)).astype(np.float32)

    tokens, margins, raw_margins = [], [], []
    for ids in prompts:
        llama_cpp.llama_memory_clear(memory, True)
        logits = decode(ids, 0)
        out, rows = [], []
        for step in range(num_tokens):
            rows.append(logits)
            masked = logits.copy()
            masked[list(masked_ids)] = -np.inf
            out.append(int(np.argmax(masked)))
            if step + 1 < num_tokens:
                logits = decode([out[-1]], len(ids) + step)
        masked_margin, raw_margin = margins_of(np.stack(rows), masked_ids)
        tokens.append(out)
        margins.append(masked_margin)
        raw_margins.append(raw_margin)
    tokenized = []
    for text in texts:
        raw = text.encode()
        buffer = (llama_cpp.llama_token * (len(raw) + 8))()
        count = llama_cpp.llama_tokenize(vocab, raw, len(raw), buffer, len(buffer), True, True)
        if count < 0:
            raise RuntimeError(f"llama_tokenize failed on {text!r}")
        tokenized.append(list(buffer[:count]))
    eog_ids = [t for t in range(vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    info = {"vocab_size": vocab_size, "eog_token_ids": eog_ids, "type_k": int(params.type_k),
            "type_v": int(params.type_v), "flash_attn_type": int(params.flash_attn_type),
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return tokens, margins, raw_margins, info, tokenized


def compare(system: list, reference: list, margins, raw_margins) -> dict:
    parting = next((i for i, (a, b) in enumerate(zip(system, reference)) if a != b), None)
    if parting is None and len(system) != len(reference):  # one stopped early
        parting = min(len(system), len(reference))
    entry = {"identical": parting is None and len(system) == len(reference),
             "first_diff": parting, "common_prefix": len(reference) if parting is None else parting}
    if parting is not None and margins is not None and parting < len(margins):
        entry["ref_margin"] = margins[parting]
        entry["ref_raw_margin"] = raw_margins[parting]
    return entry


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    found = {}
    for name in ("lserve", "torch", "transformers", "gguf", "numpy", "llama_cpp_python"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: resolve smollm2-135m-instruct)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--limit", type=int, default=None, help="only the first K plain and first K chat prompts")
    parser.add_argument("--output", default=None, help="JSON report")
    args = parser.parse_args()
    if args.gguf is None:
        from lserve.models import resolve_model

        path = pathlib.Path(resolve_model("smollm2-135m-instruct").path)
    else:
        path = pathlib.Path(args.gguf)
    num_tokens = args.max_tokens
    load_before = os.getloadavg()[0]
    started = time.time()

    plain, chat, prompt_ids = load_test_prompts()
    if args.limit is not None:
        plain, chat = plain[:args.limit], chat[:args.limit]
    cases = [(text, False) for text in plain] + [(text, True) for text in chat]
    native = make_lserve(path, "native")
    prompts = [prompt_ids(native, text, is_chat) for text, is_chat in cases]
    # the text each prompt's ids encode (chat: the rendered template), for llama.cpp's own tokenizer
    texts = [native.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
             if is_chat else text for text, is_chat in cases]

    tokens, margins, raw_margins, info, seconds = {}, {}, {}, {}, {}
    clock = time.perf_counter()
    tokens["transformers"], margins["transformers"], raw_margins["transformers"], info["transformers"] = \
        run_transformers(path, prompts, num_tokens)
    seconds["transformers"] = time.perf_counter() - clock
    masked_ids = info["transformers"]["eos_token_ids"]
    info["native"] = {"eos_token_ids": sorted(native._core.config.eos_token_ids)}
    clock = time.perf_counter()
    tokens["native"] = run_lserve(native, prompts, num_tokens)
    seconds["native"] = time.perf_counter() - clock
    del native
    float32 = make_lserve(path, "float32")
    clock = time.perf_counter()
    tokens["float32"] = run_lserve(float32, prompts, num_tokens)
    seconds["float32"] = time.perf_counter() - clock
    del float32
    llama_ids = None
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        print(f"llama-cpp-python does not import ({error}): no llama.cpp column")
        info["llama.cpp"] = {"error": str(error)}
    else:
        clock = time.perf_counter()
        tokens["llama.cpp"], margins["llama.cpp"], raw_margins["llama.cpp"], info["llama.cpp"], llama_ids = \
            run_llama_cpp(path, prompts, texts, num_tokens, masked_ids)
        seconds["llama.cpp"] = time.perf_counter() - clock

    rows = []
    for index, ((text, is_chat), ids) in enumerate(zip(cases, prompts)):
        row = {"prompt": text, "chat": is_chat, "prompt_token_ids": ids,
               "tokens": {name: tokens[name][index] for name in tokens},
               "ref_margins": {name: margins[name][index] for name in margins}, "pairs": {}}
        if llama_ids is not None:
            row["llama_cpp_tokenize_same"] = llama_ids[index] == ids
            row["llama_cpp_tokenize"] = llama_ids[index]
        for system, reference in PAIRS:
            if system in tokens and reference in tokens:
                row["pairs"][f"{system} vs {reference}"] = compare(
                    tokens[system][index], tokens[reference][index], margins[reference][index],
                    raw_margins[reference][index])
        rows.append(row)
    summary = {}
    for system, reference in PAIRS:
        key = f"{system} vs {reference}"
        entries = [row["pairs"][key] for row in rows if key in row["pairs"]]
        if entries:
            parted = [e["ref_margin"] for e in entries if "ref_margin" in e]
            summary[key] = {"identical": sum(e["identical"] for e in entries), "num_prompts": len(entries),
                            "mean_common_prefix": float(np.mean([e["common_prefix"] for e in entries])),
                            "max_margin_at_parting": max(parted) if parted else None}

    header = "| prompt | " + " | ".join(f"{system} vs {reference}" for system, reference in PAIRS) + " |"
    print(f"\nSmolLM2-135M-Instruct Q4_1, {num_tokens} greedy tokens; cell: = identical, else "
          "first differing index @ reference's top-1 margin there\n")
    print(header)
    print("|" + "---|" * (len(PAIRS) + 1))
    for row in rows:
        cells = []
        for system, reference in PAIRS:
            entry = row["pairs"].get(f"{system} vs {reference}")
            if entry is None:
                cells.append("n/a")
            elif entry["identical"]:
                cells.append("=")
            else:
                margin = entry.get("ref_margin")
                cells.append(f"{entry['first_diff']} @ " + ("n/a" if margin is None else f"{margin:.3f}"))
        label = ("chat: " if row["chat"] else "") + row["prompt"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| **identical / prompts** | " + " | ".join(
        f"{summary[k]['identical']}/{summary[k]['num_prompts']}" if (k := f"{s} vs {r}") in summary else "n/a"
        for s, r in PAIRS) + " |")
    print("| **mean common prefix** | " + " | ".join(
        f"{summary[k]['mean_common_prefix']:.1f}" if (k := f"{s} vs {r}") in summary else "n/a"
        for s, r in PAIRS) + " |")
    print("| **largest margin at a parting** | " + " | ".join(
        "-" if (k := f"{s} vs {r}") not in summary or summary[k]["max_margin_at_parting"] is None
        else f"{summary[k]['max_margin_at_parting']:.3f}" for s, r in PAIRS) + " |")
    criterion = None
    if "native vs llama.cpp" in summary:  # issue 16: native agrees with llama.cpp at least as often as
        ours, theirs = (summary["native vs llama.cpp"]["identical"],  # llama.cpp with transformers
                        summary["llama.cpp vs transformers"]["identical"])
        criterion = {"native_vs_llama_cpp_identical": ours, "llama_cpp_vs_transformers_identical": theirs,
                     "met": ours >= theirs}
        print(f"\nnative = llama.cpp on {ours} prompts, llama.cpp = transformers on {theirs}: "
              f"criterion {'met' if ours >= theirs else 'NOT met'}")
    if llama_ids is not None:
        differing = [row["prompt"] for row in rows if not row["llama_cpp_tokenize_same"]]
        print(f"llama.cpp's own tokenization (add_special, parse_special) differs from the test's ids on "
              f"{len(differing)} of {len(rows)} prompts{': ' + ', '.join(map(repr, differing)) if differing else ''}")
    mismatches = info["transformers"]["teacher_forced_argmax_mismatches"]
    if mismatches:
        print(f"transformers: teacher-forced argmax differs from generate() at (prompt, position) {mismatches}")
    load_after = os.getloadavg()[0]
    print(f"\nload average (1 min) {load_before:.2f} -> {load_after:.2f}; seconds: "
          + ", ".join(f"{name} {value:.1f}" for name, value in seconds.items()))
    if args.output:
        report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  "command": " ".join([sys.executable] + sys.argv),
                  "machine": {"platform": platform.platform(), "cpu": cpu_model(), "num_cpus": os.cpu_count()},
                  "versions": versions(), "gguf": str(path), "max_tokens": num_tokens,
                  "num_threads": NUM_THREADS, "load_average_1min": {"before": load_before, "after": load_after},
                  "seconds": seconds, "systems": info, "summary": summary, "criterion": criterion, "prompts": rows}
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
