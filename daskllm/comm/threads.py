"""An in-process transport: ranks are threads of one process, messages go through queues.

Used to test every strategy in one process, one thread per rank.
"""

from __future__ import annotations

import threading

import numpy as np

from .base import CommError, Inbox, PeerLost, Transport, wire_array
from .collectives import GroupCommunicator


class ThreadHub:
    """The shared mailboxes of `world_size` in-process ranks.

    Example
    -------
    >>> hub = ThreadHub(2)
    >>> t0, t1 = hub.transport(0), hub.transport(1)
    >>> t0.send(1, "world", [np.arange(3)])
    >>> t1.recv(0, "world", timeout=1.0)[0].tolist()
    [0, 1, 2]
    """

    def __init__(self, world_size: int):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.inboxes = [Inbox(r) for r in range(world_size)]
        self._transports: dict[int, ThreadTransport] = {}
        self._lock = threading.Lock()

    def transport(self, rank: int) -> ThreadTransport:
        """The transport of `rank` (the same object on every call)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        with self._lock:
            if rank not in self._transports:
                self._transports[rank] = ThreadTransport(self, rank)
            return self._transports[rank]


class ThreadTransport(Transport):
    """One rank's end of a `ThreadHub`; sends copy, so the sender may reuse its arrays."""

    def __init__(self, hub: ThreadHub, rank: int):
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.closed = False

    def send(self, peer: int, tag: str, arrays: list) -> None:
        if self.closed:
            raise CommError(f"rank {self.rank}: transport is closed", rank=self.rank, peer=peer, tag=tag)
        err = self.hub.inboxes[self.rank].error(peer)
        if err is not None:
            raise err
        self.hub.inboxes[peer].put(self.rank, tag, [np.array(wire_array(a), copy=True) for a in arrays])

    def recv(self, peer: int, tag: str, timeout: float) -> list:
        return self.hub.inboxes[self.rank].get(peer, tag, timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for r, inbox in enumerate(self.hub.inboxes):
            if r != self.rank:
                inbox.fail(self.rank, PeerLost(f"rank {self.rank} closed its transport", rank=r, peer=self.rank))
        self.hub.inboxes[self.rank].fail(
            None, CommError(f"rank {self.rank}: transport is closed", rank=self.rank)
        )


def thread_group(n: int, tag: str = "world", default_timeout: float = 60.0) -> list[GroupCommunicator]:
    """`n` communicators over one fresh ThreadHub, one per rank, to be used from `n` threads."""
    hub = ThreadHub(n)
    return [GroupCommunicator(hub.transport(r), range(n), tag, default_timeout) for r in range(n)]
