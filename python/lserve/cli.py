"""The `lserve` command: `lserve generate ...`, `lserve serve ...` (lserve.server), `lserve bench serve ...`,
`lserve calibrate ...` (lserve.calibrate), `lserve eval niah ...` (lserve.eval)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default="smollm2-135m-instruct",
                       help="model name, .gguf file or Hugging Face directory (default: %(default)s)")
    group.add_argument("--tokenizer", default=None,
                       help="Hugging Face directory whose tokenizer replaces the model's own")
    group.add_argument("--dtype", default="auto", choices=["auto", "native", "float32", "bfloat16", "float16"],
                       help="weight dtype; auto: native (as stored, e.g. q4_1) for a GGUF on the CPU, float32 "
                            "elsewhere on the CPU, bfloat16 on CUDA; float32: the dequantised reference "
                            "(default: %(default)s)")
    group.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    group.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output in tokens")
    group.add_argument("--max-num-seqs", type=int, default=256, help="most sequences per batch")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    group.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the paged KV cache")
    group.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="'dummy' draws random weights (benchmarks)")
    group.add_argument("--sparsity", default="dense", choices=["dense", "lserve"],
                       help="attention: dense, or LServe sparse attention (streaming heads + page selection)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                       help="reuse the KV of repeated prompt prefixes (default: on)")


def _engine_from_args(args: argparse.Namespace):
    from lserve.engine import Engine

    return Engine(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_memory=args.kv_cache_memory, load_format=args.load_format, seed=args.seed,
                  show_progress=not args.quiet, sparsity=args.sparsity,
                  enable_prefix_caching=args.enable_prefix_caching)


def _generate(args: argparse.Namespace) -> int:
    from lserve.sampling import SamplingParams

    prompts = args.prompt or ["Write one sentence about the sea."]
    engine = _engine_from_args(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed if args.temperature > 0 else None)
    if args.chat:
        prompt_dicts = []
        for text in prompts:
            rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                            add_generation_prompt=True)
            prompt_dicts.append({"prompt": rendered,
                                 "prompt_token_ids": engine.tokenizer.encode(rendered, add_special_tokens=False)})
    else:
        prompt_dicts = prompts
    if args.stream:
        for index, prompt in enumerate(prompt_dicts):
            if len(prompts) > 1:
                print(f"--- [{index}] {prompts[index]}", flush=True)
            elif not args.chat:
                print(prompts[index], end="", flush=True)
            for delta in engine.stream(prompt, params):
                sys.stdout.write(delta)
                sys.stdout.flush()
            print(flush=True)
        return 0
    outputs = engine.generate(prompt_dicts, params, use_tqdm=not args.quiet)
    for prompt, output in zip(prompts, outputs):
        if len(prompts) > 1:
            print(f"--- {prompt}")
        print(("" if args.chat else prompt) + output.outputs[0].text, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lserve", description="lserve: long-context LLM serving.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    gen = commands.add_parser("generate", help="generate text from prompts",
                              description="Generate continuations of prompts (or chat replies with --chat).")
    gen.add_argument("prompt", nargs="*", help="prompt texts (default: a sample prompt)")
    _add_engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="0 disables top-k (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--stream", action="store_true", help="print text as it is produced")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.set_defaults(handler=_generate)
    from lserve.bench import add_bench_parser
    from lserve.calibrate import add_calibrate_parser
    from lserve.eval import add_eval_parser
    from lserve.server.launch import add_serve_parser

    add_serve_parser(commands, _add_engine_args, _engine_from_args)
    add_bench_parser(commands)
    add_calibrate_parser(commands)
    add_eval_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError) as error:  # bad input, or a failed model download
        print(f"lserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
