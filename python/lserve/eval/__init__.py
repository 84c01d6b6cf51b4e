"""`lserve eval ...`: accuracy harnesses. `lserve eval niah` runs needle-in-a-haystack / passkey
retrieval over lengths x depths x sparsity configs (eval/niah.py); `lserve eval retrieval` runs
RULER-style tasks (eval/retrieval_tasks.py) over tasks x lengths of a dev or heldout split, dense and
sparse side by side (eval/retrieval.py); eval/recall.py and eval/model_recall.py measure how much
dense attention mass a page selection keeps.

    lserve eval niah --model smollm2-135m-instruct --lengths 1024,2048 --depths 0,0.5,1 \
        --sparsity dense,lserve --out results.json --plot heatmap.png
    lserve eval retrieval --model smollm2-135m-instruct --split dev --lengths 1024,2048 --samples 5 \
        --sparsity dense,lserve --recall --out retrieval.json --plot retrieval.png
"""
from __future__ import annotations

import argparse
import json

from lserve.extras import require_extra


def _int_list(text: str):
    return [int(v) for v in text.split(",") if v.strip()]


def _float_list(text: str):
    return [float(v) for v in text.split(",") if v.strip()]


def _names(text: str):
    return [v.strip() for v in text.split(",") if v.strip()]


def _sparsity_overrides(text):
    """The --sparsity-args JSON object, or None."""
    if not text:
        return None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--sparsity-args is not JSON: {error}") from None
    if not isinstance(overrides, dict):
        raise ValueError("--sparsity-args must be a JSON object")
    return overrides


def _variants(text):
    """The --variants JSON object (or @FILE holding one): config name -> SparsityConfig overrides."""
    if not text:
        return None
    source = "--variants"
    if text.startswith("@"):
        source = text[1:]
        try:
            with open(source) as f:
                text = f.read()
        except OSError as error:
            raise ValueError(f"--variants: cannot read {source}: {error}") from None
    try:
        variants = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not JSON: {error}") from None
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError(f"{source} must be a JSON object of name -> object of SparsityConfig overrides")
    return variants


def add_eval_parser(commands) -> argparse.ArgumentParser:
    """Registers `eval` and its harnesses on the CLI's subparsers."""
    parser = commands.add_parser("eval", help="accuracy harnesses", description="lserve accuracy harnesses.")
    harnesses = parser.add_subparsers(dest="harness", metavar="HARNESS")
    harnesses.required = True
    niah = harnesses.add_parser(
        "niah", help="needle in a haystack / passkey retrieval",
        description="Greedy passkey retrieval over prompt lengths x needle depths x sparsity configs; "
                    "writes per-case results and accuracies as JSON and, with matplotlib, a heatmap.")
    niah.add_argument("--model", default="smollm2-135m-instruct",
                      help="model name, .gguf file or Hugging Face directory (default: %(default)s)")
    niah.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192],
                      help="prompt lengths in tokens, comma-separated (default: 1024,2048,4096,8192)")
    niah.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                      help="needle depths in [0, 1], comma-separated (default: 0,0.25,0.5,0.75,1)")
    niah.add_argument("--sparsity", default="dense", help="configs, comma-separated: dense, lserve (default: dense)")
    niah.add_argument("--sparsity-args", default=None,
                      help="JSON object of SparsityConfig overrides for the non-dense configs")
    niah.add_argument("--samples", type=int, default=1, help="passkeys per (length, depth) cell (default: 1)")
    niah.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    niah.add_argument("--max-tokens", type=int, default=16, help="tokens generated per case (default: %(default)s)")
    niah.add_argument("--no-chat-template", action="store_true", help="plain text prompts even for chat models")
    niah.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    niah.add_argument("--threads", type=int, default=0, help="engine CPU threads, 0 = all cores")
    niah.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill chunk (default: %(default)s)")
    niah.add_argument("--out", default="niah.json",
                      help="results JSON, rewritten after every case (default: %(default)s)")
    niah.add_argument("--plot", default=None, help="heatmap PNG (needs matplotlib)")
    niah.add_argument("--recall", action="store_true",
                      help="also measure each sparse case's selection recall on the model's queries and keys "
                           "(needs torch and transformers)")
    niah.add_argument("--quiet", action="store_true", help="no per-case lines")
    niah.set_defaults(handler=_niah)
    _add_retrieval_parser(harnesses)
    return parser


