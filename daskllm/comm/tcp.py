"""A transport over persistent TCP connections (TLS optional), one per pair of ranks.

Wire format of one message: a 4-byte little-endian length, a msgpack header
``[tag, [[dtype name, shape], ...]]``, then each array's raw bytes. Sends go
out with one ``sendmsg`` (no copy, no pickle); one receiver thread per
connection reads frames into fresh numpy buffers and queues them per
``(peer, tag)``, so two ranks sending large arrays to each other at once never
deadlock. Rank i dials every rank j < i and says hello with its rank; higher
ranks are accepted.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time

import ml_dtypes  # noqa: F401  (registers bfloat16 and friends with numpy.dtype)
import msgpack
import numpy as np

from .base import CommError, CommTimeout, Inbox, PeerLost, Transport, wire_array

_PREFIX = struct.Struct("<I")
_TLS_CHUNK = 1 << 20  # plaintext bytes encrypted per lock hold
_IOV_MAX = 512


class _Plain:
    """A connected socket: gathered writes under a lock, plain reads."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.wlock = threading.Lock()

    def send(self, bufs: list) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        views = [v for v in views if v.nbytes]
        with self.wlock:
            while views:
                n = self.sock.sendmsg(views[:_IOV_MAX])
                while n:
                    if n >= views[0].nbytes:
                        n -= views[0].nbytes
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0

    def recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class _Tls(_Plain):
    """A TLS connection through memory BIOs, so one thread may read while another writes.

    (An SSLSocket must not be read and written at once from two threads.)
    Records that reading produces (rare after the handshake) leave with the next send.
    """

    def __init__(self, sock, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        super().__init__(sock)
        self.obj, self.incoming, self.outgoing = obj, incoming, outgoing
        self.ssl_lock = threading.Lock()

    def send(self, bufs: list) -> None:
        with self.wlock:
            for b in bufs:
                mv = memoryview(b).cast("B")
                for i in range(0, mv.nbytes, _TLS_CHUNK):
                    with self.ssl_lock:
                        self.obj.write(mv[i : i + _TLS_CHUNK])
                        data = self.outgoing.read()
                    self.sock.sendall(data)

    def recv_into(self, view: memoryview) -> int:
        while True:
            with self.ssl_lock:
                try:
                    return self.obj.read(view.nbytes, view)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return 0
            data = self.sock.recv(1 << 18)
            if not data:
                return 0
            with self.ssl_lock:
                self.incoming.write(data)


def _tls_handshake(sock, ctx: ssl.SSLContext, server_side: bool, hostname, deadline) -> _Tls:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hostname = None if server_side or not ctx.check_hostname else hostname
    obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=hostname)
    while True:
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        data = outgoing.read()
        if data:
            sock.sendall(data)
        if done:
            return _Tls(sock, obj, incoming, outgoing)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("peer closed the connection during the TLS handshake")
        incoming.write(data)


def _read_exact(conn: _Plain, view: memoryview) -> None:
    while view.nbytes:
        n = conn.recv_into(view)
        if n == 0:
            raise EOFError("connection closed")
        view = view[n:]


