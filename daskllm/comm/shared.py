"""Collectives through shared memory, for the ranks of a group that share one host.

A tp=2 decode step makes two all-reduces per layer of a few KiB each, an ep=2 step two
all-to-alls and an all-gather per MoE layer. Over loopback TCP each costs two or three system
calls and a wake-up of the waiting rank: 150-170 us on this project's 2-core VM, against 8-43 us
for the same exchange through shared memory with the waiting rank spinning
(`benchmarks/collective_jitter.py --shared-memory`).

Layout of one segment per group (a file in /dev/shm, mapped by every rank, unlinked as soon as
all have mapped it): a sequence number per rank, each on its own cache line, then two slots per
rank of SLOT_BYTES each. all_reduce, all_gather(_list), all_to_all and reduce_scatter are each
one exchange (broadcast, barrier and point to point stay on TCP): for its k-th call a rank writes a
message into its slot k % 2 (a header giving the number, dtypes and shapes of its arrays, then
their bytes), then its sequence number k; once every rank's number is at least k, each reads
from the others' slots k % 2 what it needs (all_gather: everything; all_to_all: the array
addressed to it) and combines in rank order, as the TCP path does (same bits on every rank).
A rank can only be one call ahead of the slowest, so slot k % 2 is never written while another
rank still reads it. An all_reduce larger than a slot goes through in pieces, one exchange each
(the sum is elementwise, so the bits are the same). A rank whose message does not fit (any
other collective past a slot, a dtype without a code here) says so in its header instead; seeing
that, every rank does this call over TCP. x86-64 only: its stores become visible in program
order (the message before its number), which these plain NumPy stores rely on; elsewhere the
TCP path serves.

Every wait has the collective's timeout, and a peer whose process is gone is noticed within
milliseconds through its TCP connection (which stays for everything else). The waiting rank
spins for up to SPIN_SECONDS, giving way every ~100 us (sched_yield: to a thread queued for its
core, the late peer itself included, and to the GIL's other takers),
then naps between looks, so a long wait does not hold a core that a busy machine needs.
"""
from __future__ import annotations

import math
import mmap
import os
import platform
import secrets
import time
from array import array

import ml_dtypes
import numpy as np

from .base import CommTimeout, PeerLost, give_way

_HEADER_BYTES = 512          # at the start of each slot: what it holds (see SharedSlots._write)
_LINE = 64                   # bytes per sequence number: one cache line each
PIECE_BYTES = 1 << 20        # a decode step's activations fit many times; a 512-token prefill's 2 MiB
                             # all-reduce goes through in 2 pieces (181 us against 405 in pieces of
                             # 256 KiB and 1222 over TCP: collective_jitter.py --kib 2048)
SLOT_BYTES = _HEADER_BYTES + PIECE_BYTES + _LINE      # a piece, and the shape of what it is part of
_DIR = "/dev/shm"
_SPINS_PER_CHECK = 200       # spins between looks at the clock, the GIL and the peers' connections
SPIN_SECONDS = 0.002         # then naps of _NAP: a tp step's ranks meet every ~1-2 ms, well within it
_NAP = 50e-6
_TOO_BIG = -1                # a header's first word where the message did not fit
_MAX_NDIM = 4
_WORDS_PER_ARRAY = 2 + _MAX_NDIM
_DTYPES = [None] + [np.dtype(t) for t in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int64,
                                          np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32,
                                          np.uint64, np.bool_)]
_CODES = {t: code for code, t in enumerate(_DTYPES) if t is not None}


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(_DIR)


def segment_bytes(ranks: int) -> int:
    """The size of a group's segment: a sequence number's cache line and two slots per rank."""
    return _LINE * ranks + 2 * ranks * SLOT_BYTES


def share_memory(comm, alive) -> bool:
    """Give GroupCommunicator `comm` (whose ranks all run on this host) a SharedSlots for its
    collectives; every rank of the group calls this at the same point. alive(group rank) -> False
    once that rank's process is gone. False (and nothing changed) where it does not apply, or
    where any rank could not map the segment (a full or missing /dev/shm): the group agrees, over
    TCP, and stays on TCP."""
    if comm.size == 1 or not supported():
        return False
    size = segment_bytes(comm.size)
    path, buffer = None, None
    try:
        if comm.rank == 0:
            path = _create(size)
        name = np.frombuffer(path.encode(), np.uint8) if path else np.zeros(0, np.uint8)
        path = comm.broadcast(name, root=0).tobytes().decode()
        buffer = _map(path, size) if path else None
        mapped = np.array([buffer is not None], np.int64)
        everyone = int(comm.all_reduce(mapped)[0]) == comm.size         # also: every rank has it mapped
    finally:
        if comm.rank == 0 and path:
            os.unlink(path)                              # nothing left behind, whatever happens next
    if not everyone:
        if buffer is not None:
            buffer.close()
        return False
    comm.shared = SharedSlots(buffer, comm.rank, comm.size, alive)
    return True


