"""The data plane: collectives between ranks behind one `Communicator` interface.

Backends: `threads` (ranks as threads of one process, for tests) and `tcp`
(persistent rank-to-rank sockets, optionally TLS). `single_communicator()` is
the size-1 identity used by the reference forward. Nothing here imports Dask
except `comm.testing` and `tls_contexts_from_security`, and only when called.
"""

from .base import CommError, CommStats, CommTimeout, Communicator, OpStats, PeerLost, Transport
from .collectives import GroupCommunicator, single_communicator
from .tcp import TcpTransport, tls_contexts_from_security
from .threads import ThreadHub, ThreadTransport, thread_group

__all__ = [
    "CommError",
    "CommStats",
    "CommTimeout",
    "Communicator",
    "GroupCommunicator",
    "OpStats",
    "PeerLost",
    "TcpTransport",
    "ThreadHub",
    "ThreadTransport",
    "Transport",
    "single_communicator",
    "thread_group",
    "tls_contexts_from_security",
]
