"""`lserve calibrate`: DuoAttention gate calibration (which KV heads stream) with torch + transformers.

    lserve calibrate --model smollm2-135m-instruct --out pattern.tsv --seq-len 1024 --steps 100

Importing this package stays light; torch and transformers load when a calibration runs.
"""
from __future__ import annotations

import argparse

from lserve.calibrate.trainer import CALIBRATE_MODULES, CalibrationConfig, CalibrationResult, calibrate, calibrate_gates
from lserve.extras import require_extra

__all__ = ["CalibrationConfig", "CalibrationResult", "calibrate", "calibrate_gates", "add_calibrate_parser"]


def add_calibrate_parser(commands) -> argparse.ArgumentParser:
    """Registers `calibrate` on the CLI's subparsers."""
    defaults = CalibrationConfig()
    parser = commands.add_parser(
        "calibrate", help="find streaming heads (DuoAttention gate training)",
        description="Train one gate per (layer, KV head) mixing full and streaming (sink + local) attention, "
                    "with the base weights frozen, on synthetic passkey retrieval; write the gates as a "
                    "head-pattern TSV (higher = needs full attention).")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model name, .gguf file or Hugging Face directory (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output TSV path")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per sample (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--l1", type=float, default=defaults.l1, help="L1 weight on the gates (default: %(default)s)")
    parser.add_argument("--sink", type=int, default=defaults.sink_tokens, help="sink tokens (default: %(default)s)")
    parser.add_argument("--local", type=int, default=defaults.local_tokens,
                        help="local window tokens (default: %(default)s)")
    parser.add_argument("--num-passkeys", type=int, default=defaults.num_passkeys,
                        help="passkeys per sample (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="samples per step (default: %(default)s)")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"],
                        help="model dtype (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_main)
    return parser


def _main(args: argparse.Namespace) -> int:
    from lserve.sparsity import write_head_scores

    require_extra("calibrate", "lserve calibrate", CALIBRATE_MODULES)

    config = CalibrationConfig(seq_len=args.seq_len, steps=args.steps, lr=args.lr, l1=args.l1,
                               sink_tokens=args.sink, local_tokens=args.local, num_passkeys=args.num_passkeys,
                               batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = calibrate(args.model, config, show_progress=not args.quiet)
    write_head_scores(args.out, result.gates, comment=result.comment(args.model))
    print(f"wrote {args.out}: {result.gates.shape[0]} layers x {result.gates.shape[1]} KV heads, "
          f"distill loss {result.distill_losses[0]:.4g} -> {result.distill_losses[-1]:.4g}, "
          f"mean gate {result.gates.mean():.3f}, {result.seconds:.0f} s")
    return 0
