"""The HTTP server's overhead: the same load through `daskllm serve` and through the Python API.

Usage: python benchmarks/serve.py [--clients 1 8 32] [--requests-per-client 4] [--new-tokens 32]
                                  [--layers 4] [--hidden 512] [--rounds 1]

One LocalCluster (1 worker x 1 thread, its scheduler in a process of its own) and one random
Llama with the built-in model's tokenizer. For each number of concurrent clients, each client
sends its requests one after another (a text prompt, greedy, `--new-tokens` tokens, streamed)
and times its first token:
  python API   threads in this process: llm.submit(...) then request.pieces()
  HTTP server  `daskllm serve` in a subprocess on 127.0.0.1, threads in this process with the
               official openai client (stream=True); the server has its own process, as deployed
The two take turns at each number of clients (both models stay loaded; only one runs at a
time). It prints requests/s, generated tokens/s, time to first token (p50 / p95) and the
server's figures as a ratio of the Python API's.
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import random_llama


def make_model(path, layers, hidden) -> int:
    from daskllm.io.builtin import TOKENIZER_CONFIG, builtin_model_path
    import json
    n = random_llama(path, layers=layers, hidden=hidden, vocab=384, max_position=2048)
    shutil.copy(Path(builtin_model_path()) / "tokenizer.json", Path(path) / "tokenizer.json")
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return n


def prompts_for(clients, per_client):
    return [[f"Client {c} asks question number {i}: what happened next?" for i in range(per_client)]
            for c in range(clients)]


def load(one_request, clients, per_client):
    """Run `clients` threads, each sending its prompts in turn; (seconds, [(ttft, tokens)])."""
    def client(prompts):
        return [one_request(p) for p in prompts]
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, prompts_for(clients, per_client)) for r in rs]
    return time.monotonic() - start, results


def python_api(llm, new_tokens):
    def one(prompt):
        start = time.monotonic()
        (request,) = llm.submit(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        ttft = None
        for _ in request.pieces():
            ttft = ttft if ttft is not None else time.monotonic() - start
        return ttft, len(request.wait().token_ids)
    return one


def http(url, new_tokens):
    import threading

    import openai
    local = threading.local()

    def one(prompt):
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        start = time.monotonic()
        ttft, tokens = None, 0
        for chunk in local.client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens,
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text and ttft is None:
                ttft = time.monotonic() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return ttft, tokens
    return one


def summarize(seconds, results) -> dict:
    ttft = sorted(t for t, _ in results if t is not None)
    tokens = sum(n for _, n in results)
    return {"req_s": len(results) / seconds, "tok_s": tokens / seconds, "tokens": tokens,
            "ttft_p50": statistics.median(ttft), "ttft_p95": ttft[round(0.95 * (len(ttft) - 1))]}


def start_server(path, address):
    proc = subprocess.Popen([sys.executable, "-m", "daskllm.cli", "serve", "--model", str(path), "--address", address,
                             "--port", "0", "--served-model-name", "bench", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"at (http://\S+/v1)", proc.stderr.readline())
        if found:
            return proc, found.group(1)
    proc.kill()
    raise RuntimeError("the server did not start")


CLUSTER = """
import sys
from distributed import LocalCluster
with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()                 # until the benchmark closes our stdin
"""


def start_cluster():
    """A LocalCluster in a process of its own: its scheduler then shares a process (and the GIL)
    with neither contender."""
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        raise RuntimeError("the cluster did not start")
    return proc, address


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole load; each figure is the median")
    args = parser.parse_args()
    from distributed import Client

    from daskllm import LLM
    rows = {}
    cluster, address = start_cluster()
    try:
        with tempfile.TemporaryDirectory() as d, Client(address, direct_to_workers=True) as client:
            n_params = make_model(d, args.layers, args.hidden)
            proc, url = start_server(d, address)
            try:
                with LLM(d, client=client) as llm:
                    paths = {"python API": python_api(llm, args.new_tokens),
                             "HTTP server": http(url, args.new_tokens)}
                    for one in paths.values():
                        load(one, 2, 1)                                       # warm-up
                    for _ in range(args.rounds):
                        for c in args.clients:      # the two paths take turns, so drift hits both alike
                            for name, one in paths.items():
                                rows.setdefault((name, c), []).append(
                                    summarize(*load(one, c, args.requests_per_client)))
                                print(name, c, rows[(name, c)][-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=120)
                proc.stderr.close()
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)
        cluster.stdout.close()

    rows = {key: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for key, runs in rows.items()}
    print(f"\nrandom Llama {n_params / 1e6:.1f}M params ({args.layers} layers, hidden {args.hidden}), "
          f"{args.requests_per_client} requests per client, {args.new_tokens} tokens each, greedy, streamed, "
          f"median of {args.rounds} round(s)\n")
    print("| clients | path | requests/s | tokens/s | TTFT p50 ms | TTFT p95 ms | tokens/s vs API | TTFT p50 vs API |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in args.clients:
        api = rows[("python API", c)]
        for path in ("python API", "HTTP server"):
            r = rows[(path, c)]
            print(f"| {c} | {path} | {r['req_s']:.2f} | {r['tok_s']:.0f} | {1e3 * r['ttft_p50']:.0f} | "
                  f"{1e3 * r['ttft_p95']:.0f} | {r['tok_s'] / api['tok_s']:.2f}x | "
                  f"{r['ttft_p50'] / api['ttft_p50']:.2f}x |")


if __name__ == "__main__":
    main()