def _bytes_of(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


def _read_frame(conn: _Plain, prefix: bytearray) -> tuple[str, list]:
    _read_exact(conn, memoryview(prefix))
    header = bytearray(_PREFIX.unpack(prefix)[0])
    _read_exact(conn, memoryview(header))
    tag, specs = msgpack.unpackb(header)
    arrays = []
    for dtype, shape in specs:
        a = np.empty(shape, dtype=np.dtype(dtype))
        if a.nbytes:
            _read_exact(conn, _bytes_of(a))
        arrays.append(a)
    return tag, arrays


def _frame(tag: str, arrays: list) -> list:
    """Buffers of one message: prefix + header, then each array's bytes."""
    header = msgpack.packb([tag, [[a.dtype.name, a.shape] for a in arrays]])
    return [_PREFIX.pack(len(header)) + header] + [_bytes_of(a) for a in arrays if a.nbytes]


class TcpTransport(Transport):
    """Rank `rank` of `world_size`, connected to every other rank by one TCP socket.

    Example
    -------
    >>> t = TcpTransport(0, 1)
    >>> host, port = t.listen()
    >>> t.connect({0: (host, port)}, timeout=1.0)
    >>> t.close()
    """

    def __init__(self, rank: int, world_size: int, *, ssl_listen=None, ssl_connect=None, timeout=30.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if (ssl_listen is None) != (ssl_connect is None):
            raise ValueError("give both ssl_listen and ssl_connect, or neither")
        self.rank = rank
        self.world_size = world_size
        self.ssl_listen, self.ssl_connect = ssl_listen, ssl_connect
        self.timeout = timeout
        self.inbox = Inbox(rank)
        self._listener: socket.socket | None = None
        self._conns: dict[int, _Plain] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self):
        return f"TcpTransport(rank={self.rank}, world_size={self.world_size}, peers={sorted(self._conns)})"

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Open the listening socket; returns the (host, port) peers should dial."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
            sock.listen(max(self.world_size, 16))
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        return host, sock.getsockname()[1]

    def connect(self, addresses: dict, timeout: float | None = None) -> None:
        """Open a connection to every other rank; `addresses` maps rank -> (host, port).

        Rank i dials ranks below it and accepts ranks above it; all ranks must
        call this at about the same time. CommTimeout names the ranks missing.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        addresses = {int(k): (str(v[0]), int(v[1])) for k, v in addresses.items()}
        if self.rank + 1 < self.world_size and self._listener is None:
            raise CommError(f"rank {self.rank}: call listen() before connect()", rank=self.rank)
        for peer in range(self.rank):
            if peer not in addresses:
                raise CommError(f"rank {self.rank}: no address for rank {peer}", rank=self.rank, peer=peer)
            self._dial(peer, addresses[peer], deadline, timeout)
        while True:
            missing = [p for p in range(self.rank + 1, self.world_size) if p not in self._conns]
            if not missing:
                return
            self._accept(deadline, timeout, missing)

    def _dial(self, peer, address, deadline, timeout) -> None:
        while True:
            sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Plain(sock)
                if self.ssl_connect is not None:
                    conn = _tls_handshake(sock, self.ssl_connect, False, address[0], deadline)
                conn.send(_frame(f"hello {self.rank} {self.world_size}", []))
                sock.settimeout(None)
                self._add(peer, conn)
                return
            except (ConnectionRefusedError, ConnectionResetError) as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise CommTimeout(
                        f"rank {self.rank} could not reach rank {peer} at {address} within {timeout} s: {e}",
                        rank=self.rank, peer=peer,
                    ) from None
                time.sleep(0.05)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise CommError(
                    f"rank {self.rank} failed to connect to rank {peer} at {address}: {e!r}",
                    rank=self.rank, peer=peer,
                ) from None
            except BaseException:
                sock.close()
                raise

    def _accept(self, deadline, timeout, missing) -> None:
        self._listener.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock, _ = self._listener.accept()
        except TimeoutError:
            raise CommTimeout(
                f"rank {self.rank}: ranks {missing} did not connect within {timeout} s", rank=self.rank
            ) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            conn = _Plain(sock)
            if self.ssl_listen is not None:
                conn = _tls_handshake(sock, self.ssl_listen, True, None, deadline)
            tag, _ = _read_frame(conn, bytearray(_PREFIX.size))
            word, peer, world = tag.split()
            peer, world = int(peer), int(world)
            if word != "hello" or world != self.world_size or peer not in missing:
                raise ValueError(f"unexpected hello {tag!r} (world {self.world_size}, expecting ranks {missing})")
            sock.settimeout(None)
        except (OSError, EOFError, ValueError, ssl.SSLError) as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise CommTimeout(
                    f"rank {self.rank}: ranks {missing} did not connect within {timeout} s", rank=self.rank
                ) from None
            raise CommError(f"rank {self.rank}: bad incoming connection: {e!r}", rank=self.rank) from None
        self._add(peer, conn)

    def _add(self, peer: int, conn: _Plain) -> None:
        with self._lock:
            if self._closed:
                conn.close()
                raise CommError(f"rank {self.rank}: transport is closed", rank=self.rank)
            self._conns[peer] = conn
            t = threading.Thread(
                target=self._receive, args=(peer, conn), name=f"daskllm-recv-{self.rank}<-{peer}", daemon=True
            )
            self._threads.append(t)
        t.start()

    def _receive(self, peer: int, conn: _Plain) -> None:
        """Receiver thread: queue every frame from `peer` until the connection ends."""
        prefix = bytearray(_PREFIX.size)
        try:
            while True:
                tag, arrays = _read_frame(conn, prefix)
                self.inbox.put(peer, tag, arrays)
        except Exception as e:  # noqa: BLE001  (any end of the stream means the peer is gone)
            reason = "connection closed" if isinstance(e, EOFError) else repr(e)
            self.inbox.fail(peer, PeerLost(f"rank {peer} is gone ({reason})", rank=self.rank, peer=peer))

    def send(self, peer: int, tag: str, arrays: list) -> None:
        conn = self._conns.get(peer)
        if conn is None or self._closed:
            state = "transport is closed" if self._closed else f"no connection to rank {peer}"
            raise CommError(f"rank {self.rank}: {state}", rank=self.rank, peer=peer, tag=tag)
        err = self.inbox.error(peer)
        if err is not None:
            raise err
        arrays = [wire_array(a) for a in arrays]
        try:
            conn.send(_frame(tag, arrays))
        except (OSError, ssl.SSLError) as e:
            raise PeerLost(
                f"rank {self.rank} could not send to rank {peer}: {e!r}", rank=self.rank, peer=peer, tag=tag
            ) from None

    def recv(self, peer: int, tag: str, timeout: float) -> list:
        if peer not in self._conns and not self._closed and peer != self.rank:
            raise CommError(f"rank {self.rank}: no connection to rank {peer}", rank=self.rank, peer=peer, tag=tag)
        return self.inbox.get(peer, tag, timeout)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.inbox.fail(None, CommError(f"rank {self.rank}: transport is closed", rank=self.rank))
        for conn in self._conns.values():
            conn.shutdown()
        for t in self._threads:
            t.join(timeout=5.0)
        for conn in self._conns.values():
            conn.close()
        if self._listener is not None:
            self._listener.close()


def tls_contexts_from_security(security) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(listen, connect) SSL contexts of a `distributed.security.Security` for worker links."""
    listen = security.get_listen_args("worker").get("ssl_context")
    connect = security.get_connection_args("worker").get("ssl_context")
    return listen, connect
