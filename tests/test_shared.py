"""comm.shared: small all-reduces through shared memory, between threads standing in for ranks."""
from __future__ import annotations

import glob
import mmap
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from daskllm.comm import shared
from daskllm.comm.base import CommError, CommTimeout, PeerLost
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


def _shared_group(size):
    """A thread group whose collectives go through one shared segment, and a plain one (TCP)."""
    comms = thread_group(size)
    assert all(_together([lambda c=c: shared.share_memory(c, lambda j: True) for c in comms]))
    return comms, thread_group(size)


def _every(comms, call):
    """call(comm, group rank) on every rank at once -> the results in rank order."""
    return _together([lambda c=c, r=r: call(c, r) for r, c in enumerate(comms)])


def _same(a, b):
    return type(a) is type(b) and (np.array_equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
                                   if isinstance(a, np.ndarray) else all(_same(x, y) for x, y in zip(a, b)))


@pytest.mark.parametrize("size", [2, 3])
def test_sums_in_rank_order_with_the_same_bits_everywhere_call_after_call(size):
    comms, _ = _shared_group(size)
    rng = np.random.default_rng(0)
    for call in range(200):                       # parity slots reused many times over
        shape = (1 + call % 3, 64)
        xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(size)]
        kept = [x.copy() for x in xs]
        outs = _every(comms, lambda c, r: c.all_reduce(xs[r]))
        want = xs[0] + xs[1]
        for x in xs[2:]:
            want = want + x
        for out in outs:
            assert out.dtype == np.float32 and out.shape == shape
            assert np.array_equal(out, want)
        assert all(np.array_equal(x, k) for x, k in zip(xs, kept))   # no rank's input was overwritten
    assert all(c.shared.calls == 200 for c in comms)


@pytest.mark.parametrize("size", [2, 3])
def test_gathers_all_to_alls_and_reduce_scatters_equal_the_tcp_path(size):
    """Every collective on the shared path gives what the TCP path gives, bit for bit and dtype for
    dtype (empty chunks, other dtypes, different sizes per rank), as arrays of the caller's own
    that later calls do not change."""
    comms, tcp = _shared_group(size)
    rng = np.random.default_rng(1)

    def chunks(r, j):                       # rank r's chunk for rank j: its own size, sometimes empty
        return rng.standard_normal(((r + 2 * j) % 3, 5)).astype(np.float32)
    rows = [rng.standard_normal((r + 1, 7)).astype(ml_dtypes.bfloat16) for r in range(size)]
    ids = [np.arange(r, r + 4, dtype=np.int64).reshape(2, 2) for r in range(size)]
    sent = [[chunks(r, j) for j in range(size)] for r in range(size)]
    x = [rng.standard_normal((2 * size + 1, 3)).astype(np.float32) for _ in range(size)]
    calls = {
        "all_gather": lambda c, r: c.all_gather(rows[r], dim=0),
        "all_gather dim 1": lambda c, r: c.all_gather(ids[r], dim=1),
        "all_gather_list": lambda c, r: c.all_gather_list(ids[r][: r + 1]),
        "all_to_all": lambda c, r: c.all_to_all(sent[r]),
        "reduce_scatter": lambda c, r: c.reduce_scatter(x[r], dim=0),
    }
    first = {name: _every(comms, call) for name, call in calls.items()}
    for name, call in calls.items():
        want = _every(tcp, call)
        again = _every(comms, call)            # the slots written over since `first` was returned
        for r in range(size):
            assert _same(first[name][r], want[r]), (name, r)
            assert _same(again[r], want[r]), (name, r)
    assert all(c.shared.calls == 2 * len(calls) for c in comms)
    for r in range(size):                       # the caller's own arrays, not views into the segment
        got = first["all_to_all"][r][(r + 1) % size]
        assert got.flags.writeable and got.flags.owndata


