"""Helpers to check and time the collectives: per-rank cases, local worlds, and a Dask actor.

`case` gives each rank its input and the result it must get back, computed
by that rank alone; `CommActor` runs the same cases (and timings) on Dask
workers over TCP.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .collectives import GroupCommunicator
from .tcp import TcpTransport

OPS = ("all_reduce", "all_gather", "all_gather_list", "reduce_scatter", "all_to_all", "send_recv", "broadcast")


def rank_array(rank: int, shape, dtype="float32", seed: int = 0) -> np.ndarray:
    """A reproducible array of `shape` for `rank` (float: normal, int: [-1000, 1000), bool)."""
    rng = np.random.default_rng([seed, rank])
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def rank_order_sum(xs: list) -> np.ndarray:
    """xs[0] + xs[1] + ... added left to right, as all_reduce promises."""
    acc = np.array(xs[0], copy=True)
    for x in xs[1:]:
        np.add(acc, x, out=acc)
    return acc


def case(op: str, rank: int, size: int, shape=(4, 3), dtype="float32", seed: int = 0):
    """(call, expected): `call(comm)` runs `op` with this rank's input; `expected` is what it must return.

    all_gather is uneven (rank r adds r to the last axis), all_gather_list and
    all_to_all use different and empty shapes, broadcast's root is the last rank.
    """
    shape = tuple(shape)

    def x(r, shp=shape):
        return rank_array(r, shp, dtype, seed)

    if op == "all_reduce":
        xs = [x(r) for r in range(size)]
        return (lambda c: c.all_reduce(xs[rank])), rank_order_sum(xs)
    if op == "reduce_scatter":
        xs = [x(r) for r in range(size)]
        dim = len(shape) - 1
        return (lambda c: c.reduce_scatter(xs[rank], dim=dim)), np.array_split(rank_order_sum(xs), size, axis=dim)[rank]
    if op == "all_gather":
        base = shape or (1,)
        xs = [x(r, base[:-1] + (base[-1] + r,)) for r in range(size)]
        dim = len(base) - 1
        return (lambda c: c.all_gather(xs[rank], dim=dim)), np.concatenate(xs, axis=dim)
    if op == "all_gather_list":
        xs = [x(r, (r,) + shape) for r in range(size)]
        return (lambda c: c.all_gather_list(xs[rank])), xs
    if op == "all_to_all":
        tail = shape[1:]

        def chunk(src, dst):
            return rank_array(src * size + dst, ((src + dst) % 3,) + tail, dtype, seed)

        mine = [chunk(rank, j) for j in range(size)]
        return (lambda c: c.all_to_all(mine)), [chunk(j, rank) for j in range(size)]
    if op == "send_recv":
        shift = 1 if size < 3 else 2
        return (lambda c: c.send_recv(x(rank), shift=shift)), x((rank - shift) % size)
    if op == "broadcast":
        root = size - 1
        return (lambda c: c.broadcast(x(rank) if rank == root else None, root=root)), x(root)
    raise ValueError(f"unknown op {op!r}; choose from {OPS}")


def assert_same(got, expected, what: str = "") -> None:
    """Bitwise equality of arrays (or lists of arrays): dtype, shape and bytes."""
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{what}: got {type(got)} of {len(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{what}[{i}]")
        return
    got = np.asarray(got)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    if got.tobytes() != expected.tobytes():
        raise AssertionError(f"{what}: values differ\n got {got!r}\n expected {expected!r}")


def run_ranks(fn, n: int, timeout: float = 60.0) -> list:
    """fn(rank) for rank in range(n), each in its own thread; results in rank order, first error raised."""
    results, errors = [None] * n, [None] * n

    def body(r):
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            errors[r] = e

    threads = [threading.Thread(target=body, args=(r,), name=f"rank-{r}") for r in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise TimeoutError(f"ranks {stuck} still running after {timeout} s")
    for e in errors:
        if e is not None:
            raise e
    return results


def tcp_world(n: int, *, ssl_listen=None, ssl_connect=None, timeout: float = 10.0) -> list[TcpTransport]:
    """n connected TcpTransports on 127.0.0.1 in this process (close each when done)."""
    transports = [TcpTransport(r, n, ssl_listen=ssl_listen, ssl_connect=ssl_connect, timeout=timeout) for r in range(n)]
    try:
        addresses = {r: t.listen() for r, t in enumerate(transports)}
        run_ranks(lambda r: transports[r].connect(addresses), n, timeout=timeout + 5)
    except BaseException:
        for t in transports:
            t.close()
        raise
    return transports


class CommActor:
    """One rank on a Dask worker: wires a TcpTransport to its peers, checks and times collectives.

    Create with ``client.submit(CommActor, rank, world, workers=[addr], actor=True)``;
    then call ``listen`` on all, ``connect(addresses)`` on all at once, then
    ``check``/``run`` on all at once (a collective needs every rank).
    """

    def __init__(self, rank: int, world: int, timeout: float = 30.0):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.transport = TcpTransport(rank, world, timeout=timeout)
        self.comm: GroupCommunicator | None = None
        self._ping_listener = None

    @staticmethod
    def _host() -> str:
        from distributed import get_worker
        from distributed.comm.addressing import get_address_host

        return get_address_host(get_worker().address)

    def listen(self) -> tuple[str, int]:
        """Listen on this worker's host; returns (host, port) for the peers."""
        return self.transport.listen(self._host())

    def connect(self, addresses: dict) -> bool:
        """Connect to every peer (call on all ranks at once)."""
        self.transport.connect(addresses, self.timeout)
        self.comm = GroupCommunicator(self.transport, range(self.world), "world", self.timeout)
        return True

    def check(self, op: str, shape=(4, 3), dtype="float32", seed: int = 0) -> bool:
        """Run `case(op, ...)` and assert the bitwise-exact result on this rank."""
        call, expected = case(op, self.rank, self.world, shape, dtype, seed)
        assert_same(call(self.comm), expected, f"{op} on rank {self.rank}")
        return True

    def run(self, op: str, nbytes: int, repeats: int = 10, warmup: int = 2) -> dict:
        """Time `repeats` calls of `op` on a float32 array of `nbytes` per rank; seconds per call."""
        c = self.comm
        x = np.ones(max(nbytes // 4, 1), np.float32)
        chunks = np.array_split(x, self.world)
        calls = {
            "all_reduce": lambda: c.all_reduce(x),
            "all_gather": lambda: c.all_gather(x),
            "reduce_scatter": lambda: c.reduce_scatter(x),
            "all_to_all": lambda: c.all_to_all(chunks),
            "send_recv": lambda: c.send_recv(x),
            "broadcast": lambda: c.broadcast(x),
            "barrier": lambda: c.barrier(),
        }
        fn = calls[op]
        c.barrier()
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return {"op": op, "nbytes": x.nbytes, "seconds": times, "stats": c.stats.as_dict()}

    def noop(self) -> None:
        """Nothing: times a bare actor call round trip."""

    def ping_listen(self) -> tuple[str, int]:
        """Open a bare socket for a plain ping-pong; returns (host, port)."""
        import socket

        self._ping_listener = socket.create_server((self._host(), 0))
        return self._ping_listener.getsockname()[:2]

    def ping_serve(self, nbytes: int, repeats: int) -> bool:
        """Echo `repeats` messages of `nbytes` back to one ping_client."""
        import socket

        conn, _ = self._ping_listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = np.empty(nbytes, np.uint8)
            for _ in range(repeats):
                _recv_exact(conn, memoryview(buf))
                conn.sendall(memoryview(buf))
        self._ping_listener.close()
        return True

    def ping_client(self, address, nbytes: int, repeats: int) -> list:
        """Round-trip seconds of `repeats` ping-pongs of `nbytes` with a ping_serve peer."""
        import socket

        buf = np.ones(nbytes, np.uint8)
        times = []
        with socket.create_connection(tuple(address)) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(repeats):
                t0 = time.perf_counter()
                conn.sendall(memoryview(buf))
                _recv_exact(conn, memoryview(buf))
                times.append(time.perf_counter() - t0)
        return times

    def close(self) -> bool:
        """Close the transport (idempotent)."""
        self.transport.close()
        if self._ping_listener is not None:
            self._ping_listener.close()
        return True


def _recv_exact(conn, view: memoryview) -> None:
    while view.nbytes:
        n = conn.recv_into(view)
        if n == 0:
            raise EOFError("ping peer closed the connection")
        view = view[n:]
