"""The contracts of the data plane: errors, statistics, Communicator and Transport.

A `Transport` moves lists of arrays between two global ranks on named
channels ``(peer, tag)``; a `Communicator` runs the collectives of one group of
ranks over it. Nothing here imports Dask, so `model/` and `parallel/` can code
against `Communicator` alone.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np


def give_way() -> None:
    """For a thread that spins while it waits: let any thread queued for this core run (a late
    peer, the driver) and this process's other threads take the GIL; back at once if none waits."""
    _yield()


_yield = getattr(os, "sched_yield", lambda: time.sleep(0))    # releases the GIL around the call


class CommError(RuntimeError):
    """A collective or point-to-point transfer failed; the message names the ranks."""

    def __init__(self, message, *, rank=None, peer=None, tag=None, op=None):
        super().__init__(message)
        self.rank = rank
        self.peer = peer
        self.tag = tag
        self.op = op

    def __reduce__(self):   # keep rank and peer when the error travels to the driver (Dask pickles it)
        return _remake, (type(self), self.args[0] if self.args else "",
                         {"rank": self.rank, "peer": self.peer, "tag": self.tag, "op": self.op})


def _remake(cls, message, attrs):
    return cls(message, **attrs)


class CommTimeout(CommError, TimeoutError):
    """A rank waited longer than its timeout for a peer."""


class PeerLost(CommError):
    """The connection to a peer closed or was reset; ``peer`` is its global rank."""


@dataclass
class OpStats:
    """Totals for one collective name."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class CommStats:
    """Calls, bytes and wall time per collective name, for one communicator."""

    def __init__(self):
        self.ops: dict[str, OpStats] = {}

    def record(self, op: str, sent: int, received: int, seconds: float) -> None:
        s = self.ops.get(op)
        if s is None:
            s = self.ops[op] = OpStats()
        s.calls += 1
        s.bytes_sent += sent
        s.bytes_received += received
        s.seconds += seconds

    def as_dict(self) -> dict[str, dict]:
        return {name: asdict(s) for name, s in self.ops.items()}

    def reset(self) -> None:
        self.ops.clear()

    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.ops.values())

    def total_bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.ops.values())

    def __repr__(self):
        return f"CommStats({self.as_dict()})"


class Communicator(ABC):
    """The collectives of one group of ranks; every call takes a timeout in seconds.

    Every rank of the group must call the same collectives in the same order.
    Arrays are numpy (or cupy) arrays of any shape and dtype.
    """

    rank: int
    size: int
    stats: CommStats
    default_timeout: float

    @abstractmethod
    def all_reduce(self, x, *, timeout=None):
        """x (same shape on all ranks) -> sum over ranks, added in rank order 0..size-1."""

    @abstractmethod
    def all_gather(self, x, *, dim=0, timeout=None):
        """x (sizes along dim may differ) -> all ranks' x concatenated along dim in rank order."""

    @abstractmethod
    def all_gather_list(self, x, *, timeout=None) -> list:
        """x (any shape, dtype) -> [x of rank 0, ..., x of rank size-1]."""

    @abstractmethod
    def reduce_scatter(self, x, *, dim=0, timeout=None):
        """x (same shape on all ranks) -> chunk `rank` of numpy.array_split(sum, size, axis=dim)."""

    @abstractmethod
    def all_to_all(self, chunks, *, timeout=None) -> list:
        """chunks[j] goes to rank j -> list whose element j came from rank j."""

    @abstractmethod
    def send_recv(self, x, *, shift=1, timeout=None):
        """Ring shift: x goes to (rank+shift)%size -> x of (rank-shift)%size."""

    @abstractmethod
    def send(self, x, *, dst, timeout=None) -> None:
        """Point to point: x to group rank `dst`, which receives it with recv(src=this rank)."""

    @abstractmethod
    def recv(self, *, src, like=None, timeout=None):
        """Point to point: what group rank `src` sent to this rank (on the device of `like`)."""

    @abstractmethod
    def broadcast(self, x, *, root=0, timeout=None):
        """x of root (ignored elsewhere, may be None) -> root's x on every rank."""

    @abstractmethod
    def barrier(self, *, timeout=None) -> None:
        """Return once every rank of the group has entered the barrier."""


class Transport(ABC):
    """Point-to-point transfer of array lists between global ranks.

    Messages on one ``(peer, tag)`` channel arrive in the order sent; tags keep
    groups apart, so several groups can share one transport.
    """

    rank: int
    world_size: int

    @abstractmethod
    def send(self, peer: int, tag: str, arrays: list) -> None:
        """Send a list of arrays to global rank `peer`; the caller may reuse them after."""

    @abstractmethod
    def recv(self, peer: int, tag: str, timeout: float) -> list:
        """Next list of arrays sent by `peer` on `tag`; CommTimeout after `timeout` s."""

    @abstractmethod
    def close(self) -> None:
        """Release every connection; idempotent. Peers see PeerLost naming this rank."""


def wire_array(a) -> np.ndarray:
    """a as a C-contiguous numpy array in native byte order, as every transport delivers it."""
    a = np.asarray(a, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return a


class _Failure:
    """A sentinel queued behind the last message of a lost peer."""

    def __init__(self, error: CommError):
        self.error = error


class Inbox:
    """Received messages of one rank, one FIFO queue per (peer, tag).

    Receivers (threads or another rank) `put`; when a peer is lost, `fail`
    queues the error behind whatever already arrived, so data sent before the
    loss is still delivered.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self._queues: dict[tuple[int, str], queue.SimpleQueue] = {}
        self._failed: dict[int | None, CommError] = {}
        self._lock = threading.Lock()

    def _queue(self, peer: int, tag: str) -> queue.SimpleQueue:
        q = self._queues.get((peer, tag))
        if q is None:
            with self._lock:
                q = self._queues.get((peer, tag))
                if q is None:
                    q = self._queues[(peer, tag)] = queue.SimpleQueue()
                    err = self._failed.get(peer) or self._failed.get(None)
                    if err is not None:
                        q.put(_Failure(err))
        return q

    def put(self, peer: int, tag: str, arrays: list) -> None:
        self._queue(peer, tag).put(arrays)

    def fail(self, peer: int | None, error: CommError) -> None:
        """Fail every wait on `peer` (None: on every peer) after the queued messages."""
        with self._lock:
            if peer in self._failed:
                return
            self._failed[peer] = error
            for (p, _), q in self._queues.items():
                if peer is None or p == peer:
                    q.put(_Failure(error))

    def error(self, peer: int) -> CommError | None:
        return self._failed.get(peer) or self._failed.get(None)

    def get(self, peer: int, tag: str, timeout: float) -> list:
        q = self._queue(peer, tag)
        try:
            item = q.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise CommTimeout(
                f"rank {self.rank} waited {timeout:.1f} s for rank {peer} (tag {tag!r})",
                rank=self.rank, peer=peer, tag=tag,
            ) from None
        if isinstance(item, _Failure):
            q.put(item)  # later waits fail too
            raise item.error
        return item
