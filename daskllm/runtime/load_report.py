"""ReportedReads: a rank's checkpoint reads, counted and reported to the client as Dask events.

The client shows them as load progress (dashboard.progress.LoadProgress): a rank sends
{"worker", "bytes"} on `topic` at most every `every` seconds while it reads, and a last one
with "done" when it closes the checkpoint. Bytes are the stored size of the slices read
(what comes off the disk), the same figure the client works out up front (`slice_bytes`).
"""
from __future__ import annotations

import math
import time


def slice_bytes(checkpoint, name: str, index) -> int:
    """Stored bytes of tensor `name` read at `index` (None: all of it; else a tuple of slices)."""
    total = checkpoint.nbytes(name)
    if index is None:
        return total
    shape = checkpoint.shape(name)
    kept = math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape))
    return total * kept // max(1, math.prod(shape))


class ReportedReads:
    """Wraps a Checkpoint; `read` and `close` report progress, everything else passes through."""

    def __init__(self, checkpoint, topic: str, every: float = 0.2):
        from distributed import get_worker
        self._checkpoint, self._topic, self._every = checkpoint, topic, every
        self._worker = get_worker()
        self._bytes, self._sent_at = 0, 0.0

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)

    def read(self, name, index=None, *args, **kwargs):
        array = self._checkpoint.read(name, index, *args, **kwargs)
        self._bytes += slice_bytes(self._checkpoint, name, index)
        if time.monotonic() - self._sent_at >= self._every:
            self._send(done=False)
        return array

    def close(self):
        self._send(done=True)
        self._checkpoint.close()

    def _send(self, done: bool):
        self._sent_at = time.monotonic()
        self._worker.log_event(self._topic, {"worker": self._worker.address, "bytes": self._bytes, "done": done})
