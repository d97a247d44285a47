"""One connection of the TCP transport: message framing, non-blocking reads and writes, TLS.

Wire format of one message: a 4-byte little-endian header length, a msgpack header
``[tag, [[dtype name, shape], ...]]``, then each array's raw bytes (no pickle).
TLS runs through memory BIOs so that reading and writing never share an SSLSocket.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time

import ml_dtypes  # noqa: F401  (registers bfloat16 and friends with numpy.dtype)
import msgpack
import numpy as np

from .base import CommError

_PREFIX = struct.Struct("<I")
_TLS_CHUNK = 1 << 20  # plaintext bytes encrypted at a time
_IOV_MAX = 512
_STAGING = 1 << 18  # bytes read at a time for headers and small arrays
_DIRECT_MIN = 1 << 16  # array bytes still missing above which recv goes straight into the array
_RETRY_S = 0.005  # a sender that cannot take the reader role checks back this often
_IN = select.POLLIN | select.POLLPRI
_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


def _bytes_of(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


def _frame(tag: str, arrays: list) -> list:
    """Buffers of one message: prefix + header, then each array's bytes."""
    header = msgpack.packb([tag, [[a.dtype.name, a.shape] for a in arrays]])
    return [_PREFIX.pack(len(header)) + header] + [_bytes_of(a) for a in arrays if a.nbytes]


class _Partial:
    """A frame whose array bytes are still arriving."""

    __slots__ = ("tag", "arrays", "views")

    def __init__(self, tag, arrays, views):
        self.tag, self.arrays, self.views = tag, arrays, views


class _Conn:
    """One connected socket (non-blocking once wired) and its incremental frame parser.

    The parser state is touched only by the holder of the transport's reader role.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.peer = -1
        self.wlock = threading.Lock()  # one sender at a time
        self.error: CommError | None = None  # set once the stream ended; queued frames still deliver
        self._buf = bytearray(_STAGING)
        self._mv = memoryview(self._buf)
        self._r0 = self._r1 = 0  # unparsed bytes are _buf[_r0:_r1]
        self._partial: _Partial | None = None
        self._pout: select.poll | None = None  # used by a sender without the reader role

    # socket level (TLS overrides) ---------------------------------------------

    def recv_into(self, view: memoryview) -> int:
        """Bytes read into view; 0 at end of stream; BlockingIOError when nothing is there."""
        return self.sock.recv_into(view)

    def wire(self, bufs: list):
        """Lists of buffers to put on the socket, in order."""
        yield [v for v in (memoryview(b).cast("B") for b in bufs) if v.nbytes]

    def pollout(self) -> select.poll:
        if self._pout is None:
            self._pout = select.poll()
            self._pout.register(self.sock.fileno(), select.POLLOUT)
        return self._pout

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    # frames ---------------------------------------------------------------------

    def pump(self, deliver, want: str | None = None):
        """Parse and read until the socket is drained; frames go to deliver(tag, arrays),
        except the first one tagged `want`, which is returned (None: drained first).
        EOFError at end of stream; OSError/ssl.SSLError on a broken connection."""
        while True:
            while True:
                frame = self._parse()
                if frame is None:
                    break
                if frame[0] == want:
                    return frame[1]
                deliver(*frame)
            try:
                n = self._read_some()
            except BlockingIOError:
                return None
            if n == 0:
                raise EOFError("connection closed")

    def _parse(self):
        """The next complete frame (tag, arrays) from the staging buffer, or None."""
        mv = self._mv
        while True:
            p = self._partial
            if p is not None:
                avail = self._r1 - self._r0
                while p.views and avail:
                    v = p.views[0]
                    n = min(v.nbytes, avail)
                    v[:n] = mv[self._r0 : self._r0 + n]
                    self._r0 += n
                    avail -= n
                    if n == v.nbytes:
                        p.views.pop(0)
                    else:
                        p.views[0] = v[n:]
                if p.views:
                    return None
                self._partial = None
                return p.tag, p.arrays
            avail = self._r1 - self._r0
            if avail < _PREFIX.size:
                return None
            size = _PREFIX.size + _PREFIX.unpack_from(self._buf, self._r0)[0]
            if avail < size:
                if size > len(self._buf):  # a header larger than the staging buffer
                    buf = bytearray(max(size, 2 * len(self._buf)))
                    buf[:avail] = mv[self._r0 : self._r1]
                    self._buf, self._mv, self._r0, self._r1 = buf, memoryview(buf), 0, avail
                return None
            tag, specs = msgpack.unpackb(mv[self._r0 + _PREFIX.size : self._r0 + size])
            self._r0 += size
            arrays = [np.empty(shape, dtype=np.dtype(dtype)) for dtype, shape in specs]
            self._partial = _Partial(tag, arrays, [_bytes_of(a) for a in arrays if a.nbytes])

    def _read_some(self) -> int:
        """One read: straight into the array being filled when it misses many bytes, else into staging."""
        p = self._partial
        if p is not None and p.views and self._r0 == self._r1 and p.views[0].nbytes >= _DIRECT_MIN:
            v = p.views[0]
            n = self.recv_into(v)
            if n == v.nbytes:
                p.views.pop(0)
            elif n:
                p.views[0] = v[n:]
            return n
        if self._r0 == self._r1:
            self._r0 = self._r1 = 0
        elif len(self._buf) - self._r1 < _DIRECT_MIN:  # move the unparsed tail to the front
            rest = bytes(self._mv[self._r0 : self._r1])
            self._buf[: len(rest)] = rest
            self._r0, self._r1 = 0, len(rest)
        n = self.recv_into(self._mv[self._r1 :])
        self._r1 += n
        return n

    def read_frame_blocking(self, deadline: float) -> tuple[str, list]:
        """The first frame, read on a blocking socket (used for the hello)."""
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if self._read_some() == 0:
                raise EOFError("connection closed")


class _TlsConn(_Conn):
    """A TLS connection through memory BIOs, so that reads and writes need no SSLSocket.

    Records that reading produces (rare after the handshake) leave with the next send.
    """

    def __init__(self, sock, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        super().__init__(sock)
        self.obj, self.incoming, self.outgoing = obj, incoming, outgoing
        self.ssl_lock = threading.Lock()

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

    def wire(self, bufs: list):
        for b in bufs:
            mv = memoryview(b).cast("B")
            for i in range(0, mv.nbytes, _TLS_CHUNK):
                with self.ssl_lock:
                    self.obj.write(mv[i : i + _TLS_CHUNK])
                    data = self.outgoing.read()
                yield [memoryview(data)]


def _tls_handshake(sock, ctx: ssl.SSLContext, server_side: bool, hostname, deadline) -> _TlsConn:
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
            return _TlsConn(sock, obj, incoming, outgoing)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("peer closed the connection during the TLS handshake")
        incoming.write(data)


def _send_blocking(conn: _Conn, bufs: list) -> None:
    for chunk in conn.wire(bufs):
        for v in chunk:
            conn.sock.sendall(v)
