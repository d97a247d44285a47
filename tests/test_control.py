"""The control connection (comm.control) and the step message (runtime.wire), in one process."""
from __future__ import annotations

import threading
import time

import pytest

from daskllm.comm.control import ControlClosed, ControlLink, ControlServer
from daskllm.model.runner import Work
from daskllm.model.sampling import SamplingParams
from daskllm.runtime.wire import work_from_wire, work_to_wire


def test_messages_go_both_ways_in_order():
    server = ControlServer(lambda msg: ["ok", msg[1] * 2])
    link = ControlLink(server.address, timeout=5.0)
    try:
        for i in range(50):
            link.send(["step", i])
            assert link.recv(5.0) == ["ok", 2 * i]
    finally:
        link.close()
        server.close()


def test_a_generator_handler_streams_each_reply_as_it_yields_it():
    def handler(msg):
        for i in range(msg[1]):
            yield ["ok", i]

    server = ControlServer(handler)
    link = ControlLink(server.address, timeout=5.0)
    try:
        link.send(["steps", 3])
        link.send(["steps", 2])
        assert [link.recv(5.0) for _ in range(5)] == [["ok", 0], ["ok", 1], ["ok", 2], ["ok", 0], ["ok", 1]]
    finally:
        link.close()
        server.close()


def test_int_keys_and_big_seeds_survive_the_trip():
    server = ControlServer(lambda msg: ["ok", {7: 42, -3: 1}, msg])
    link = ControlLink(server.address, timeout=5.0)
    try:
        link.send([2 ** 63 - 1, 0.5, True, None])
        assert link.recv(5.0) == ["ok", {7: 42, -3: 1}, [2 ** 63 - 1, 0.5, True, None]]
    finally:
        link.close()
        server.close()


def test_objects_are_never_pickled():
    server = ControlServer(lambda msg: ["ok"])
    link = ControlLink(server.address, timeout=5.0)
    try:
        with pytest.raises(TypeError, match="can not serialize"):
            link.send([object()])
    finally:
        link.close()
        server.close()


def test_a_rank_that_does_not_answer_times_out():
    release = threading.Event()
    server = ControlServer(lambda msg: release.wait(10) and ["ok"])
    link = ControlLink(server.address, timeout=5.0)
    try:
        link.send(["step"])
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            link.recv(0.3)
        assert time.monotonic() - start < 2.0
    finally:
        release.set()
        link.close()
        server.close()


def test_a_rank_that_goes_away_ends_the_wait_at_once():
    server = ControlServer(lambda msg: ["ok"])
    link = ControlLink(server.address, timeout=5.0)
    link.send(["step"])
    assert link.recv(5.0) == ["ok"]
    server.close()
    start = time.monotonic()
    with pytest.raises((ControlClosed, OSError)):
        link.send(["step"])
        link.recv(5.0)
    assert time.monotonic() - start < 2.0
    link.close()


def test_tls_both_ways():
    pytest.importorskip("cryptography", reason="distributed's Security.temporary() needs the cryptography package")
    import ssl

    from distributed.security import Security

    from daskllm.comm.tcp import tls_contexts_from_security
    security = Security.temporary()
    server = ControlServer(lambda msg: ["ok", msg], ssl_context=tls_contexts_from_security(security)[0])
    link = ControlLink(server.address, timeout=5.0,
                       ssl_context=security.get_connection_args("client")["ssl_context"])
    try:
        assert isinstance(link._sock, ssl.SSLSocket)
        link.send(["step", [1, 2, 3]])
        assert link.recv(5.0) == ["ok", ["step", [1, 2, 3]]]
    finally:
        link.close()
        server.close()


def test_plain_client_cannot_talk_to_a_tls_rank():
    pytest.importorskip("cryptography", reason="distributed's Security.temporary() needs the cryptography package")
    from distributed.security import Security

    from daskllm.comm.tcp import tls_contexts_from_security
    server = ControlServer(lambda msg: ["ok"], ssl_context=tls_contexts_from_security(Security.temporary())[0])
    link = ControlLink(server.address, timeout=5.0)
    try:
        with pytest.raises((ControlClosed, OSError)):
            link.send(["step"])
            link.recv(5.0)
    finally:
        link.close()
        server.close()


def test_work_round_trips_through_the_wire_format():
    import msgpack
    work = [Work(3, (1, 2, 3), 0, False), Work(9, (7,), 41, True, SamplingParams(0.7, 40, 0.9, 2 ** 62), 5)]
    wire = msgpack.unpackb(msgpack.packb([work_to_wire(w) for w in work]))
    assert [work_from_wire(w) for w in wire] == work


def test_a_rank_polls_for_the_next_message_only_until_it_comes_or_its_time_is_up():
    import socket

    from daskllm.comm.control import _spin_until_readable
    a, b = socket.socketpair()
    try:
        start = time.perf_counter()
        _spin_until_readable(a, 0.05)                  # nothing comes: it gives up after its time
        assert 0.05 <= time.perf_counter() - start < 1.0
        b.sendall(b"x")
        start = time.perf_counter()
        _spin_until_readable(a, 30.0)                  # a message waits: it returns at once
        assert time.perf_counter() - start < 1.0
        assert a.recv(1) == b"x"
    finally:
        a.close()
        b.close()
