"""Time the TCP collectives between two Dask worker processes against bare sockets and an actor call.

Run: python benchmarks/comm.py   (about 20 s on 2 cores)

How it measures: two worker processes, one rank each; every figure is the
median seconds per call on rank 0 (after a barrier and 2 warm-up calls), and
MB/s is payload bytes per rank (`size`) over that time. The same float32 array
of `size` bytes is used every call.

Baselines, both plain Python sockets between the same two workers, with
TCP_NODELAY and a buffer reused across calls (a best case no transport can
beat, since it copies nothing, parses nothing and allocates nothing):
- `pingpong`: one side sends `size`, the other echoes it back; us = round
  trip, MB/s = size / (RTT / 2), i.e. one direction at a time.
- `exchange`: both sides send `size` to each other at the same time and
  receive the other's `size` (non-blocking socket, one poll loop per side);
  us = time until both directions are done. This is what a 2-rank all_reduce,
  all_gather or send_recv moves, so it is the fair baseline for them.

Goals (issue): all_reduce of 8 KiB <= 3x the ping-pong round trip;
all_reduce of 16 MiB >= 0.8x the exchange's throughput (also shown against
the one-way ping-pong figure).
"""

import argparse
import statistics
import time

SIZES = {"8KiB": 8 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
OPS = ["all_reduce", "all_gather", "send_recv", "all_to_all"]


def repeats_for(nbytes: int, scale: float) -> int:
    return max(3, int(scale * min(300, (64 << 20) // max(nbytes, 1) // 4)))


def _exchange_listen():
    """On a worker: open a listener for `_exchange`, kept on the worker object."""
    import socket

    from distributed import get_worker
    from distributed.comm.addressing import get_address_host

    w = get_worker()
    w._daskllm_bench_listener = socket.create_server((get_address_host(w.address), 0))
    return w._daskllm_bench_listener.getsockname()[:2]


def _exchange(address, nbytes: int, repeats: int, warmup: int = 2) -> list:
    """On a worker: both sides send nbytes and receive nbytes at once, `repeats` times; seconds each.

    address None: accept on the listener from `_exchange_listen`; else dial it.
    """
    import select
    import socket

    import numpy as np
    from distributed import get_worker

    if address is None:
        listener = get_worker()._daskllm_bench_listener
        sock, _ = listener.accept()
        listener.close()
    else:
        sock = socket.create_connection(tuple(address))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    out, inp = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    poller = select.poll()
    fd = sock.fileno()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    times = []
    with sock:
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            sv, rv = memoryview(out), memoryview(inp)
            while sv.nbytes or rv.nbytes:
                progressed = False
                if sv.nbytes:
                    try:
                        sv = sv[sock.send(sv):]
                        progressed = True
                    except BlockingIOError:
                        pass
                if rv.nbytes:
                    try:
                        n = sock.recv_into(rv)
                        if n == 0:
                            raise EOFError("exchange peer closed")
                        rv = rv[n:]
                        progressed = True
                    except BlockingIOError:
                        pass
                if not progressed:
                    poller.modify(fd, (select.POLLOUT if sv.nbytes else 0) | (select.POLLIN if rv.nbytes else 0))
                    poller.poll()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


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
            row = {"pingpong": (rtt, n / (rtt / 2))}
            addr = client.submit(_exchange_listen, workers=[workers[0]], pure=False).result()
            fs = [client.submit(_exchange, None, n, reps, workers=[workers[0]], pure=False),
                  client.submit(_exchange, addr, n, reps, workers=[workers[1]], pure=False)]
            sec = statistics.median(fs[0].result())
            fs[1].result()
            row["exchange"] = (sec, n / sec)
            for op in OPS:
                fa, fb = a.run(op, n, reps), b.run(op, n, reps)
                ra, _ = fa.result(), fb.result()          # both ranks must finish; rank 0 reports
                sec = statistics.median(ra["seconds"])
                row[op] = (sec, n / sec)
            rows[name] = row
        a.close().result(), b.close().result()

    cols = ["pingpong", "exchange"] + OPS
    head = f"{'size':>6} | " + " | ".join(f"{c + ' us':>14} {'MB/s':>6}" for c in cols)
    print(head)
    print("-" * len(head))
    for name, row in rows.items():
        cells = " | ".join(f"{row[c][0] * 1e6:>14.0f} {row[c][1] / 1e6:>6.0f}" for c in cols)
        print(f"{name:>6} | {cells}")
    print("\npingpong: plain-socket round trip (MB/s one way); exchange: plain sockets, both sides send size at once")
    print("op columns: median time per call on rank 0; MB/s = size / time")
    print(f"Dask actor call round trip (no-op): {actor_rtt * 1e6:.0f} us")
    if "8KiB" in rows:
        r = rows["8KiB"]
        print(f"8 KiB all_reduce / plain ping-pong RTT: {r['all_reduce'][0] / r['pingpong'][0]:.2f}x (goal <= 3x); "
              f"/ plain exchange: {r['all_reduce'][0] / r['exchange'][0]:.2f}x")
    if "16MiB" in rows:
        r = rows["16MiB"]
        print(f"16 MiB all_reduce throughput / plain exchange: {r['all_reduce'][1] / r['exchange'][1]:.2f}x (goal >= 0.8x); "
              f"/ plain one-way ping-pong: {r['all_reduce'][1] / r['pingpong'][1]:.2f}x")


if __name__ == "__main__":
    main()
