"""A transport over persistent TCP connections (TLS optional), one per pair of ranks.

Framing, non-blocking connection I/O and TLS live in tcp_conn.py.

Threading model: no receiver threads. Sockets are non-blocking and the thread
that waits reads: whoever blocks in `recv`, or in a `send` whose socket is
full, takes the transport's reader role, polls every connection, reads the
frames that arrive (small ones through a staging buffer, large array bodies
straight into their numpy buffers), keeps the one it wants and queues the rest
per ``(peer, tag)``. Other threads wait on a condition for their queue or for
the role. So a message costs one wake-up, not a hand-off between threads; two
ranks sending large arrays to each other at once never deadlock (a blocked
sender keeps reading); frames parse incrementally, so a timeout mid-frame
leaves the stream intact. A rank drains its sockets only while one of its
threads is inside the transport, so a send larger than the socket buffers
completes once the peer enters a comm call (every collective does).
Rank i dials every rank j < i and says hello with its rank; higher ranks are accepted.
The hello carries the transport's group (e.g. one replica incarnation): a rank of
another group, such as a frozen rank of a lost replica that wakes up, is turned away.
"""

from __future__ import annotations

import collections
import select
import socket
import ssl
import threading
import time


from .base import CommError, CommTimeout, Inbox, PeerLost, Transport, wire_array
from .tcp_conn import _BAD, _IN, _IOV_MAX, _RETRY_S, _Conn, _frame, _send_blocking, _tls_handshake

