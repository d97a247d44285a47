"""comm.shared: small all-reduces through shared memory, between threads standing in for ranks."""
from __future__ import annotations

import glob
import mmap
import threading
import time

import numpy as np
import pytest

from daskllm.comm import shared
from daskllm.comm.base import CommTimeout, PeerLost
from daskllm.comm.threads import thread_group

pytestmark = pytest.mark.skipif(not shared.supported(), reason="shared memory all-reduce is x86-64 Linux only")


def _slots(size, alive=lambda j: True):
    buffer = mmap.mmap(-1, shared.segment_bytes(size))
    return [shared.SharedSlots(buffer, r, size, alive) for r in range(size)]


def _together(fns):
    out, errors = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("size", [2, 3])
def test_sums_in_rank_order_with_the_same_bits_everywhere_call_after_call(size):
    ranks = _slots(size)
    rng = np.random.default_rng(0)
    for call in range(200):                       # parity slots reused many times over
        shape = (1 + call % 3, 64)
        xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(size)]
        outs = _together([lambda r=r: ranks[r].all_reduce(xs[r], time.monotonic() + 10) for r in range(size)])
        want = xs[0] + xs[1]
        for x in xs[2:]:
            want = want + x
        for out in outs:
            assert out.dtype == np.float32 and out.shape == shape
            assert np.array_equal(out, want)
        assert all(x is not out for x, out in zip(xs, outs))   # no rank's input was overwritten


def test_a_rank_that_never_comes_times_out_naming_it():
    ranks = _slots(2)
    start = time.monotonic()
    with pytest.raises(CommTimeout) as err:
        ranks[0].all_reduce(np.ones(8, np.float32), time.monotonic() + 0.2)
    assert err.value.peer == 1 and time.monotonic() - start < 2


def test_a_rank_whose_process_is_gone_is_noticed_at_once():
    ranks = _slots(2, alive=lambda j: False)
    start = time.monotonic()
    with pytest.raises(PeerLost) as err:
        ranks[0].all_reduce(np.ones(8, np.float32), time.monotonic() + 60)
    assert err.value.peer == 1 and time.monotonic() - start < 1


def test_a_group_shares_a_segment_that_is_gone_from_dev_shm_once_mapped():
    comms = thread_group(2)
    before = set(glob.glob("/dev/shm/daskllm-*"))
    assert all(_together([lambda c=c: shared.share_memory(c, lambda j: True) for c in comms]))
    assert set(glob.glob("/dev/shm/daskllm-*")) == before
    for c in comms:
        c.stats.reset()                             # the set-up's own collectives
    xs = [np.full((2, 3), r + 1.5, np.float32) for r in range(2)]
    outs = _together([lambda r=r: comms[r].all_reduce(xs[r]) for r in range(2)])
    assert all(np.array_equal(o, xs[0] + xs[1]) for o in outs)
    assert comms[0].stats.as_dict()["all_reduce"]["bytes_sent"] == xs[0].nbytes
    big = [np.ones(shared.SLOT_BYTES // 4 + 1, np.float32) for _ in range(2)]        # over a slot: TCP path
    outs = _together([lambda r=r: comms[r].all_reduce(big[r]) for r in range(2)])
    assert all(np.array_equal(o, 2 * big[0]) for o in outs)
    for c in comms:
        c.shared.close()


def test_a_lost_peer_names_both_ranks_in_the_communicators_error():
    comms = thread_group(2)
    _together([lambda c=c: shared.share_memory(c, lambda j: False) for c in comms])
    with pytest.raises(PeerLost, match=r"rank 0 lost rank 1 in all_reduce \(tag 'world', shared memory\)"):
        comms[0].all_reduce(np.ones(4, np.float32), timeout=30)


def test_a_peer_arriving_during_a_check_is_not_taken_for_lost():
    """The check between spins reads the sequence numbers again: if the last peer arrived since
    the spin's own read, nobody is late (a race that once named the waiting rank itself lost)."""
    ranks = _slots(2, alive=lambda j: pytest.fail(f"asked whether rank {j} is alive; both are here"))

    class Arrives:                       # the peer's number: behind for the spins, there for the check
        def __init__(self, seqs):
            self.seqs, self.reads = seqs, 0

        def __setitem__(self, i, value):
            self.seqs[i] = value

        def __lt__(self, calls):
            self.reads += 1
            if self.reads == shared._SPINS_PER_CHECK + 1:
                self.seqs[1] = calls
            return self.seqs < calls

    ranks[0].seqs = Arrives(ranks[0].seqs)
    assert np.array_equal(ranks[0].all_reduce(np.ones(4, np.float32), time.monotonic() + 5), np.full(4, 1.0))


def test_a_rank_that_cannot_map_the_segment_keeps_the_whole_group_on_tcp(monkeypatch):
    comms = thread_group(2)
    real_map = shared._map
    monkeypatch.setattr(shared, "_map", lambda path, size: None if threading.current_thread().name == "r1"
                        else real_map(path, size))
    before = set(glob.glob("/dev/shm/daskllm-*"))
    results = [None, None]

    def run(r):
        results[r] = shared.share_memory(comms[r], lambda j: True)
    threads = [threading.Thread(target=run, args=(r,), name=f"r{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [False, False] and all(c.shared is None for c in comms)
    assert set(glob.glob("/dev/shm/daskllm-*")) == before
    outs = _together([lambda r=r: comms[r].all_reduce(np.full(3, r + 1.0, np.float32)) for r in range(2)])
    assert all(np.array_equal(o, np.full(3, 3.0)) for o in outs)
