"""Needle in a haystack (passkey retrieval): a seeded prompt generator, a scorer and a runner.

A case is (length, depth, sample): filler text (lserve.eval.haystack) of `length` prompt tokens in
all, a passkey sentence with a random 5-7 digit key placed at `depth` (0 = start, 1 = end, snapped
to a sentence boundary), and a question at the end. With a chat template the prompt is one user
turn and the assistant turn starts with "The pass key is"; without one, the plain text ends with
that phrase. Each case draws from its own `random.Random` keyed by (seed, length, depth, sample),
so a case never depends on which other cases run. A reply is correct when its first run of digits
is exactly the passkey.

Example:
    >>> case = make_case(engine.tokenizer, length=1024, depth=0.5, seed=0)
    >>> len(case.prompt_token_ids), case.passkey
    (1024, '4821937')
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from lserve.eval.haystack import filler_sentence

INSTRUCTION = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize "
               "it. I will ask you for the pass key.")
QUESTION = " What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"
_PLACEHOLDER = "\u0000HAYSTACK\u0000"


@dataclass
class NiahCase:
    length: int  # requested prompt tokens
    depth: float  # needle depth in [0, 1]
    sample: int
    passkey: str
    prompt_token_ids: List[int]
    needle_token_offset: int  # where the needle starts in prompt_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def score_reply(reply: str, passkey: str) -> bool:
    """True when the first run of digits in `reply` is exactly `passkey`."""
    match = re.search(r"\d+", reply)
    return match is not None and match.group(0) == passkey


def _frame(tokenizer, use_chat_template: bool):
    """(prefix_ids, suffix_ids) around the haystack: instruction before, question + answer start after."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": INSTRUCTION + _PLACEHOLDER + QUESTION}], add_generation_prompt=True)
        head, tail = rendered.split(_PLACEHOLDER)
        return (tokenizer.encode(head, add_special_tokens=False),
                tokenizer.encode(tail + ANSWER_PREFIX, add_special_tokens=False))
    head_ids = tokenizer.encode(INSTRUCTION, add_special_tokens=True)
    return head_ids, tokenizer.encode(QUESTION + " " + ANSWER_PREFIX, add_special_tokens=False)


