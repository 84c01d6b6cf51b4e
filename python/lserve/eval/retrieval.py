"""`lserve eval retrieval`: the RULER-style task grid (eval/retrieval_tasks.py) under several sparsity
configs side by side, with per-step selection recall.

For each config, one Engine (greedy, max_tokens per task unless given) runs every case of the grid
task x length x index of one split; cases are built once with the first engine's tokenizer, so
every config sees the same token ids. A length above max_model_len - max_tokens is capped there.
The report (write_results) holds every case (prompt tokens, depth, answers, output, score, time),
accuracy per config x task x length with "all" rows and columns, totals, accuracy by depth bin
and, with recall=True, the selection recall of every sparse case at every answer token
(model_recall.model_selection_recall_steps): the reply teacher-forced is the dense config's reply
to the same case when dense ran, else the config's own. A config the Engine cannot run is
recorded as skipped.

Example:
    >>> report = run_retrieval("smollm2-135m-instruct", "dev", ["single_number", "multi_key"], [1024, 2048],
    ...                        samples=5, configs=["dense", "lserve"],
    ...                        sparsity_args={"prefill_local_tokens": 1024, "decode_token_budget": 1024})
    >>> report["totals"]["lserve"]["score"]
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional, Sequence

from lserve.eval.niah import engine_accepts_sparsity, sparsity_for
from lserve.eval.retrieval_tasks import (DEPTH_BINS, SPLITS, TASK_MAX_TOKENS, TASKS, PromptFormat, RetrievalCase,
                                         find_answer, make_case, score_output)

KNOWN_CONFIGS = ("dense", "lserve")


def check_grid(split: str, tasks: Sequence[str], lengths: Sequence[int], samples: int,
               configs: Sequence[str], max_tokens: Optional[int], variants: Optional[Dict] = None) -> None:
    """ValueError naming the first bad argument of run_retrieval."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if not tasks:
        raise ValueError("give at least one task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))} (known: {', '.join(TASKS)})")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks are listed twice: {list(tasks)}")
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive token counts, got {list(lengths)}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if not configs:
        raise ValueError("give at least one sparsity config")
    if variants is not None:
        if not isinstance(variants, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                      for k, v in variants.items()):
            raise ValueError("variants must map config names to JSON objects of SparsityConfig overrides")
        clash = [name for name in variants if name in KNOWN_CONFIGS or not name or "," in name]
        if clash:
            raise ValueError(f"variant names must be new, non-empty and without commas, got {clash}")
    known = list(KNOWN_CONFIGS) + list(variants or {})
    bad = [c for c in configs if c not in known]
    if bad:
        raise ValueError(f"unknown sparsity config(s) {', '.join(map(repr, bad))} (known: {', '.join(known)})")
    if len(set(configs)) != len(configs):
        raise ValueError(f"sparsity configs are listed twice: {list(configs)}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")


def shares_engines(engine_cls, engine_kwargs: Optional[Dict]) -> bool:
    """Whether run_retrieval may run several decode policies on one engine of engine_cls built with
    engine_kwargs: it has set_decode_sparsity and runs on the CPU (the CUDA backend refuses it)."""
    device = str((engine_kwargs or {}).get("device") or "cpu")
    return hasattr(engine_cls, "set_decode_sparsity") and device.split(":")[0] == "cpu"


