"""What the /daskllm page costs: decode throughput with the publisher off and on, side by side.

One LocalCluster (2 workers x 1 thread), one tp=2 LLM per setting on a random 8-layer Llama
(hidden 512), batches of requests decoded greedily. Settings take turns by whole rounds (who goes first
rotates) so that drift on a shared machine hits them alike; the median of the rounds is reported, with
the publisher's own cost (seconds per snapshot on the client) and the snapshot size.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import dask

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import random_llama  # noqa: E402

SETTINGS = {"off": 0, "every 1 s": 1.0, "every 0.2 s": 0.2}
ROUNDS, BATCH, NEW_TOKENS = 6, 4, 48


def main():
    from distributed import Client, LocalCluster

    from daskllm import LLM
    with tempfile.TemporaryDirectory() as path:
        params = random_llama(path, layers=8, hidden=512)
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
        client = Client(cluster, direct_to_workers=True)
        rates = {name: [] for name in SETTINGS}
        publish = {}
        try:
            names = list(SETTINGS)
            for round_ in range(ROUNDS):
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:   # who goes first rotates
                    interval = SETTINGS[name]
                    with dask.config.set({"daskllm.dashboard-interval": interval}):
                        with LLM(path, tp=2, client=client, progress=False) as llm:
                            prompts = [list(range(3 + i, 35 + i)) for i in range(BATCH)]
                            llm.generate(prompts, max_new_tokens=2, ignore_eos=True)      # warm up
                            start = time.perf_counter()
                            outs = llm.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
                            rates[name].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
                            if llm._dashboard is not None and name not in publish:
                                t = time.perf_counter()
                                llm._dashboard.publish()
                                publish[name] = (time.perf_counter() - t,
                                                 len(json.dumps(llm._dashboard.snapshot(wait=0, ask=False))))
        finally:
            client.close()
            cluster.close()
    print(f"random Llama, {params / 1e6:.1f}M parameters, tp=2 on 2 workers x 1 thread; "
          f"{BATCH} requests x {NEW_TOKENS} tokens, median of {ROUNDS} rounds")
    print("| publisher | decode tok/s (median) | vs off | each round |")
    print("| --- | ---: | ---: | --- |")
    base = statistics.median(rates["off"])
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} | {statistics.median(r) / base:.2f}x | "
              f"{', '.join(f'{x:.1f}' for x in r)} |")
    for name, (secs, size) in publish.items():
        print(f"publish() {name}: {1e3 * secs:.1f} ms on the client (stats calls + send), snapshot {size} bytes of JSON")


if __name__ == "__main__":
    main()
