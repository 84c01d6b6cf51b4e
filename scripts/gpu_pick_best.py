#!/usr/bin/env python3
"""Pick the dev split's best sparsity config from scripts/gpu_retrieval.sh's JSONs, for the heldout run.

Usage: python3 scripts/gpu_pick_best.py DEV_DIR SPEC [SPEC ...]
  SPEC is NAME=ARGS as given to gpu_retrieval.sh. Candidates: every NAME except "dense" and names
  starting with "abl_" (ablations, reported but never shipped). The best mean dev score wins; ties go
  to the earlier SPEC. Prints the winner's SPEC and, with --budget N, the same config with
  decode_token_budget N under NAME_bN (one SPEC per line), so the heldout call runs exactly the
  config the dev split chose, without a person in between.
"""
import argparse
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dev_dir")
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--budget", type=int, action="append", default=[],
                        help="also print the winner with this decode_token_budget")
    args = parser.parse_args()
    best = None
    for spec in args.specs:
        name, _, config = spec.partition("=")
        if name == "dense" or name.startswith("abl_"):
            continue
        path = os.path.join(args.dev_dir, f"retrieval_dev_{name}.json")
        try:
            report = json.load(open(path))
        except (OSError, ValueError) as error:
            print(f"skip {name}: {error}", file=sys.stderr)
            continue
        score = next(iter(report["totals"].values()))["score"]
        print(f"dev {name}: {score:.4f}", file=sys.stderr)
        if best is None or score > best[0]:
            best = (score, name, config)
    if best is None:
        print("no dev results", file=sys.stderr)
        return 1
    _, name, config = best
    print(f"{name}={config}")
    for budget in args.budget:
        settings = json.loads(config)
        settings["decode_token_budget"] = budget
        print(f"{name}_b{budget}={json.dumps(settings, separators=(',', ':'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