def _create(size: int) -> str | None:
    """A new segment file of `size` bytes, readable by this user only; None if none can be made."""
    path = os.path.join(_DIR, f"daskllm-{os.getpid()}-{secrets.token_hex(8)}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)    # the pages now: a full /dev/shm fails here, not as a SIGBUS mid-step
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    os.close(fd)
    return path


def _map(path: str, size: int):
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, size)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class SharedSlots:
    """The shared segment of one group, seen from group rank `rank`.

    Sequence numbers and headers are read and written through an int64 memoryview, arrays as
    NumPy views at their offsets: a decode step's exchange is a few microseconds of Python."""

    def __init__(self, buffer, rank: int, size: int, alive):
        self.buffer, self.rank, self.size, self.alive = buffer, rank, size, alive
        self.words = memoryview(buffer).cast("q")                    # the segment as int64 words
        self.readonly = memoryview(buffer).toreadonly()              # the others' arrays are read-only views
        self.others = [j for j in range(size) if j != rank]
        self.seq_at = [j * _LINE // 8 for j in range(size)]           # word of each rank's sequence number
        self.slot_at = [[_LINE * size + (2 * j + parity) * SLOT_BYTES for parity in (0, 1)] for j in range(size)]
        self.calls = 0

    def exchange(self, arrays: list, deadline: float):
        """Every rank of the group calls this with its own list of arrays (None: an entry nobody
        reads). -> [list rank j published, for each j] (this rank's own list as given, the others'
        entries as read-only views into the segment, valid until this rank's next call), or None
        for every rank alike where some rank's list did not fit: the caller then goes over TCP.
        Raises CommTimeout or PeerLost with `peer` the group rank waited for."""
        self.calls += 1
        parity = self.calls % 2
        self._write(arrays, parity)
        self.words[self.seq_at[self.rank]] = self.calls                              # after the message
        self._wait(deadline)
        if any(self.words[self.slot_at[j][parity] // 8] == _TOO_BIG for j in range(self.size)):
            return None
        return [arrays if j == self.rank else self._read(j, parity) for j in range(self.size)]

    def _write(self, arrays: list, parity: int):
        """arrays into this rank's slot `parity`: a header of int64 words (their number, then per
        array its dtype's code, ndim and shape) and each array's bytes at a 64-byte boundary; the
        header says _TOO_BIG instead where they do not fit."""
        slot = self.slot_at[self.rank][parity]
        words, places, end = [len(arrays)], [], _HEADER_BYTES
        for a in arrays:
            if a is None:
                words += [0] * _WORDS_PER_ARRAY
                continue
            code = _CODES.get(a.dtype)
            if code is None or a.ndim > _MAX_NDIM:
                end = SLOT_BYTES + 1
                break
            words += [code, a.ndim, *a.shape] + [0] * (_MAX_NDIM - a.ndim)
            places.append((a, slot + end))
            end += -(-a.nbytes // _LINE) * _LINE
        if end > SLOT_BYTES or len(words) * 8 > _HEADER_BYTES:
            self.words[slot // 8] = _TOO_BIG
            return
        for a, at in places:
            np.copyto(np.frombuffer(self.buffer, a.dtype, a.size, at).reshape(a.shape), a)
        self.words[slot // 8:slot // 8 + len(words)] = array("q", words)

    def _read(self, j: int, parity: int) -> list:
        """The arrays rank j wrote into its slot `parity`, as read-only views."""
        slot = self.slot_at[j][parity]
        count = self.words[slot // 8]
        words = self.words[slot // 8 + 1:slot // 8 + 1 + count * _WORDS_PER_ARRAY].tolist()
        at, out = slot + _HEADER_BYTES, []
        for i in range(0, len(words), _WORDS_PER_ARRAY):
            code, ndim = words[i], words[i + 1]
            if code == 0:
                out.append(None)
                continue
            dtype, shape = _DTYPES[code], tuple(words[i + 2:i + 2 + ndim])
            size = math.prod(shape)
            out.append(np.frombuffer(self.readonly, dtype, size, at).reshape(shape))
            at += -(-size * dtype.itemsize // _LINE) * _LINE
        return out

    def _late(self):
        """The first other rank whose sequence number is behind this call, or None."""
        for j in self.others:
            if self.words[self.seq_at[j]] < self.calls:
                return j
        return None

    def _wait(self, deadline: float):
        """Spin while the others are about to arrive; past SPIN_SECONDS, nap between looks, so a
        rank that waits long (a slow peer, a busy machine) gives its core back."""
        spins, nap_from = 0, time.monotonic() + SPIN_SECONDS
        while (late := self._late()) is not None:
            spins += 1
            if spins % _SPINS_PER_CHECK:
                continue
            now = time.monotonic()
            if now > deadline:
                raise CommTimeout("timed out", peer=late)
            if not self.alive(late):
                raise PeerLost("its connection closed", peer=late)
            if now > nap_from:
                time.sleep(_NAP)
            else:
                give_way()

    def close(self):
        try:
            self.words.release()
            self.readonly.release()
            self.buffer.close()
        except (BufferError, ValueError):                # an array still views it: the OS frees it at exit
            pass