def run_retrieval(model: str, split: str, tasks: Sequence[str], lengths: Sequence[int], samples: int = 5,
                  configs: Sequence[str] = ("dense", "lserve"), sparsity_args: Optional[Dict] = None,
                  max_tokens: Optional[int] = None, use_chat_template: bool = True,
                  engine_kwargs: Optional[Dict] = None, engine_cls=None, log=print, on_result=None,
                  recall: bool = False, variants: Optional[Dict[str, Dict]] = None) -> Dict:
    """Runs the grid (see the module docstring) and returns the report. max_tokens: tokens
    generated per case (None: the task's TASK_MAX_TOKENS). on_result(report_so_far) runs after
    every case and every recall measurement. recall=True needs torch and transformers.
    variants: more named configs, each the "lserve" preset with sparsity_args and then its own
    overrides. Sparse configs that differ only in decode-time fields (lserve.sparsity.DECODE_FIELDS)
    share one Engine on the CPU: each case runs under each of them in turn
    (Engine.set_decode_sparsity), and with prefix caching the prompt is prefilled once for all of
    them (rows with "shared_prefill": their "seconds" leave the prefill out); the tokens are those
    of one Engine per config (tests/sparse/test_sparse_engine.py checks it). Elsewhere each config
    gets its own Engine."""
    from lserve.sampling import SamplingParams

    from lserve.sparsity import layout_key

    tasks, lengths, configs = list(tasks), list(lengths), list(configs)
    check_grid(split, tasks, lengths, samples, configs, max_tokens, variants)
    if engine_cls is None:
        from lserve.engine import Engine as engine_cls
    supports_sparsity = engine_accepts_sparsity(engine_cls)
    results: List[Dict] = []
    skipped: Dict[str, str] = {}
    cases: Dict[tuple, RetrievalCase] = {}
    fmt: Optional[PromptFormat] = None
    tokenizer = None
    sparsities = {}

    def report() -> Dict:
        return {"model": model, "split": split, "tasks": tasks, "lengths": lengths, "samples": samples,
                "configs": configs, "sparsity_args": sparsity_args or {}, "variants": variants or {},
                "max_tokens": max_tokens, "use_chat_template": use_chat_template, "skipped": skipped,
                "results": results, **summarize(results)}

    # Groups of configs that share one Engine: dense alone, sparse ones by layout (CPU engines only:
    # set_decode_sparsity refuses the CUDA backend, whose decode graphs capture the settings).
    can_share = shares_engines(engine_cls, engine_kwargs)
    groups: List[List[str]] = []
    group_of_layout: Dict[tuple, List[str]] = {}
    for config_name in configs:
        overrides = dict(sparsity_args or {})
        if variants and config_name in variants:
            overrides.update(variants[config_name])
        sparsity = sparsity_for("lserve" if variants and config_name in variants else config_name, model, overrides)
        sparsities[config_name] = sparsity
        if not supports_sparsity and sparsity.enabled:
            skipped[config_name] = "this Engine has no sparsity= parameter yet (sparse attention not built in)"
            log(f"[retrieval] skipping {config_name!r}: {skipped[config_name]}")
            continue
        if not sparsity.enabled or not can_share:
            groups.append([config_name])
            continue
        from lserve.sparsity import resolve_sparsity

        layout = layout_key(resolve_sparsity(sparsity, model))
        if layout in group_of_layout:
            group_of_layout[layout].append(config_name)
        else:
            group_of_layout[layout] = [config_name]
            groups.append(group_of_layout[layout])

    for group in groups:
        kwargs = dict(engine_kwargs or {})
        kwargs.setdefault("show_progress", False)
        if supports_sparsity:
            kwargs["sparsity"] = sparsities[group[0]]
        engine = engine_cls(model, **kwargs)
        current = group[0]
        if fmt is None:
            fmt = PromptFormat.for_tokenizer(engine.tokenizer, use_chat_template)
            tokenizer = engine.tokenizer
        if len(group) > 1:
            log(f"[retrieval] one engine for {', '.join(group)} (decode-time settings switched per case)")
        for task in tasks:
            for length in lengths:
                for index in range(samples):
                    key = (task, length, index)
                    if key not in cases:
                        case_tokens = max_tokens or TASK_MAX_TOKENS[task]
                        effective = min(length, engine.max_model_len - case_tokens)
                        if effective != length and index == 0:
                            log(f"[retrieval] {task} length {length} is capped at {effective} prompt tokens "
                                f"(max_model_len {engine.max_model_len} - max_tokens {case_tokens})")
                        cases[key] = make_case(task, effective, split, index, fmt)
                    case = cases[key]
                    prompt_ids = fmt.encode(case.prompt)
                    params = SamplingParams(temperature=0.0, max_tokens=max_tokens or case.max_tokens)
                    for config_name in group:
                        if config_name != current:
                            engine.set_decode_sparsity(sparsities[config_name])
                            current = config_name
                        start = time.perf_counter()
                        output = engine.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0]
                        seconds = time.perf_counter() - start
                        completion = output.outputs[0]
                        score = score_output(case, completion.text)
                        results.append({
                            "config": config_name, "task": task, "length": length, "index": index,
                            "seed": case.seed, "depth": round(case.depth, 4),
                            "needle_depths": [round(d, 4) for d in case.needle_depths],
                            "prompt_tokens": len(prompt_ids), "answers": case.answers,
                            "distractors": case.distractors, "output": completion.text,
                            "output_token_ids": [int(t) for t in completion.token_ids],
                            "score": score, "seconds": round(seconds, 3),
                            # the prompt came from the group's first config's prefill (prefix cache)
                            "shared_prefill": config_name != group[0]})
                        log(f"[retrieval] {config_name} {task} len={length} #{index} depth={case.depth:.2f}: "
                            f"{score:.2f} {' '.join(case.answers)[:40]} <- {completion.text.strip()[:50]!r} "
                            f"({seconds:.1f} s)")
                        if on_result is not None:
                            on_result(report())
        del engine

    if recall and any(s.enabled for name, s in sparsities.items() if name not in skipped):
        from lserve.eval.model_recall import QKCapture, model_selection_recall_steps

        capture = QKCapture(model)
        dense_replies = {(r["task"], r["length"], r["index"]): r["output_token_ids"]
                         for r in results if r["config"] == "dense"}
        for row in results:
            sparsity = sparsities[row["config"]]
            if not sparsity.enabled:
                continue
            key = (row["task"], row["length"], row["index"])
            forced = dense_replies.get(key)
            row["recall_reply"] = "dense" if forced is not None else "own"
            forced = row["output_token_ids"] if forced is None else forced
            start = time.perf_counter()
            measured = model_selection_recall_steps(capture, fmt.encode(cases[key].prompt), forced, sparsity)
            row["recall_steps"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in step.items()}
                                   for step in measured["steps"]]
            row["recall_per_layer"] = [None if v is None else round(v, 5) for v in measured["per_layer"]]
            row["recall_answer_tokens"] = answer_token_range(tokenizer, forced, row["answers"][0])
            decode = [s["mean"] for s in measured["steps"][1:] if s["mean"] is not None]
            first = measured["steps"][0]["fresh_mean"]
            log(f"[retrieval] recall {row['config']} {row['task']} len={row['length']} #{row['index']}: first "
                f"{float('nan') if first is None else first:.3f}, decode steps mean "
                f"{(sum(decode) / len(decode)) if decode else float('nan'):.3f} "
                f"({time.perf_counter() - start:.1f} s)")
            if on_result is not None:
                on_result(report())
    return report()


