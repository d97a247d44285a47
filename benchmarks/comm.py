"""Time the TCP collectives between two Dask worker processes against a bare socket and an actor call.

Run: python benchmarks/comm.py   (about 15 s on 2 cores)

Latency is the median seconds per call on rank 0. Throughput is payload bytes
per rank over that time; for the bare socket it is one direction of a
ping-pong (size / (RTT / 2)), so a collective that moves its payload once each
way in the same time as a one-way transfer scores 1.0x.
"""

import argparse
import statistics
import time

SIZES = {"8KiB": 8 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
OPS = ["all_reduce", "all_gather", "send_recv", "all_to_all"]


def repeats_for(nbytes: int, scale: float) -> int:
    return max(3, int(scale * min(300, (64 << 20) // max(nbytes, 1) // 4)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="message sizes")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of repeats per size")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    from daskllm.comm.testing import CommActor

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster, Client(cluster, direct_to_workers=True) as client:
        workers = sorted(client.scheduler_info()["workers"])
        a, b = (client.submit(CommActor, r, 2, 30.0, workers=[w], actor=True, pure=False).result()
                for r, w in enumerate(workers))
        addresses = {0: a.listen().result(), 1: b.listen().result()}
        fa, fb = a.connect(addresses), b.connect(addresses)
        fa.result(), fb.result()

        a.noop().result()
        t = []
        for _ in range(int(200 * args.scale) or 1):
            t0 = time.perf_counter()
            a.noop().result()
            t.append(time.perf_counter() - t0)
        actor_rtt = statistics.median(t)

        rows = {}
        for name in args.sizes:
            n = SIZES[name]
            reps = repeats_for(n, args.scale)
            addr = a.ping_listen().result()
            serve = a.ping_serve(n, reps)
            rtt = statistics.median(b.ping_client(addr, n, reps).result())
            serve.result()
            row = {"plain": (rtt, n / (rtt / 2))}
            for op in OPS:
                fa, fb = a.run(op, n, reps), b.run(op, n, reps)
                ra, rb = fa.result(), fb.result()
                sec = statistics.median(ra["seconds"])
                row[op] = (sec, n / sec)
            rows[name] = row
        a.close().result(), b.close().result()

    cols = ["plain"] + OPS
    head = f"{'size':>6} | " + " | ".join(f"{c + ' us':>15} {'MB/s':>7}" for c in cols)
    print(head)
    print("-" * len(head))
    for name, row in rows.items():
        cells = " | ".join(f"{row[c][0] * 1e6:>15.0f} {row[c][1] / 1e6:>7.0f}" for c in cols)
        print(f"{name:>6} | {cells}")
    print(f"\nDask actor call round trip (no-op): {actor_rtt * 1e6:.0f} us")
    if "8KiB" in rows:
        r = rows["8KiB"]
        print(f"all_reduce / plain-socket RTT at 8 KiB: {r['all_reduce'][0] / r['plain'][0]:.2f}x (goal <= 3x)")
    if "16MiB" in rows:
        r = rows["16MiB"]
        print(f"all_reduce / plain-socket throughput at 16 MiB: {r['all_reduce'][1] / r['plain'][1]:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
