"""The collectives, written once over any point-to-point `Transport`.

World sizes here are small (2-8), so most collectives are a direct exchange:
every rank sends to every other, then combines in rank order, which makes
`all_reduce` bitwise identical on all ranks and equal to the rank-order sum.
Large all-reduces over more than two ranks run as a direct reduce-scatter then
all-gather: the same rank-order sum per element, each rank sending 2(n-1)/n of
the array instead of (n-1) times it.
"""

from __future__ import annotations

import time

import numpy as np

from .base import CommError, CommStats, CommTimeout, Communicator, PeerLost, Transport
from .shared import PIECE_BYTES

# above this many bytes (and more than 2 ranks) all_reduce splits the sum over ranks
RING_MIN_BYTES = 1 << 20


def _to_host(x):
    """(array, was_cupy): a cupy array is copied to host memory."""
    if type(x).__module__.startswith("cupy"):
        return x.get(), True
    return np.asarray(x), False


def _to_device(y, was_cupy):
    if not was_cupy:
        return y
    import cupy

    if isinstance(y, list):
        return [cupy.asarray(a) for a in y]
    return cupy.asarray(y)


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def _sum_in_rank_order(parts: list, mine: int, out=None) -> np.ndarray:
    """parts[0] + parts[1] + ... added left to right, into `out` if given, else into a received
    buffer (ours to overwrite); parts[mine] (the caller's) is left untouched. (a + b == b + a bit
    for bit, so rank 0 may add into parts[1].) A read-only part (a view into shared memory) is
    not overwritten either."""
    acc = out if out is not None else parts[1] if mine == 0 else parts[0]
    if not acc.flags.writeable:
        acc = np.empty_like(parts[mine])
    np.add(parts[0], parts[1], out=acc)
    for p in parts[2:]:
        np.add(acc, p, out=acc)
    return acc


class _Op:
    """One collective call in flight: its deadline and its byte counts."""

    __slots__ = ("name", "timeout", "deadline", "start", "sent", "received")

    def __init__(self, name, timeout):
        self.name = name
        self.timeout = timeout
        self.start = time.perf_counter()
        self.deadline = time.monotonic() + timeout
        self.sent = 0
        self.received = 0