def answer_token_range(tokenizer, token_ids: Sequence[int], answer: str) -> Optional[List[int]]:
    """[first, last] indices of the tokens of `token_ids` whose text holds the first occurrence of
    `answer` (as find_answer finds it), or None when the decoded text does not hold it."""
    ids = [int(t) for t in token_ids]
    text = tokenizer.decode(ids)
    start = find_answer(text, answer)
    if start < 0:
        return None
    ends = [len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))]  # text length after token k
    first = next(k for k, end in enumerate(ends) if end > start)
    last = next((k for k, end in enumerate(ends) if end >= start + len(answer)), len(ids) - 1)
    return [first, last]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarize(results: Sequence[Dict]) -> Dict:
    """The report's tables from its rows:
    accuracy {config: {task | "all": {length | "all": mean score}}} ("all" task: the mean over tasks
    of each task's mean, so every task weighs the same), totals {config: {"score", "num_cases"}},
    depth_accuracy {config: {bin "0.0-0.2": mean score}} (bins of the answer needle's depth) and
    recall {config: {length: per answer-token index lists "mean", "min", "fresh_mean", "stream_mean"
    (means over cases; min over cases and heads) and "num_cases", and "answer_mean": the mean over
    cases of each case's mean recall over the tokens of its first answer}} (JSON keys are strings)."""
    by_cell: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    by_depth: Dict[str, Dict[str, List[float]]] = {}
    for row in results:
        cells = by_cell.setdefault(row["config"], {}).setdefault(row["task"], {})
        cells.setdefault(str(row["length"]), []).append(row["score"])
        bin_idx = min(DEPTH_BINS - 1, int(row["depth"] * DEPTH_BINS))
        label = f"{bin_idx / DEPTH_BINS:.1f}-{(bin_idx + 1) / DEPTH_BINS:.1f}"
        by_depth.setdefault(row["config"], {}).setdefault(label, []).append(row["score"])
    accuracy: Dict[str, Dict[str, Dict[str, float]]] = {}
    totals: Dict[str, Dict[str, float]] = {}
    for config, by_task in by_cell.items():
        table = {task: {length: _mean(v) for length, v in cells.items()} for task, cells in by_task.items()}
        for task, cells in by_task.items():
            table[task]["all"] = _mean([s for v in cells.values() for s in v])
        lengths = sorted({length for cells in by_task.values() for length in cells}, key=int)
        table["all"] = {length: _mean([table[t][length] for t in by_task if length in table[t]]) for length in lengths}
        table["all"]["all"] = _mean([table[t]["all"] for t in by_task])
        accuracy[config] = table
        totals[config] = {"score": table["all"]["all"],
                          "num_cases": sum(len(v) for cells in by_task.values() for v in cells.values())}
    depth_accuracy = {config: {label: _mean(v) for label, v in sorted(bins.items())}
                      for config, bins in by_depth.items()}
    return {"accuracy": accuracy, "totals": totals, "depth_accuracy": depth_accuracy, "recall": recall_table(results)}


