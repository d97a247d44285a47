"""The driver's control connection to one rank: one msgpack message per step each way.

Opened at start-up (the rank listens, the driver dials), so a step costs a socket round
trip instead of a Dask actor call. Messages are a 4-byte little-endian length and a
msgpack body, never pickle; TLS wraps the socket when the cluster uses TLS. Each side
sends and then waits for the other's answer, so one blocking socket per rank suffices.

Example
-------
>>> server = ControlServer(lambda msg: ["ok", msg])
>>> link = ControlLink(server.address, timeout=5.0)
>>> link.send(["ping", 1]); link.recv(5.0)
['ok', ['ping', 1]]
>>> link.close(); server.close()
"""
from __future__ import annotations

import select
import socket
import struct
import threading
import time
import types

import msgpack

from .base import give_way

_PREFIX = struct.Struct("<I")


class ControlClosed(EOFError):
    """The other end closed the connection (its process ended or it shut down)."""


def _send(sock, obj) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    sock.sendall(_PREFIX.pack(len(body)) + body)


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ControlClosed("connection closed")
        got += k
    return bytes(buf)


def _recv(sock):
    (n,) = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    return msgpack.unpackb(_recv_exact(sock, n), raw=False, strict_map_key=False)


# After answering, a rank polls for the driver's next message this long before it blocks. The next
# step comes a few hundred microseconds after the answer, and a thread that never slept needs no
# wake-up: on a VM, waking an idle vCPU cost 100-150 us. tp=2 on 2 cores: the control path 0.47
# against 0.52 ms, and the ranks' first all-reduce waits less (benchmarks/rank_waits.py).
NEXT_MESSAGE_SPIN = 0.001


def _spin_until_readable(sock, seconds: float) -> None:
    """Until `sock` has bytes to read or `seconds` passed, giving this core to any thread that
    waits for it between looks (sched_yield: back at once if none)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if getattr(sock, "pending", lambda: 0)() or select.select([sock], [], [], 0)[0]:
            return                 # (pending: bytes TLS already decrypted, which select cannot see)
        give_way()


class ControlServer:
    """Rank side: accepts the driver's connection and answers each message with handler(msg).

    The handler runs in this server's own thread, one message at a time, in arrival order.
    Between messages the thread polls for NEXT_MESSAGE_SPIN seconds, then blocks.
    A handler that is a generator sends each reply it yields as soon as it yields it (a run
    of decode steps streams one reply per step).
    """

    def __init__(self, handler, host: str = "127.0.0.1", ssl_context=None, accept_timeout: float = 60.0):
        self.handler = handler
        self.ssl_context = ssl_context
        self.accept_timeout = accept_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.bind((host, 0))
            self._listener.listen(1)
        except BaseException:
            self._listener.close()
            raise
        self.address = (host, self._listener.getsockname()[1])
        self._sock = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="daskllm-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = None
        try:
            self._listener.settimeout(self.accept_timeout)
            sock, _ = self._listener.accept()
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            self._sock = sock
            if self._closed:           # closed while accepting
                return
            while True:
                _spin_until_readable(sock, NEXT_MESSAGE_SPIN)
                answer = self.handler(_recv(sock))
                for reply in (answer if isinstance(answer, types.GeneratorType) else [answer]):
                    _send(sock, reply)             # a generator handler answers several times, as it goes
        except (OSError, EOFError, ValueError):
            return                     # the driver went away or we were closed: nothing to answer
        finally:
            self._listener.close()
            if sock is not None:
                sock.close()

    def close(self) -> None:
        self._closed = True
        sock = self._sock
        if sock is not None:           # wakes the serving thread, which closes it
            try:                       # the raw socket's shutdown: an SSLSocket's would drop its state under the reader
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._listener.close()
        except OSError:
            pass
        self._thread.join(timeout=5.0)


class ControlLink:
    """Driver side: the connection to one rank's ControlServer."""

    def __init__(self, address, timeout: float, ssl_context=None):
        host, port = str(address[0]), int(address[1])
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock = ssl_context.wrap_socket(sock, server_hostname=host if ssl_context.check_hostname else None)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._timeout = timeout

    def send(self, obj) -> None:
        """Send one message (a few hundred bytes: it fits the socket buffer at once)."""
        _send(self._sock, obj)

    def recv(self, timeout: float):
        """The rank's next message; TimeoutError after `timeout` s, ControlClosed if it is gone."""
        self._settimeout(max(timeout, 0.001))
        return _recv(self._sock)

    def _settimeout(self, timeout) -> None:
        if timeout != self._timeout:           # a syscall per change, none per message otherwise
            self._sock.settimeout(timeout)
            self._timeout = timeout

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