def _add_retrieval_parser(harnesses) -> None:
    from lserve.eval.retrieval_tasks import TASKS

    retrieval = harnesses.add_parser(
        "retrieval", help="RULER-style retrieval tasks, dense and sparse side by side",
        description="Synthetic retrieval tasks (single needle with number / word / UUID values, multi-key, "
                    "multi-value, multi-query, variable tracking) in varied generated haystacks, built "
                    "deterministically per (split, task, length, index): 'dev' to tune on, 'heldout' to report "
                    "(disjoint seeds and needle values). Every sparsity config runs the same cases with greedy "
                    "decoding; writes per-case outputs and scores, a task x length table and totals as JSON, "
                    "prints the table and, with matplotlib, draws a heatmap.")
    retrieval.add_argument("--model", default="smollm2-135m-instruct",
                           help="model name, .gguf file or Hugging Face directory (default: %(default)s)")
    retrieval.add_argument("--split", default="dev", help="dev (tune on it) or heldout (report only) (default: dev)")
    retrieval.add_argument("--tasks", type=_names, default=list(TASKS),
                           help=f"tasks, comma-separated, or 'all' (default: all = {','.join(TASKS)})")
    retrieval.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096, 8192],
                           help="prompt lengths in tokens, comma-separated (default: 1024,2048,4096,8192); a "
                                "length above max_model_len - max_tokens is capped there")
    retrieval.add_argument("--samples", type=int, default=5,
                           help="cases per (task, length); five consecutive cases cover the five depth bins "
                                "(default: %(default)s)")
    retrieval.add_argument("--sparsity", type=_names, default=["dense", "lserve"],
                           help="configs run side by side, comma-separated: dense, lserve and --variants names (default: dense,lserve)")
    retrieval.add_argument("--sparsity-args", default=None,
                           help="JSON object of SparsityConfig overrides for the non-dense configs, e.g. "
                                "'{\"prefill_local_tokens\": 1024, \"decode_token_budget\": 1024}'")
    retrieval.add_argument("--variants", default=None,
                           help="JSON object (or @FILE) naming more configs for --sparsity: name -> SparsityConfig "
                                "overrides on top of the lserve preset and --sparsity-args, e.g. "
                                "'{\"rec64\": {\"select_recent_tokens\": 64}}'. Sparse configs that differ only in "
                                "decode-time settings share one engine and each prompt is prefilled once for all "
                                "of them (Engine.set_decode_sparsity with the prefix cache)")
    retrieval.add_argument("--max-tokens", type=int, default=None,
                           help="tokens generated per case (default: per task, 12 to 48)")
    retrieval.add_argument("--no-chat-template", action="store_true", help="plain text prompts even for chat models")
    retrieval.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    retrieval.add_argument("--threads", type=int, default=0, help="engine CPU threads, 0 = all cores")
    retrieval.add_argument("--max-num-batched-tokens", type=int, default=2048,
                           help="prefill chunk (default: %(default)s)")
    retrieval.add_argument("--out", default="retrieval.json",
                           help="results JSON, rewritten after every case (default: %(default)s)")
    retrieval.add_argument("--plot", default=None, help="task x length heatmap PNG (needs matplotlib)")
    retrieval.add_argument("--recall", action="store_true",
                           help="also measure each sparse case's selection recall at every generated token: the "
                                "dense config's reply (else the case's own) is teacher-forced through the model "
                                "in transformers (needs torch and transformers; one fp32 forward pass of the "
                                "prompt plus reply per sparse case, then the engine's page selection and reuse "
                                "rule replayed per step and layer), reported by answer-token index")
    retrieval.add_argument("--quiet", action="store_true", help="no per-case lines")
    retrieval.set_defaults(handler=_retrieval)


