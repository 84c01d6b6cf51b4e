"""Which page-selection rule keeps the attention mass a retrieval answer needs? (issue 12, diagnosis)

For retrieval cases of `lserve eval retrieval` (dev split by default), transformers runs SmolLM2 once
per case (fp32) with the gold answer teacher-forced after the prompt, recording every layer's
post-RoPE keys and the query of each answer token (eval/model_recall.QKCapture). Page statistics
(kmax/kmin of 16-token logical pages in 64-token physical pages) grow one key per step as in the
engine. For each candidate rule, a numpy model selects pages at each answer step (fresh every
`reuse` steps, in between the stored pages plus every page since the base, as PageSelector does)
and the recall of every dense query head is the share of its dense attention probability inside
the pages read. Streaming heads: the share of their mass inside sink + local (prefill window at
the first answer token, decode window after).

Rules: score "bound" (sum_d max(q kmax, q kmin), the paper's) or "center" (q . (kmax + kmin)/2);
group aggregation over the query heads of a KV head: "sum" (today's: max over logical pages of the
summed score), "max" (the best head's page score), "mass" (each head's page scores turned into a
softmax over pages at scale 1/sqrt(d), summed over heads: every head gets a say proportional to
how peaked it is). "oracle": the top pages by true attention mass summed over the group (an
upper bound for any group-shared selection).

Usage: python benchmarks/selection_study.py --lengths 2048,4096 --samples 2 --out /tmp/study.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Dict, List

import numpy as np


def logical_scores(q: np.ndarray, kmax: np.ndarray, kmin: np.ndarray, spread: float) -> np.ndarray:
    """q (G, D); kmax/kmin (L, D) -> (G, L) per head logical page scores: q . centre + spread * |q| . radius
    (spread 0: "center", 1: "bound")."""
    s = q @ (0.5 * (kmax + kmin)).T
    if spread:
        s = s + spread * (np.abs(q) @ (0.5 * (kmax - kmin)).T)
    return s


def page_mass(probs: np.ndarray, page_size: int) -> np.ndarray:
    num_keys = probs.shape[1]
    num_pages = -(-num_keys // page_size)
    padded = np.zeros((probs.shape[0], num_pages * page_size))
    padded[:, :num_keys] = probs
    return padded.reshape(probs.shape[0], num_pages, page_size).sum(axis=2)


def select(q: np.ndarray, kmax: np.ndarray, kmin: np.ndarray, num_keys: int, page_size: int, logical: int,
           num_select: int, spread: float, aggregate: str, probs: np.ndarray = None,
           memory: np.ndarray = None):
    """(page positions selected for one KV head: forced newest and first page, then the best; the page
    scores they were ranked by, None when every page fits). memory: "sticky"'s decayed earlier scores."""
    num_pages = -(-num_keys // page_size)
    if num_pages <= num_select:
        return np.arange(num_pages), None
    per = page_size // logical
    num_logical = -(-num_keys // logical)
    if aggregate == "oracle":
        agg = page_mass(probs, page_size).sum(axis=0)
    else:
        s = logical_scores(q, kmax[:num_logical], kmin[:num_logical], spread)  # (G, num_logical)
        full = np.full((q.shape[0], num_pages * per), -np.inf)
        full[:, :num_logical] = s
        full = full.reshape(q.shape[0], num_pages, per)
        if aggregate == "sum":
            agg = full.sum(axis=0).max(axis=1)  # today's op: max over logical of the group sum
        elif aggregate == "max":
            agg = full.max(axis=2).max(axis=0)
        elif aggregate in ("pmax", "sticky"):
            z = full.max(axis=2) / np.sqrt(q.shape[1])  # (G, P)
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            agg = (p / p.sum(axis=1, keepdims=True)).max(axis=0)
            if aggregate == "sticky" and memory is not None:
                agg = agg.copy()
                agg[:len(memory)] = np.maximum(agg[:len(memory)], memory)
        elif aggregate == "mass":
            z = full.max(axis=2) / np.sqrt(q.shape[1])  # (G, P)
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            agg = (p / p.sum(axis=1, keepdims=True)).sum(axis=0)
        else:
            raise ValueError(aggregate)
    forced = np.zeros(num_pages, dtype=bool)
    forced[[0, num_pages - 1]] = True
    order = np.lexsort((np.arange(num_pages), -agg, ~forced))
    return np.sort(order[:num_select]), agg


def study_case(records, num_prompt: int, num_steps: int, streaming: np.ndarray, rules: List[Dict], sparsity,
               needle: np.ndarray) -> Dict:
    """needle: bool (num_prompt,) marking the answer needles' tokens."""
    from lserve.eval.recall import attention_probs

    page_size, logical = sparsity.physical_page_size, sparsity.logical_page_size
    num_select = sparsity.decode_token_budget // page_size
    recalls = {rule["name"]: [[] for _ in range(num_steps)] for rule in rules}
    # Mass on the needle tokens: kept by the pages read / in dense attention, summed over dense heads
    # and answer steps (steps >= 1); for streaming heads, kept by their window.
    needle_kept = {rule["name"]: 0.0 for rule in rules}
    needle_total = 0.0
    stream_needle = [0.0, 0.0]
    stream_mass = [[] for _ in range(num_steps)]
    for layer in sorted(records):
        queries, keys = records[layer]
        num_kv_heads = keys.shape[1]
        group = queries.shape[1] // num_kv_heads
        for h in range(num_kv_heads):
            rows = slice(h * group, (h + 1) * group)
            k = keys[:, h].astype(np.float64)
            # Keys in logical pages of every size a rule asks for; a step reads the pages its keys fill
            # (the newest logical page's bounds grow token by token: recomputed per step below).
            sizes = sorted({rule.get("logical", logical) for rule in rules})
            bounds_by_size = {}
            for size in sizes:
                n = -(-len(k) // size)
                kp = np.zeros((n * size, k.shape[1]))
                kp[:len(k)] = k
                bounds_by_size[size] = kp.reshape(n, size, -1)
            memory = {}  # per rule (sticky): the decayed page scores of the last fresh selection
            stored = {}  # per rule: (pages, pages when selected, steps since) of the last fresh selection
            for step in range(num_steps):
                position = num_prompt - 1 + step
                num_keys = position + 1
                probs = attention_probs(queries[step][rows], keys[:num_keys, h:h + 1])
                if streaming[layer, h]:
                    window = step == 0
                    sink = sparsity.prefill_sink_tokens if window else sparsity.decode_sink_tokens
                    local = sparsity.prefill_local_tokens if window else sparsity.decode_local_tokens
                    idx = np.arange(num_keys)
                    seen = (idx < sink) | (idx > position - local)
                    stream_mass[step].append(probs[:, seen].sum(axis=1))
                    if step > 0:
                        stream_needle[0] += float(probs[:, :num_prompt][:, needle & seen[:num_prompt]].sum())
                        stream_needle[1] += float(probs[:, :num_prompt][:, needle].sum())
                    continue
                stats = {}
                for size in sizes:
                    last = (num_keys - 1) // size
                    kmax = bounds_by_size[size][:last + 1].max(axis=1)
                    kmin = bounds_by_size[size][:last + 1].min(axis=1)
                    tail = k[last * size:num_keys]
                    kmax[last], kmin[last] = tail.max(axis=0), tail.min(axis=0)
                    stats[size] = (kmax, kmin)
                mass = page_mass(probs, page_size)
                on_needle = np.zeros(num_keys, dtype=bool)
                on_needle[:num_prompt] = needle
                needle_probs = np.where(on_needle, probs, 0.0)
                needle_page_mass = page_mass(needle_probs, page_size).sum(axis=0)
                if step > 0:
                    needle_total += float(needle_page_mass.sum())
                num_pages = mass.shape[1]
                for rule in rules:
                    name = rule["name"]
                    if step == 0:
                        recalls[name][step].append(np.ones(group))  # prefill: every page
                        continue
                    last_fresh = stored.get(name)
                    if num_pages <= num_select:
                        pages = np.arange(num_pages)
                        stored[name] = None
                    elif last_fresh is None or last_fresh[2] >= rule["reuse"]:
                        size = rule.get("logical", logical)
                        pages, scores = select(queries[step][rows].astype(np.float64), *stats[size], num_keys,
                                               page_size, size, num_select, rule["spread"], rule["aggregate"],
                                               probs, memory=memory.get(name))
                        memory[name] = rule.get("decay", 0.5) * scores  # scores: never None here
                        stored[name] = (pages, num_pages, 1)
                    else:
                        pages = np.union1d(last_fresh[0], np.arange(last_fresh[1], num_pages))
                        stored[name] = (last_fresh[0], last_fresh[1], last_fresh[2] + 1)
                    recalls[name][step].append(mass[:, pages].sum(axis=1) / mass.sum(axis=1))
                    needle_kept[name] += float(needle_page_mass[pages].sum())
    result = {}
    for name, per_step in recalls.items():
        steps = [np.concatenate(v) for v in per_step]
        answer = np.concatenate(steps[1:]) if num_steps > 1 else steps[0]
        result[name] = {"mean": float(answer.mean()), "p10": float(np.percentile(answer, 10)),
                        "below_half": float((answer < 0.5).mean()),
                        "by_step": [round(float(s.mean()), 4) for s in steps],
                        "needle": needle_kept[name] / max(needle_total, 1e-30)}
    stream = [np.concatenate(v) for v in stream_mass if v]
    result["_needle_mass"] = needle_total
    result["_stream"] = {"needle": stream_needle[0] / max(stream_needle[1], 1e-30),
                         "first": float(stream[0].mean()) if stream else None,
                         "decode": float(np.concatenate(stream[1:]).mean()) if len(stream) > 1 else None}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--tasks", default="")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--max-answer-tokens", type=int, default=24)
    parser.add_argument("--rules", default="scores", choices=["scores", "pages"],
                        help="scores: round 1 (score x group rule x reuse); pages: round 2 (logical page size, "
                             "per-head page softmax, sticky scores)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from lserve.eval.model_recall import QKCapture
    from lserve.eval.retrieval_tasks import TASKS, PromptFormat, make_case
    from lserve.model_loading import load_model_source
    from lserve.sparsity import SparsityConfig

    tokenizer = load_model_source(args.model).tokenizer
    fmt = PromptFormat.for_tokenizer(tokenizer)
    sparsity = SparsityConfig.preset("lserve", model=args.model, prefill_local_tokens=1024,
                                     decode_token_budget=args.budget)
    capture = QKCapture(args.model)
    num_layers = capture.model.config.num_hidden_layers
    num_kv_heads = capture.model.config.num_key_value_heads
    streaming = np.asarray(sparsity.streaming_mask(num_layers, num_kv_heads), dtype=bool)
    if args.rules == "pages":  # issue 12, round 2: logical page size, per-head page softmax, sticky scores
        rules = [dict(name=f"s{spread}/max/l{size}", spread=spread, aggregate="max", reuse=4, logical=size)
                 for spread, size in itertools.product((0.0, 0.25), (16, 8, 4))]
        rules += [dict(name=f"s0.25/{agg}/l{size}", spread=0.25, aggregate=agg, reuse=4, logical=size)
                  for agg, size in itertools.product(("pmax", "sticky"), (16, 8))]
        rules += [dict(name="s0.25/sticky.8/l8", spread=0.25, aggregate="sticky", reuse=4, logical=8, decay=0.8)]
        rules += [dict(name="oracle/r4", spread=0.0, aggregate="oracle", reuse=4)]
    else:  # round 1
        rules = [dict(name=f"s{spread}/{aggregate}/r4", spread=spread, aggregate=aggregate, reuse=4)
                 for spread, aggregate in itertools.product((0.0, 0.125, 0.25, 0.5, 1.0), ("sum", "max", "mass"))]
        rules += [dict(name=f"s0.0/sum/r{reuse}", spread=0.0, aggregate="sum", reuse=reuse) for reuse in (1, 2)]
        rules += [dict(name="oracle/r4", spread=0.0, aggregate="oracle", reuse=4)]
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    rows = []
    for task, length, index in itertools.product(tasks, [int(x) for x in args.lengths.split(",")],
                                                  range(args.samples)):
        case = make_case(task, length, args.split, index, fmt)
        prompt_ids = fmt.encode(case.prompt)
        answer_ids = tokenizer.encode(" " + ", ".join(case.answers), add_special_tokens=False)
        answer_ids = answer_ids[:args.max_answer_tokens]
        num_steps = len(answer_ids)
        start = time.perf_counter()
        records = capture.capture_positions(prompt_ids + answer_ids[:-1],
                                            [len(prompt_ids) - 1 + i for i in range(num_steps)])
        needle = np.zeros(len(prompt_ids), dtype=bool)
        for which in case.answer_needles:
            first, last = case.needle_spans[which]
            lo, hi = len(fmt.encode(case.prompt[:first])), len(fmt.encode(case.prompt[:last]))
            needle[max(lo - 1, 0):min(hi + 1, len(prompt_ids))] = True
        result = study_case(records, len(prompt_ids), num_steps, streaming, rules, sparsity, needle)
        rows.append({"task": task, "length": length, "index": index, "depth": case.depth,
                     "prompt_tokens": len(prompt_ids), "answer_tokens": num_steps, **result})
        print(f"{task} {length} #{index} ({time.perf_counter() - start:.0f} s) needle mass {result['_needle_mass']:.2f} "
              f"stream {result['_stream']} " +
              " ".join(f"{r['name']}={result[r['name']]['mean']:.3f}/{result[r['name']]['needle']:.3f}"
                       for r in rules), flush=True)
        with open(args.out, "w") as f:
            json.dump({"budget": args.budget, "split": args.split, "rows": rows}, f, indent=1)
    print("\nmean recall over answer tokens (all cases) | p10 | share of (head, step) below 0.5 | needle mass kept"
          " (mean over cases) | worst case")
    rows = [r for r in rows if r["_needle_mass"] > 0.5] or rows  # cases whose answer needs decode steps
    for rule in rules:
        name = rule["name"]
        print(f"{name:18s} {np.mean([r[name]['mean'] for r in rows]):.4f} "
              f"{np.mean([r[name]['p10'] for r in rows]):.4f} {np.mean([r[name]['below_half'] for r in rows]):.4f} "
              f"{np.mean([r[name]['needle'] for r in rows]):.4f} {np.min([r[name]['needle'] for r in rows]):.4f}")
    print(f"streaming heads: needle mass kept by the decode window {np.mean([r['_stream']['needle'] for r in rows]):.4f}")


if __name__ == "__main__":
    main()