class GroupCommunicator(Communicator):
    """The collectives of the global ranks `ranks` (in group order) on channel `tag`.

    Example
    -------
    >>> from daskllm.comm.threads import thread_group
    >>> comms = thread_group(1)
    >>> comms[0].all_reduce(np.ones(2)).tolist()
    [1.0, 1.0]
    """

    def __init__(self, transport: Transport, ranks, tag: str, default_timeout: float = 60.0):
        ranks = [int(r) for r in ranks]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"group ranks {ranks} contain duplicates")
        if transport.rank not in ranks:
            raise ValueError(f"transport rank {transport.rank} is not in group ranks {ranks}")
        bad = [r for r in ranks if not 0 <= r < transport.world_size]
        if bad:
            raise ValueError(f"group ranks {bad} outside world of size {transport.world_size}")
        self.transport = transport
        self.ranks = ranks
        self.tag = tag
        self.rank = ranks.index(transport.rank)
        self.size = len(ranks)
        self.default_timeout = float(default_timeout)
        self.stats = CommStats()
        self.shared = None           # comm.shared.SharedSlots where the group's ranks share a host

    def __repr__(self):
        return f"GroupCommunicator(rank={self.rank}, size={self.size}, tag={self.tag!r}, ranks={self.ranks})"

    # point to point, addressed by group rank ---------------------------------

    def _begin(self, name, timeout) -> _Op:
        return _Op(name, self.default_timeout if timeout is None else float(timeout))

    def _end(self, op: _Op) -> None:
        self.stats.record(op.name, op.sent, op.received, time.perf_counter() - op.start)

    def _send(self, op: _Op, dst: int, arrays: list) -> None:
        try:
            self.transport.send(self.ranks[dst], self.tag, arrays)
        except PeerLost as e:
            raise self._lost(op, dst, e) from None
        op.sent += _nbytes(arrays)

    def _recv(self, op: _Op, src: int) -> list:
        try:
            arrays = self.transport.recv(self.ranks[src], self.tag, op.deadline - time.monotonic())
        except CommTimeout:
            me, peer = self.transport.rank, self.ranks[src]
            raise CommTimeout(
                f"rank {me} waited {op.timeout:.1f} s for rank {peer} in {op.name} (tag {self.tag!r})",
                rank=me, peer=peer, tag=self.tag, op=op.name,
            ) from None
        except PeerLost as e:
            raise self._lost(op, src, e) from None
        op.received += _nbytes(arrays)
        return arrays

    def _lost(self, op: _Op, peer: int, e: PeerLost) -> PeerLost:
        me, peer = self.transport.rank, self.ranks[peer]
        return PeerLost(
            f"rank {me} lost rank {peer} in {op.name} (tag {self.tag!r}): {e}",
            rank=me, peer=peer, tag=self.tag, op=op.name,
        )

    def _others(self):
        """Group ranks other than this one, starting after it (spreads the load)."""
        return [(self.rank + k) % self.size for k in range(1, self.size)]

    def _exchange(self, op: _Op, outgoing) -> list:
        """outgoing[j] (a list of arrays) goes to rank j -> list of what each rank j sent us."""
        others = self._others()
        for j in others:
            self._send(op, j, outgoing[j])
        received = [None] * self.size
        for j in others:
            received[j] = self._recv(op, j)
        return received

    def _through_shared(self, op: _Op, arrays: list):
        """Every rank's list `arrays` through the group's shared memory (comm.shared; None entries
        are read by nobody) -> [the list rank j published, for each j], entries of the others
        read-only views valid until this rank's next collective. None where the group has no
        shared memory, or where some rank's list did not fit: every rank then goes over TCP alike."""
        if self.shared is None:
            return None
        me = self.transport.rank
        try:
            return self.shared.exchange(arrays, op.deadline)
        except CommTimeout as e:
            peer = self.ranks[e.peer]
            raise CommTimeout(f"rank {me} waited {op.timeout:.1f} s for rank {peer} in {op.name} "
                              f"(tag {self.tag!r}, shared memory)", rank=me, peer=peer, tag=self.tag,
                              op=op.name) from None
        except PeerLost as e:
            peer = self.ranks[e.peer]
            raise PeerLost(f"rank {me} lost rank {peer} in {op.name} (tag {self.tag!r}, shared memory): {e}",
                           rank=me, peer=peer, tag=self.tag, op=op.name) from None

    def _count(self, op: _Op, sent, received) -> None:
        """Bytes a shared-memory collective moved, as the TCP path would have sent and received them."""
        op.sent += _nbytes(a for a in sent if a is not None)
        op.received += _nbytes(a for a in received if a is not None)

    def _check_same(self, op: _Op, x, parts) -> None:
        for j, p in enumerate(parts):
            if p.shape != x.shape or p.dtype != x.dtype:
                raise CommError(
                    f"{op.name}: rank {self.ranks[self.rank]} has {x.dtype}{list(x.shape)} but rank "
                    f"{self.ranks[j]} sent {p.dtype}{list(p.shape)}",
                    rank=self.ranks[self.rank], peer=self.ranks[j], tag=self.tag, op=op.name,
                )

    # collectives --------------------------------------------------------------

    def all_reduce(self, x, *, timeout=None):
        """x (same shape on all ranks) -> sum over ranks, added in rank order, same bits everywhere."""
        if self.size == 1:
            return x
        x, dev = _to_host(x)
        op = self._begin("all_reduce", timeout)
        out = self._all_reduce_shared(op, x) if self.shared is not None else None
        if out is not None:
            op.sent = op.received = x.nbytes * (self.size - 1)        # as the TCP path would count them
        elif self.size > 2 and x.nbytes > RING_MIN_BYTES:
            out = self._all_reduce_split(op, x)
        else:
            received = self._exchange(op, [[x]] * self.size)
            parts = [x if j == self.rank else received[j][0] for j in range(self.size)]
            self._check_same(op, x, parts)
            out = _sum_in_rank_order(parts, self.rank)
        self._end(op)
        return _to_device(out, dev)

    def _all_reduce_shared(self, op: _Op, x):
        """all_reduce through the group's shared memory, in pieces of up to PIECE_BYTES: the sum of
        each piece in rank order, into a new array. None (nothing summed) where the group goes over
        TCP. The first exchange also carries x's shape, so ranks whose arrays differ all stop there."""
        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty_like(flat)
        per = max(1, PIECE_BYTES // max(1, x.itemsize))
        shape = np.array(x.shape, np.int64)
        for lo in range(0, max(flat.size, 1), per):
            piece = flat[lo:lo + per]
            shared = self._through_shared(op, [piece, shape] if lo == 0 else [piece])
            if shared is None:
                return None
            if lo == 0 and any(got[0].dtype != x.dtype or tuple(got[1].tolist()) != x.shape for got in shared):
                self._check_same(op, x, [np.broadcast_to(np.zeros((), got[0].dtype), tuple(got[1].tolist()))
                                         for got in shared])          # raises, naming the ranks
            _sum_in_rank_order([got[0] for got in shared], self.rank, out=out[lo:lo + per])
        return out.reshape(x.shape)

    def _all_reduce_split(self, op: _Op, x):
        """Rank j sums chunk j of everyone's flat x in rank order, then all gather the chunks."""
        flat = np.ascontiguousarray(x).reshape(-1)
        chunks = np.array_split(flat, self.size)
        received = self._exchange(op, [[c] for c in chunks])
        parts = [chunks[self.rank] if j == self.rank else received[j][0] for j in range(self.size)]
        self._check_same(op, chunks[self.rank], parts)
        mine = _sum_in_rank_order(parts, self.rank)
        gathered = self._exchange(op, [[mine]] * self.size)
        pieces = [mine if j == self.rank else gathered[j][0] for j in range(self.size)]
        return np.concatenate(pieces).reshape(x.shape)

    def all_gather(self, x, *, dim=0, timeout=None):
        """x (sizes along dim may differ) -> concatenation along dim in rank order."""
        if self.size == 1:
            return x
        x, dev = _to_host(x)
        op = self._begin("all_gather", timeout)
        parts = self._gather(op, x)
        out = np.concatenate(parts, axis=dim)
        self._end(op)
        return _to_device(out, dev)

    def _gather(self, op: _Op, x) -> list:
        """[x of rank 0, ..., x of rank size-1]; the others' may be views into shared memory."""
        shared = self._through_shared(op, [x])
        if shared is None:
            received = self._exchange(op, [[x]] * self.size)
            return [x if j == self.rank else received[j][0] for j in range(self.size)]
        parts = [got[0] for got in shared]
        self._count(op, [x] * (self.size - 1), parts[:self.rank] + parts[self.rank + 1:])
        return parts

    def _scatter(self, op: _Op, chunks: list) -> list:
        """chunks[j] to rank j -> [what rank j sent here, for each j], chunks[rank] itself at rank;
        the others' may be views into shared memory."""
        mine = [None if j == self.rank else c for j, c in enumerate(chunks)]
        shared = self._through_shared(op, mine)
        if shared is None:
            received = self._exchange(op, [[c] for c in chunks])
            return [chunks[j] if j == self.rank else received[j][0] for j in range(self.size)]
        parts = [chunks[j] if j == self.rank else got[self.rank] for j, got in enumerate(shared)]
        self._count(op, mine, parts[:self.rank] + parts[self.rank + 1:])
        return parts

    def all_gather_list(self, x, *, timeout=None) -> list:
        """x (any shape, dtype) -> [x of rank 0, ..., x of rank size-1]."""
        if self.size == 1:
            return [x]
        x, dev = _to_host(x)
        op = self._begin("all_gather_list", timeout)
        out = [p if j == self.rank else np.array(p) for j, p in enumerate(self._gather(op, x))]
        self._end(op)
        return _to_device(out, dev)

    def reduce_scatter(self, x, *, dim=0, timeout=None):
        """x (same shape on all ranks) -> chunk `rank` of array_split(sum, size, axis=dim)."""
        if self.size == 1:
            return x
        x, dev = _to_host(x)
        op = self._begin("reduce_scatter", timeout)
        chunks = [np.ascontiguousarray(c) for c in np.array_split(x, self.size, axis=dim)]
        mine = chunks[self.rank]
        parts = self._scatter(op, chunks)
        self._check_same(op, mine, parts)
        out = _sum_in_rank_order(parts, self.rank)
        self._end(op)
        return _to_device(out, dev)

    def all_to_all(self, chunks, *, timeout=None) -> list:
        """chunks[j] (any shape, may be empty) goes to rank j -> list whose element j came from rank j."""
        if len(chunks) != self.size:
            raise ValueError(f"all_to_all needs {self.size} chunks (one per rank), got {len(chunks)}")
        if self.size == 1:
            return list(chunks)
        host = [_to_host(c) for c in chunks]
        dev = any(d for _, d in host)
        op = self._begin("all_to_all", timeout)
        parts = self._scatter(op, [c for c, _ in host])
        out = [p if j == self.rank else np.array(p) for j, p in enumerate(parts)]
        self._end(op)
        return _to_device(out, dev)

    def send_recv(self, x, *, shift=1, timeout=None):
        """Ring shift: x goes to (rank+shift)%size -> x of (rank-shift)%size."""
        if self.size == 1 or shift % self.size == 0:
            return x
        x, dev = _to_host(x)
        op = self._begin("send_recv", timeout)
        self._send(op, (self.rank + shift) % self.size, [x])
        out = self._recv(op, (self.rank - shift) % self.size)[0]
        self._end(op)
        return _to_device(out, dev)

    def send(self, x, *, dst, timeout=None) -> None:
        """x to group rank `dst` (which calls recv(src=this rank)); returns once it is sent."""
        x, _ = _to_host(x)
        op = self._begin("send", timeout)
        self._send(op, dst, [x])
        self._end(op)

    def recv(self, *, src, like=None, timeout=None):
        """What group rank `src` sent with send(dst=this rank); on the device of `like` (None: host)."""
        op = self._begin("recv", timeout)
        out = self._recv(op, src)[0]
        self._end(op)
        return _to_device(out, like is not None and type(like).__module__.startswith("cupy"))

    def broadcast(self, x, *, root=0, timeout=None):
        """x of root (ignored elsewhere) -> root's x on every rank."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} outside group of size {self.size}")
        if self.size == 1:
            return x
        op = self._begin("broadcast", timeout)
        if self.rank == root:
            x, dev = _to_host(x)
            for j in self._others():
                self._send(op, j, [x])
            out = x
        else:
            dev = x is not None and type(x).__module__.startswith("cupy")
            out = self._recv(op, root)[0]
        self._end(op)
        return _to_device(out, dev)

    def barrier(self, *, timeout=None) -> None:
        """Return once every rank of the group has entered the barrier."""
        if self.size == 1:
            return
        op = self._begin("barrier", timeout)
        self._exchange(op, [[]] * self.size)
        self._end(op)


def single_communicator(default_timeout: float = 60.0) -> GroupCommunicator:
    """A size-1 communicator: every collective is the identity."""
    from .threads import ThreadHub

    return GroupCommunicator(ThreadHub(1).transport(0), [0], "world", default_timeout)