class TcpTransport(Transport):
    """Rank `rank` of `world_size`, connected to every other rank by one TCP socket.

    Example
    -------
    >>> t = TcpTransport(0, 1)
    >>> host, port = t.listen()
    >>> t.connect({0: (host, port)}, timeout=1.0)
    >>> t.close()
    """

    def __init__(self, rank: int, world_size: int, *, ssl_listen=None, ssl_connect=None, timeout=30.0,
                 spin=0.0, group: str = "-"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if (ssl_listen is None) != (ssl_connect is None):
            raise ValueError("give both ssl_listen and ssl_connect, or neither")
        self.rank = rank
        self.world_size = world_size
        self.ssl_listen, self.ssl_connect = ssl_listen, ssl_connect
        self.timeout = timeout  # also the longest a send may make no progress
        self.spin = spin        # seconds a receiver polls without sleeping before it blocks
        if not group or any(c.isspace() for c in group):
            raise ValueError(f"group must be a non-empty word, got {group!r}")
        self.group = group      # only ranks of the same group may connect
        self.inbox = Inbox(rank)  # waits on ranks without a connection (this rank itself)
        self._listener: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._closed = False
        self._lock = threading.Lock()
        # the reader role and the frames read for others, under _cv
        self._cv = threading.Condition(threading.Lock())
        self._queues: dict[tuple[int, str], collections.deque] = {}
        self._reading = False
        self._waiting = 0
        self._closed_error: CommError | None = None
        # used only by the holder of the reader role
        self._poll = select.poll()
        self._by_fd: dict[int, _Conn] = {}
        self._pending: set[_Conn] = set()  # connections that may hold parsed-ahead bytes

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
                conn = _Conn(sock)
                if self.ssl_connect is not None:
                    conn = _tls_handshake(sock, self.ssl_connect, False, address[0], deadline)
                _send_blocking(conn, _frame(f"hello {self.rank} {self.world_size} {self.group}", []))
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
            conn = _Conn(sock)
            if self.ssl_listen is not None:
                conn = _tls_handshake(sock, self.ssl_listen, True, None, deadline)
            tag, _ = conn.read_frame_blocking(deadline)
            word, peer, world, group = tag.split()
            peer, world = int(peer), int(world)
            if word == "hello" and group != self.group:
                sock.close()             # a rank of another group (a stale incarnation): turned away
                return
            if word != "hello" or world != self.world_size or peer not in missing:
                raise ValueError(f"unexpected hello {tag!r} (world {self.world_size}, expecting ranks {missing})")
        except (OSError, EOFError, ValueError, ssl.SSLError) as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise CommTimeout(
                    f"rank {self.rank}: ranks {missing} did not connect within {timeout} s", rank=self.rank
                ) from None
            raise CommError(f"rank {self.rank}: bad incoming connection: {e!r}", rank=self.rank) from None
        self._add(peer, conn)

    def _add(self, peer: int, conn: _Conn) -> None:
        with self._lock:
            if self._closed:
                conn.close()
                raise CommError(f"rank {self.rank}: transport is closed", rank=self.rank)
            conn.peer = peer
            conn.sock.setblocking(False)
            fd = conn.sock.fileno()
            self._conns[peer] = conn
            self._by_fd[fd] = conn
            self._poll.register(fd, _IN)
            self._pending.add(conn)  # the hello read may have staged bytes of the next frames

    # reading: only the holder of the reader role -------------------------------

    def _deliver(self, peer: int, tag: str, arrays: list) -> None:
        with self._cv:
            q = self._queues.get((peer, tag))
            if q is None:
                q = self._queues[(peer, tag)] = collections.deque()
            q.append(arrays)
            if self._waiting:
                self._cv.notify_all()

    def _pump(self, conn: _Conn, want: str | None = None):
        """Read what `conn` has; returns the first frame tagged `want`, queues the others."""
        if conn.error is not None:
            return None
        try:
            got = conn.pump(lambda tag, arrays: self._deliver(conn.peer, tag, arrays), want)
        except (EOFError, OSError, ssl.SSLError) as e:
            self._lose(conn, e)
            return None
        if got is None:
            self._pending.discard(conn)
        else:
            self._pending.add(conn)  # stopped early: more may be staged
        return got

    def _lose(self, conn: _Conn, e: BaseException) -> None:
        reason = "connection closed" if isinstance(e, EOFError) else repr(e)
        with self._cv:
            if conn.error is None:
                conn.error = self._closed_error or PeerLost(
                    f"rank {conn.peer} is gone ({reason})", rank=self.rank, peer=conn.peer
                )
            self._cv.notify_all()
        self._pending.discard(conn)
        try:
            self._poll.unregister(conn.sock.fileno())
        except (KeyError, ValueError, OSError):
            pass

    def _pump_ready(self, events, skip=None) -> None:
        for c in list(self._pending):
            if c is not skip:
                self._pump(c)
        for fd, ev in events:
            c = self._by_fd.get(fd)
            if c is not None and c is not skip and ev & (_IN | _BAD):
                self._pump(c)

    def _claim(self) -> bool:
        with self._cv:
            if self._reading:
                return False
            self._reading = True
            return True

    def _release(self) -> None:
        with self._cv:
            self._reading = False
            if self._waiting:
                self._cv.notify_all()

    # the Transport interface ----------------------------------------------------

    def send(self, peer: int, tag: str, arrays: list) -> None:
        conn = self._conns.get(peer)
        if conn is None or self._closed:
            state = "transport is closed" if self._closed else f"no connection to rank {peer}"
            raise CommError(f"rank {self.rank}: {state}", rank=self.rank, peer=peer, tag=tag)
        if conn.error is not None:
            raise conn.error
        arrays = [wire_array(a) for a in arrays]
        try:
            with conn.wlock:
                for views in conn.wire(_frame(tag, arrays)):
                    self._write(conn, views, tag)
        except (OSError, ssl.SSLError) as e:
            raise PeerLost(
                f"rank {self.rank} could not send to rank {peer}: {e!r}", rank=self.rank, peer=peer, tag=tag
            ) from None

    def _write(self, conn: _Conn, views: list, tag: str) -> None:
        """Put views on the non-blocking socket; while it is full, read what arrives."""
        stall = time.monotonic() + self.timeout
        while views:
            try:
                n = conn.sock.sendmsg(views[:_IOV_MAX])
            except BlockingIOError:
                left = stall - time.monotonic()
                if left <= 0:
                    raise CommTimeout(
                        f"rank {self.rank} could not send to rank {conn.peer} for {self.timeout:.1f} s "
                        f"(tag {tag!r}): it reads nothing",
                        rank=self.rank, peer=conn.peer, tag=tag,
                    ) from None
                self._wait_writable(conn, left)
                continue
            stall = time.monotonic() + self.timeout
            while n:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    def _wait_writable(self, conn: _Conn, timeout: float) -> None:
        """Until conn can take more bytes (or `timeout` s), reading every connection if we may."""
        if conn.error is not None:
            raise conn.error
        if not self._claim():  # another thread reads for us; look back soon in case it stops
            conn.pollout().poll(min(timeout, _RETRY_S) * 1000)
            return
        fd = conn.sock.fileno()
        try:
            self._poll.modify(fd, _IN | select.POLLOUT)
            try:
                events = []
                while True:
                    self._pump_ready(events)
                    if conn.error is not None:
                        raise conn.error
                    events = self._poll.poll(timeout * 1000)
                    if not events or any(f == fd and ev & (select.POLLOUT | _BAD) for f, ev in events):
                        return
            finally:
                if conn.error is None:
                    self._poll.modify(fd, _IN)
        finally:
            self._release()

    def recv(self, peer: int, tag: str, timeout: float) -> list:
        conn = self._conns.get(peer)
        if conn is None:
            if not self._closed and peer != self.rank:
                raise CommError(f"rank {self.rank}: no connection to rank {peer}", rank=self.rank, peer=peer, tag=tag)
            return self.inbox.get(peer, tag, timeout)
        deadline = time.monotonic() + max(timeout, 0.0)
        key = (peer, tag)
        with self._cv:
            while True:
                q = self._queues.get(key)
                if q:
                    return q.popleft()
                err = conn.error or self._closed_error
                if err is not None:
                    raise err
                if not self._reading:
                    self._reading = True
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timed_out(peer, tag, timeout)
                self._waiting += 1
                try:
                    self._cv.wait(left)
                finally:
                    self._waiting -= 1
        try:
            events = []
            spin_until = time.monotonic() + self.spin
            while True:
                got = self._pump(conn, tag)
                if got is not None:
                    return got
                if conn.error is not None:
                    raise conn.error
                self._pump_ready(events, skip=conn)
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    raise self._timed_out(peer, tag, timeout)
                # Poll without sleeping for a few microseconds first: a peer that is about to
                # answer costs no wake-up of a sleeping thread (as NCCL and MPI spin, then block).
                events = self._poll.poll(0 if now < spin_until else left * 1000)
        finally:
            self._release()

    def peer_alive(self, peer: int) -> bool:
        """False once the connection to `peer` is closed or broken: a look at its socket that reads
        nothing (the raw socket's peek, also under TLS), for waits that do not go through recv."""
        conn = self._conns.get(peer)
        if conn is None or conn.error is not None or self._closed:
            return False
        try:
            return socket.socket.recv(conn.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _timed_out(self, peer, tag, timeout) -> CommTimeout:
        return CommTimeout(
            f"rank {self.rank} waited {timeout:.1f} s for rank {peer} (tag {tag!r})",
            rank=self.rank, peer=peer, tag=tag,
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        error = CommError(f"rank {self.rank}: transport is closed", rank=self.rank)
        with self._cv:
            self._closed_error = error
            self._cv.notify_all()
        self.inbox.fail(None, error)
        for conn in self._conns.values():
            conn.shutdown()
        with self._cv:  # a reader wakes on the shutdown; let it leave before the sockets go
            self._waiting += 1
            try:
                self._cv.wait_for(lambda: not self._reading, timeout=5.0)
            finally:
                self._waiting -= 1
        for conn in self._conns.values():
            conn.close()
        if self._listener is not None:
            self._listener.close()


def tls_contexts_from_security(security) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(listen, connect) SSL contexts of a `distributed.security.Security` for worker links."""
    listen = security.get_listen_args("worker").get("ssl_context")
    connect = security.get_connection_args("worker").get("ssl_context")
    return listen, connect