def recall_table(results: Sequence[Dict]) -> Dict:
    """{config: {length: {"mean", "min", "fresh_mean", "stream_mean": per answer-token index,
    "num_cases": per index, "answer_mean": over the answers' own tokens}}} over the rows that
    measured recall (see summarize)."""
    grouped: Dict[str, Dict[str, List[List[Dict]]]] = {}
    in_answer: Dict[str, Dict[str, List[float]]] = {}
    for row in results:
        steps = row.get("recall_steps")
        if not steps:
            continue
        span = row.get("recall_answer_tokens")
        if span:
            values = [s["mean"] for s in steps[span[0]:span[1] + 1] if s.get("mean") is not None]
            if values:
                in_answer.setdefault(row["config"], {}).setdefault(str(row["length"]), []).append(_mean(values))
        columns = grouped.setdefault(row["config"], {}).setdefault(str(row["length"]), [])
        while len(columns) < len(steps):
            columns.append([])
        for index, step in enumerate(steps):
            columns[index].append(step)
    table: Dict = {}
    for config, by_length in grouped.items():
        table[config] = {}
        for length, columns in by_length.items():
            def column_mean(name: str) -> List[Optional[float]]:
                out = []
                for steps in columns:
                    values = [s[name] for s in steps if s.get(name) is not None]
                    out.append(round(_mean(values), 5) if values else None)
                return out
            table[config][length] = {
                "mean": column_mean("mean"), "fresh_mean": column_mean("fresh_mean"),
                "stream_mean": column_mean("stream_mean"),
                "min": [min(s["min"] for s in steps if s.get("min") is not None) if any(
                    s.get("min") is not None for s in steps) else None for steps in columns],
                "num_cases": [len(steps) for steps in columns],
                "answer_mean": (round(_mean(in_answer[config][length]), 5)
                                if in_answer.get(config, {}).get(length) else None)}
    return table