def make_case(tokenizer, length: int, depth: float, seed: int = 0, sample: int = 0,
              use_chat_template: bool = True) -> NiahCase:
    """One passkey prompt of exactly `length` tokens (see the module docstring).

    tokenizer: anything with encode(text, add_special_tokens) (and, for chat, chat_template and
    apply_chat_template(messages, add_generation_prompt)), e.g. lserve's Tokenizer.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"niah:{seed}:{length}:{float(depth)!r}:{sample}")
    passkey = str(rng.randint(10_000, 9_999_999))
    prefix, suffix = _frame(tokenizer, use_chat_template)
    needle = tokenizer.encode(f" The pass key is {passkey}. Remember it. {passkey} is the pass key.",
                              add_special_tokens=False)
    budget = length - len(prefix) - len(suffix) - len(needle)
    if budget < 0:
        raise ValueError(f"length {length} is too short for the passkey frame "
                         f"({length - budget} tokens without any filler)")
    sentences: List[List[int]] = []
    total = 0
    while total < budget:
        ids = tokenizer.encode(" " + filler_sentence(rng), add_special_tokens=False)
        sentences.append(ids)
        total += len(ids)
    filler = [t for ids in sentences for t in ids][:budget]
    boundaries = [0]
    for ids in sentences:
        boundaries.append(min(budget, boundaries[-1] + len(ids)))
    target = depth * budget
    offset = min(boundaries, key=lambda b: (abs(b - target), b))
    prompt = prefix + filler[:offset] + needle + filler[offset:] + suffix
    return NiahCase(length=length, depth=depth, sample=sample, passkey=passkey, prompt_token_ids=prompt,
                    needle_token_offset=len(prefix) + offset)


def make_cases(tokenizer, lengths: Sequence[int], depths: Sequence[float], seed: int = 0,
               samples_per_cell: int = 1, use_chat_template: bool = True) -> List[NiahCase]:
    """The grid of cases, length-major."""
    return [make_case(tokenizer, length, depth, seed, sample, use_chat_template)
            for length in lengths for depth in depths for sample in range(samples_per_cell)]


def engine_accepts_sparsity(engine_cls) -> bool:
    import inspect

    try:
        return "sparsity" in inspect.signature(engine_cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def sparsity_for(name: str, model: str, overrides: Optional[Dict] = None):
    """SparsityConfig of a named config ("dense", "lserve"); overrides apply to non-dense ones."""
    from lserve.sparsity import SparsityConfig

    if name == "dense":
        return SparsityConfig.preset("dense")
    return SparsityConfig.preset(name, model=model, **(overrides or {}))


def run_niah(model: str, lengths: Sequence[int], depths: Sequence[float], configs: Sequence[str] = ("dense",),
             sparsity_args: Optional[Dict] = None, seed: int = 0, samples_per_cell: int = 1, max_tokens: int = 16,
             use_chat_template: bool = True, engine_kwargs: Optional[Dict] = None, engine_cls=None,
             log=print, on_result=None, recall: bool = False) -> Dict:
    """Runs every case under every sparsity config with greedy decoding; returns the results dict
    (see write_results). A config the Engine cannot run (no `sparsity=` parameter yet) is recorded
    as skipped. One Engine per config, with max_model_len covering the longest case.
    on_result(report_so_far) runs after every case (e.g. to save partial results of a long run).
    With recall=True, each case of a sparse config also records the selection recall of its page
    selection on the model's real queries and keys (eval/model_recall.py; needs torch and
    transformers)."""
    from lserve.sampling import SamplingParams

    if engine_cls is None:
        from lserve.engine import Engine as engine_cls
    supports_sparsity = engine_accepts_sparsity(engine_cls)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results: List[Dict] = []
    skipped: Dict[str, str] = {}

    def report() -> Dict:
        return {"model": model, "seed": seed, "lengths": list(lengths), "depths": list(depths),
                "configs": list(configs), "samples_per_cell": samples_per_cell, "max_tokens": max_tokens,
                "sparsity_args": sparsity_args or {}, "skipped": skipped, "results": results,
                "accuracy": accuracy_table(results), "recall": recall_table(results)}

    capture = None
    if recall and any(name != "dense" for name in configs):
        from lserve.eval.model_recall import QKCapture

        capture = QKCapture(model)

    for config_name in configs:
        sparsity = sparsity_for(config_name, model, sparsity_args)
        kwargs = dict(engine_kwargs or {})
        kwargs.setdefault("show_progress", False)
        if supports_sparsity:
            kwargs["sparsity"] = sparsity
        elif sparsity.enabled:
            skipped[config_name] = "this Engine has no sparsity= parameter yet (sparse attention not built in)"
            log(f"[niah] skipping {config_name!r}: {skipped[config_name]}")
            continue
        engine = engine_cls(model, **kwargs)
        limit = engine.max_model_len - max_tokens
        for length in lengths:
            effective = min(length, limit)
            if effective != length:
                log(f"[niah] length {length} is capped at {effective} prompt tokens (max_model_len "
                    f"{engine.max_model_len} - max_tokens {max_tokens})")
            for depth in depths:
                for sample in range(samples_per_cell):
                    case = make_case(engine.tokenizer, effective, depth, seed, sample, use_chat_template)
                    start = time.perf_counter()
                    output = engine.generate([{"prompt_token_ids": case.prompt_token_ids}], params,
                                             use_tqdm=False)[0]
                    seconds = time.perf_counter() - start
                    reply = output.outputs[0].text
                    correct = score_reply(reply, case.passkey)
                    row = {"config": config_name, "length": length, "depth": depth, "sample": sample,
                           "prompt_tokens": case.num_prompt_tokens, "passkey": case.passkey,
                           "reply": reply, "correct": correct, "seconds": round(seconds, 3)}
                    note = ""
                    if capture is not None and sparsity.enabled:
                        from lserve.eval.model_recall import model_selection_recall

                        measured = model_selection_recall(capture, case.prompt_token_ids, sparsity)
                        row["recall_mean"], row["recall_min"] = measured["mean"], measured["min"]
                        note = f", recall {measured['mean']:.3f} (min {measured['min']:.3f})"
                    results.append(row)
                    log(f"[niah] {config_name} len={length} depth={depth} sample={sample}: "
                        f"{'ok ' if correct else 'MISS'} {case.passkey} <- {reply.strip()[:40]!r} "
                        f"({seconds:.1f} s{note})")
                    if on_result is not None:
                        on_result(report())
        del engine
    return report()


def accuracy_table(results: Sequence[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{config: {length: {depth: accuracy}}} (JSON keys are strings) plus an "all" depth per length."""
    table: Dict[str, Dict[str, Dict[str, List[bool]]]] = {}
    for row in results:
        cell = table.setdefault(row["config"], {}).setdefault(str(row["length"]), {})
        cell.setdefault(str(row["depth"]), []).append(bool(row["correct"]))
        cell.setdefault("all", []).append(bool(row["correct"]))
    return {config: {length: {depth: sum(v) / len(v) for depth, v in cells.items()}
                     for length, cells in by_length.items()}
            for config, by_length in table.items()}


def recall_table(results: Sequence[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{config: {length: {"mean": mean recall, "min": lowest head recall}}} over the cases that
    measured recall."""
    table: Dict[str, Dict[str, List[Dict]]] = {}
    for row in results:
        if "recall_mean" in row:
            table.setdefault(row["config"], {}).setdefault(str(row["length"]), []).append(row)
    return {config: {length: {"mean": sum(r["recall_mean"] for r in rows) / len(rows),
                              "min": min(r["recall_min"] for r in rows)}
                     for length, rows in by_length.items()}
            for config, by_length in table.items()}


def write_results(path: str, report: Dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")


def plot_heatmap(report: Dict, path: str) -> bool:
    """Accuracy heatmaps (depth x length), one panel per config run. False (with nothing written)
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    configs = [c for c in report["configs"] if c in report["accuracy"]]
    if not configs:
        return False
    lengths, depths = report["lengths"], report["depths"]
    fig, axes = plt.subplots(1, len(configs), figsize=(1.5 + 1.4 * len(lengths) * len(configs), 3.6), squeeze=False)
    for index, (ax, config) in enumerate(zip(axes[0], configs)):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, length in enumerate(lengths):
            for i, depth in enumerate(depths):
                grid[i, j] = report["accuracy"][config].get(str(length), {}).get(str(depth), np.nan)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths] if index == 0 else [])
        ax.set_xlabel("prompt tokens")
        if index == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(config)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    model = str(report["model"]).rstrip("/").rsplit("/", 1)[-1]
    fig.suptitle(f"passkey retrieval: {model}", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
