"""The `daskllm` command: generate text on a Dask cluster from the shell."""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daskllm",
        description="Large-language-model inference on a Dask cluster (data, tensor, sequence, expert parallel).",
        epilog="Example: daskllm generate --max-new-tokens 32 \"Once upon a time\"")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream generated text for a prompt to stdout",
                         description="Stream generated text for a prompt. Without --model a small built-in "
                                     "random model is used (its text is gibberish; no download).")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", help="Hugging Face checkpoint directory (safetensors + config.json + tokenizer.json)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--seed", type=int, default=None, help="random seed: same seed, same text")
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    for axis, text in (("dp", "replicas"), ("tp", "tensor-parallel ranks"), ("sp", "sequence-parallel ranks"),
                       ("ep", "expert-parallel ranks")):
        gen.add_argument(f"--{axis}", type=int, default=1, help=f"{text} (default 1)")
    gen.add_argument("--sp-variant", default="ring", choices=["ring", "allgather", "ulysses"],
                     help="sequence-parallel attention exchange (default ring)")
    gen.add_argument("--address", help="scheduler address of an existing cluster (default: a LocalCluster)")
    return parser


def _progress(done: int, total: int):
    width = 30
    filled = width * done // max(total, 1)
    print(f"\rloading [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .api import LLM          # imported late so that --help is instant
    from .model.sampling import SamplingParams

    try:                          # refuse bad settings before starting any worker
        SamplingParams(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    except ValueError as e:
        print(f"daskllm: error: {e}", file=sys.stderr)
        return 2

    print("starting workers and loading the model ...", file=sys.stderr, flush=True)
    try:
        with LLM(args.model, dp=args.dp, tp=args.tp, sp=args.sp, ep=args.ep, address=args.address,
                 sp_variant=args.sp_variant, progress=_progress) as llm:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
            for piece in llm.stream(args.prompt, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, ignore_eos=args.ignore_eos):
                print(piece, end="", flush=True)
            print()
    except (ValueError, RuntimeError) as e:
        print(f"daskllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