def format_table(report: Dict) -> str:
    """The per-task x per-length accuracy table, configs side by side ("dense / lserve" per cell)."""
    configs = [c for c in report["configs"] if c in report["accuracy"]]
    if not configs:
        return "(no results)"
    lengths = [str(n) for n in report["lengths"]] + ["all"]
    rows = [t for t in report["tasks"]] + ["all"]
    width = max(len("task"), *(len(r) for r in rows))
    cell_width = max(len(" / ".join(configs)), 6 * len(configs) + 3 * (len(configs) - 1))
    lines = [f"accuracy ({' / '.join(configs)}), split {report['split']}, {report['samples']} case(s) per cell",
             f"{'task':<{width}}  " + "  ".join(f"{n:>{cell_width}}" for n in lengths)]
    for row in rows:
        cells = []
        for length in lengths:
            values = [report["accuracy"][c].get(row, {}).get(length) for c in configs]
            cells.append(" / ".join("  -  " if v is None else f"{v:.2f}".rjust(5) for v in values))
        lines.append(f"{row:<{width}}  " + "  ".join(f"{c:>{cell_width}}" for c in cells))
    totals = report["totals"]
    lines.append("total: " + ", ".join(f"{c} {totals[c]['score']:.3f} ({totals[c]['num_cases']} cases)"
                                       for c in configs))
    return "\n".join(lines)


def format_recall(report: Dict, max_steps: int = 12) -> str:
    """Mean selection recall by answer-token index, one line per (config, length)."""
    lines = []
    for config, by_length in report["recall"].items():
        for length, cells in sorted(by_length.items(), key=lambda item: int(item[0])):
            shown = cells["mean"][:max_steps]
            lines.append(f"{config} recall by answer token, {length} tokens: "
                         + " ".join("  -  " if v is None else f"{v:.3f}" for v in shown)
                         + (" ..." if len(cells["mean"]) > max_steps else "")
                         + (f" (first token, fresh selection: {cells['fresh_mean'][0]:.3f})"
                            if cells["fresh_mean"] and cells["fresh_mean"][0] is not None else "")
                         + (f"; over the answers' tokens: {cells['answer_mean']:.3f}"
                            if cells.get("answer_mean") is not None else ""))
    return "\n".join(lines)


def write_results(path: str, report: Dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")


def plot_heatmap(report: Dict, path: str) -> bool:
    """Accuracy heatmaps (task x length), one panel per config run, and with recall measured a last
    panel of mean selection recall by answer-token index (one line per config and length). False
    (with nothing written) when matplotlib is missing or nothing ran."""
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
    lengths, tasks = [str(n) for n in report["lengths"]] + ["all"], list(report["tasks"]) + ["all"]
    recall = report.get("recall") or {}
    num_panels = len(configs) + (1 if recall else 0)
    fig, axes = plt.subplots(1, num_panels, figsize=(2.5 + 1.1 * len(lengths) * len(configs) + (4.0 if recall else 0.0),
                                                     1.3 + 0.42 * len(tasks)), squeeze=False)
    for index, (ax, config) in enumerate(zip(axes[0], configs)):
        grid = np.full((len(tasks), len(lengths)), np.nan)
        for i, task in enumerate(tasks):
            for j, length in enumerate(lengths):
                value = report["accuracy"][config].get(task, {}).get(length)
                grid[i, j] = np.nan if value is None else value
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(tasks)), tasks if index == 0 else [])
        ax.set_xlabel("prompt tokens")
        ax.set_title(f"{config} ({report['totals'][config]['score']:.2f})")
        for i in range(len(tasks)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=axes[0][:len(configs)].tolist(), shrink=0.8, label="score")
    if recall:
        ax = axes[0][-1]
        for config, by_length in recall.items():
            for length, cells in sorted(by_length.items(), key=lambda item: int(item[0])):
                values = [np.nan if v is None else v for v in cells["mean"]]
                ax.plot(range(len(values)), values, marker=".", label=f"{config} {length}")
        ax.set_xlabel("answer token")
        ax.set_ylabel("selection recall (mean)")
        ax.set_ylim(0.0, 1.02)
        ax.set_title("dense mass in the pages read")
        ax.legend(fontsize=7)
    model = str(report["model"]).rstrip("/").rsplit("/", 1)[-1]
    fig.suptitle(f"retrieval ({report['split']} split): {model}", fontsize=10, y=1.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
