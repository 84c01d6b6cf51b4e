#!/usr/bin/env python3
"""Markdown table of `lserve eval retrieval` JSONs: one row per file (and config in it), per-length means
over the tasks, the overall score, and the difference to the dense row when one is given.

Usage: python3 scripts/retrieval_table.py [--dense FILE] FILE [FILE ...]
  Each FILE is a retrieval JSON (scripts/gpu_retrieval.sh writes retrieval_SPLIT_NAME.json); the row
  is named after NAME. --dense names the file whose first config is the reference ("vs dense" column,
  in points).
"""
import argparse
import json
import os
import sys


def rows(path):
    report = json.load(open(path))
    name = os.path.basename(path)
    if name.startswith("retrieval_") and name.endswith(".json"):
        name = name[len("retrieval_"):-len(".json")].split("_", 1)[-1]
    for config, total in report["totals"].items():
        by_length = report["accuracy"][config]["all"]
        lengths = {k: v for k, v in by_length.items() if k != "all"}
        label = name if len(report["totals"]) == 1 else f"{name} ({config})"
        yield label, lengths, total["score"], total["num_cases"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default=None, help="the reference file")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    table = [row for path in args.files for row in rows(path)]
    reference = next(rows(args.dense))[2] if args.dense else None
    lengths = sorted({length for _, by_length, _, _ in table for length in by_length}, key=int)
    header = ["config", *(f"{int(length) // 1024}K" for length in lengths), "all", "cases"]
    if reference is not None:
        header.append("vs dense")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, by_length, score, cases in table:
        cells = [label, *(f"{by_length[length]:.3f}" if length in by_length else "" for length in lengths),
                 f"{score:.3f}", str(cases)]
        if reference is not None:
            cells.append(f"{100 * (score - reference):+.1f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