def _retrieval(args: argparse.Namespace) -> int:
    from lserve.eval.retrieval import (check_grid, format_recall, format_table, plot_heatmap, run_retrieval,
                                       write_results)
    from lserve.eval.retrieval_tasks import TASKS

    tasks = list(TASKS) if args.tasks == ["all"] else args.tasks
    variants = _variants(args.variants)
    check_grid(args.split, tasks, args.lengths, args.samples, args.sparsity, args.max_tokens, variants)
    overrides = _sparsity_overrides(args.sparsity_args)
    engine_kwargs = dict(device=args.device, num_threads=args.threads,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=1)
    report = run_retrieval(args.model, args.split, tasks, args.lengths, samples=args.samples, configs=args.sparsity,
                           sparsity_args=overrides, max_tokens=args.max_tokens,
                           use_chat_template=not args.no_chat_template, engine_kwargs=engine_kwargs,
                           log=(lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True)),
                           on_result=lambda partial: write_results(args.out, partial), recall=args.recall,
                           variants=variants)
    write_results(args.out, report)
    print(format_table(report))
    if report["recall"]:
        print(format_recall(report))
    for config, reason in report["skipped"].items():
        print(f"{config}: skipped ({reason})")
    print(f"wrote {args.out}")
    if args.plot:
        if plot_heatmap(report, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("no heatmap: matplotlib is not installed (pip install 'lserve[eval]') or nothing ran")
    return 0


def _niah(args: argparse.Namespace) -> int:
    from lserve.eval.niah import plot_heatmap, run_niah, write_results

    if args.plot:
        require_extra("eval", "lserve eval niah --plot", ["matplotlib"])
    if args.recall:
        require_extra("eval", "lserve eval niah --recall", ["torch", "transformers", "gguf"])

    configs = [c.strip() for c in args.sparsity.split(",") if c.strip()]
    for config in configs:
        if config not in ("dense", "lserve"):
            raise ValueError(f"unknown sparsity config {config!r} (known: dense, lserve)")
    if not args.lengths or not args.depths:
        raise ValueError("--lengths and --depths need at least one value each")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise ValueError(f"--depths must lie in [0, 1], got {args.depths}")
    if args.samples < 1 or args.max_tokens < 1:
        raise ValueError("--samples and --max-tokens must be >= 1")
    overrides = _sparsity_overrides(args.sparsity_args)
    engine_kwargs = dict(device=args.device, num_threads=args.threads,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=1)
    report = run_niah(args.model, args.lengths, args.depths, configs, sparsity_args=overrides, seed=args.seed,
                      samples_per_cell=args.samples, max_tokens=args.max_tokens,
                      use_chat_template=not args.no_chat_template, engine_kwargs=engine_kwargs,
                      log=(lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True)),
                      on_result=lambda partial: write_results(args.out, partial), recall=args.recall)
    write_results(args.out, report)
    for config, by_length in report["accuracy"].items():
        print(f"{config}: " + ", ".join(f"{length}: {cells['all']:.2f}" for length, cells in by_length.items()))
    for config, by_length in report["recall"].items():
        print(f"{config} selection recall: " + ", ".join(f"{length}: {cells['mean']:.3f} (min {cells['min']:.3f})"
                                                          for length, cells in by_length.items()))
    for config, reason in report["skipped"].items():
        print(f"{config}: skipped ({reason})")
    print(f"wrote {args.out}")
    if args.plot:
        if plot_heatmap(report, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("no heatmap: matplotlib is not installed (pip install 'lserve[eval]')")
    return 0