def test_a_message_that_does_not_fit_takes_every_rank_over_tcp_for_that_call():
    comms, _ = _shared_group(2)
    for c in comms:
        c.stats.reset()
    small, big = np.ones((2, 4), np.float32), np.ones((shared.SLOT_BYTES // 4, 1), np.float32)
    parts = [small[:, :1], big]
    outs = _every(comms, lambda c, r: c.all_gather(parts[r], dim=0))                  # rank 1's is too big
    assert all(np.array_equal(o, np.ones((2 + big.shape[0], 1), np.float32)) for o in outs)
    assert all(c.shared.calls == 1 for c in comms)             # tried, then over TCP on both ranks
    odd = [np.ones(3, np.complex64), np.ones(3, np.complex64)]                        # no dtype code
    assert all(np.array_equal(o, np.full(3, 2, np.complex64)) for o in _every(comms, lambda c, r: c.all_reduce(odd[r])))
    deep = np.ones((1, 1, 1, 1, 2), np.float32)                                       # more than 4 dims
    assert all(o.shape == (2, 1, 1, 1, 2) for o in _every(comms, lambda c, r: c.all_gather(deep, dim=0)))
    fine = _every(comms, lambda c, r: c.all_reduce(small))                             # and back on shared
    assert all(np.array_equal(o, 2 * small) for o in fine)
    assert comms[0].stats.as_dict()["all_reduce"]["bytes_sent"] == odd[0].nbytes + small.nbytes


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("elements, dtype", [(shared.PIECE_BYTES // 4 * 3, np.float32),      # 3 whole pieces
                                             (shared.PIECE_BYTES // 8 * 2 + 5, np.float64),  # 2 and a bit
                                             (shared.PIECE_BYTES // 4 - 1, np.float32)])    # one
def test_an_all_reduce_larger_than_a_slot_goes_through_in_pieces_with_the_same_bits(size, elements, dtype):
    comms, _ = _shared_group(size)
    for c in comms:
        c.stats.reset()
    rng = np.random.default_rng(elements)
    xs = [rng.standard_normal(elements).astype(dtype).reshape(-1, 1) for _ in range(size)]
    want = xs[0] + xs[1]
    for x in xs[2:]:
        want = want + x
    outs = _every(comms, lambda c, r: c.all_reduce(xs[r]))
    pieces = -(-elements * np.dtype(dtype).itemsize // shared.PIECE_BYTES)
    for c, out in zip(comms, outs):
        assert out.shape == xs[0].shape and out.dtype == dtype and np.array_equal(out, want)
        assert c.shared.calls == pieces
        assert c.stats.as_dict()["all_reduce"]["bytes_sent"] == xs[0].nbytes * (size - 1)


def test_an_all_reduce_of_different_sizes_stops_every_rank_at_its_first_piece():
    """Ranks whose arrays differ would make different numbers of pieces: they all stop at the
    first, which carries the shape, and none waits for a piece that never comes."""
    comms, _ = _shared_group(2)
    sizes = [shared.PIECE_BYTES // 4 * 2, shared.PIECE_BYTES // 4 * 3]
    errors = []

    def call(c, r):
        try:
            c.all_reduce(np.ones(sizes[r], np.float32), timeout=20)
        except CommError as e:
            errors.append(str(e))
    start = time.monotonic()
    _every(comms, call)
    assert time.monotonic() - start < 10 and len(errors) == 2
    assert all(c.shared.calls == 1 for c in comms)
    assert any(f"but rank 1 sent float32[{sizes[1]}]" in e for e in errors)


def test_a_dev_shm_without_room_for_the_segment_keeps_the_group_on_tcp(monkeypatch):
    """The segment's pages are reserved when it is made: a full /dev/shm is refused then, not met
    as a SIGBUS when a rank first writes to a page mid-step."""
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(shared.os, "posix_fallocate", full)
    comms = thread_group(2)
    before = set(glob.glob("/dev/shm/daskllm-*"))
    assert _together([lambda c=c: shared.share_memory(c, lambda j: True) for c in comms]) == [False, False]
    assert all(c.shared is None for c in comms) and set(glob.glob("/dev/shm/daskllm-*")) == before


def test_an_all_reduce_of_different_shapes_is_refused_naming_both_ranks():
    comms, _ = _shared_group(2)
    with pytest.raises(CommError, match=r"all_reduce: rank (0 has float32\[4\] but rank 1 sent float32\[5\]|1 has float32\[5\] but rank 0 sent float32\[4\])"):
        _every(comms, lambda c, r: c.all_reduce(np.ones(4 + r, np.float32)))


def test_a_rank_that_never_comes_times_out_naming_it():
    ranks = _slots(2)
    start = time.monotonic()
    with pytest.raises(CommTimeout) as err:
        ranks[0].exchange([np.ones(8, np.float32)], time.monotonic() + 0.2)
    assert err.value.peer == 1 and time.monotonic() - start < 2


def test_a_rank_whose_process_is_gone_is_noticed_at_once():
    ranks = _slots(2, alive=lambda j: False)
    start = time.monotonic()
    with pytest.raises(PeerLost) as err:
        ranks[0].exchange([np.ones(8, np.float32)], time.monotonic() + 60)
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
    big = [np.ones(shared.SLOT_BYTES // 4 + 1, np.float32) for _ in range(2)]        # over a slot: 2 pieces
    outs = _together([lambda r=r: comms[r].all_reduce(big[r]) for r in range(2)])
    assert all(np.array_equal(o, 2 * big[0]) for o in outs)
    assert all(c.shared.calls == 3 for c in comms)
    for c in comms:
        c.shared.close()


def test_a_lost_peer_names_both_ranks_in_the_communicators_error():
    comms = thread_group(2)
    _together([lambda c=c: shared.share_memory(c, lambda j: False) for c in comms])
    with pytest.raises(PeerLost, match=r"rank 0 lost rank 1 in all_reduce \(tag 'world', shared memory\)"):
        comms[0].all_reduce(np.ones(4, np.float32), timeout=30)


def test_a_peer_arriving_during_a_check_is_only_asked_about_and_then_read():
    """The check between spins asks about the rank found late in the same read, never about the
    waiting rank itself (a race once named it lost); a peer that arrives meanwhile is read."""
    asked = []

    def alive(j):                        # the peer's number appears while it is being asked about
        asked.append(j)
        ranks[1].words[ranks[1].seq_at[1]] = ranks[0].calls
        return True
    ranks = _slots(2, alive=alive)
    ranks[1]._write([np.zeros(4, np.float32)], parity=1)          # its message, not yet its number
    got = ranks[0].exchange([np.ones(4, np.float32)], time.monotonic() + 5)
    assert asked == [1]
    assert [g[0].tolist() for g in got] == [[1.0] * 4, [0.0] * 4]


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
