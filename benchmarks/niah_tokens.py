"""Greedy token ids of docs/ACCURACY.md's NIAH grid (SmolLM2, lserve sparse: prefill window 1024,
budget 1024, page_score="center", seed 0), to check that a change leaves sparse outputs as they were.

Usage: python benchmarks/niah_tokens.py --out after.json [--compare before.json]
(run once with the old build on PYTHONPATH, once with the new; --compare prints the cases that differ).
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", default=None, help="a JSON written by an earlier run")
    args = parser.parse_args()
    from lserve import Engine, SamplingParams
    from lserve.eval.niah import make_case, sparsity_for
    from lserve.models import resolve_model

    model = str(resolve_model("smollm2-135m-instruct").path)
    sparsity = sparsity_for("lserve", model, {"prefill_local_tokens": 1024, "decode_token_budget": 1024,
                                              "page_score": "center"})
    engine = Engine(model, show_progress=False, sparsity=sparsity)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    rows = []
    for length in (1024, 2048, 4096, 8192):
        for depth in (0, 0.25, 0.5, 0.75, 1):
            case = make_case(engine.tokenizer, min(length, engine.max_model_len - 16), depth, 0, 0, True)
            start = time.perf_counter()
            output = engine.generate([{"prompt_token_ids": case.prompt_token_ids}], params, use_tqdm=False)[0]
            rows.append({"length": length, "depth": depth, "tokens": list(output.outputs[0].token_ids),
                         "reply": output.outputs[0].text, "passkey": case.passkey,
                         "s": round(time.perf_counter() - start, 2)})
            print(rows[-1], flush=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=1)
    if args.compare:
        with open(args.compare, encoding="utf-8") as handle:
            before = json.load(handle)
        differ = [(b["length"], b["depth"]) for b, a in zip(before, rows) if b["tokens"] != a["tokens"]]
        print(f"{len(rows) - len(differ)} of {len(rows)} cases identical; differ: {differ}")


if __name__ == "__main__":
    main()
