"""The collectives on the thread and TCP backends, in one process, one thread per rank."""

import datetime
import shutil
import subprocess
import time

import ml_dtypes
import numpy as np
import pytest

from daskllm.comm import (
    CommError,
    CommTimeout,
    GroupCommunicator,
    PeerLost,
    TcpTransport,
    ThreadHub,
    single_communicator,
    tls_contexts_from_security,
)
from daskllm.comm import shared
from daskllm.comm.testing import OPS, assert_same, case, rank_array, rank_order_sum, run_ranks, tcp_world

# "shared": TCP transports whose groups also map a shared-memory segment (comm.shared), as the
# ranks of one host do
BACKENDS = ["threads", "tcp"] + (["shared"] if shared.supported() else [])


@pytest.fixture
def world(request):
    """world(n) -> n transports of the test's backend; all closed after the test."""
    made = []

    def make(n, backend, **kw):
        transports = (tcp_world(n, **kw) if backend == "tcp" else _SharedWorld(tcp_world(n, **kw))
                      if backend == "shared" else _hub(n))
        made.extend(transports)
        return transports

    yield make
    for t in made:
        t.close()


def _hub(n):
    hub = ThreadHub(n)
    return [hub.transport(r) for r in range(n)]


class _SharedWorld(list):
    """TCP transports whose communicators _comms gives a shared segment."""


def _comms(transports, ranks=None, tag="world", timeout=20.0):
    ranks = list(range(len(transports))) if ranks is None else ranks
    comms = [GroupCommunicator(transports[r], ranks, tag, timeout) for r in ranks]
    if isinstance(transports, _SharedWorld) and len(ranks) > 1:
        def share(i):
            return shared.share_memory(comms[i], lambda j, c=comms[i]: c.transport.peer_alive(c.ranks[j]))
        assert all(run_ranks(share, len(comms)))
        for c in comms:
            c.stats.reset()                                    # the set-up's own collectives
    return comms


def _check_all(comms, op, shape, dtype):
    n = len(comms)

    def body(r):
        call, expected = case(op, r, n, shape, dtype, seed=len(shape))
        assert_same(call(comms[r]), expected, f"{op} shape {shape} {dtype} on rank {r} of {n}")

    run_ranks(body, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_collective(world, backend, n):
    comms = _comms(world(n, backend))
    for shape in [(1,), (5, 3), (2, 3, 7), (0, 4), (7, 1)]:
        for dtype in ["float32", "int64"]:
            for op in OPS:
                _check_all(comms, op, shape, dtype)
    for op in ["all_reduce", "send_recv", "broadcast", "all_gather_list"]:
        _check_all(comms, op, (), "float32")  # 0-d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3])
def test_large_all_reduce_is_rank_order_sum(world, backend, n):
    comms = _comms(world(n, backend))
    shape = (1024, 1024 * 4)  # 16 MiB float32; n=3 takes the split path
    xs = [rank_array(r, shape) for r in range(n)]
    expected = rank_order_sum(xs)
    out = run_ranks(lambda r: comms[r].all_reduce(xs[r]), n)
    for r in range(n):
        assert_same(out[r], expected, f"rank {r}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_all_gather_and_all_to_all(world, backend):
    comms = _comms(world(2, backend))
    xs = [rank_array(r, (1 << 20, 4)) for r in range(2)]
    out = run_ranks(lambda r: comms[r].all_gather(xs[r], dim=1), 2)
    for r in range(2):
        assert_same(out[r], np.concatenate(xs, axis=1), f"rank {r}")
    out = run_ranks(lambda r: comms[r].all_to_all([xs[r][: 1 << 19], xs[r][1 << 19 :]]), 2)
    assert_same(out[0][1], xs[1][: 1 << 19])
    assert_same(out[1][0], xs[0][1 << 19 :])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_round_trip(world, backend):
    comms = _comms(world(2, backend))
    dtypes = [ml_dtypes.bfloat16, np.float16, np.int32, np.bool_, np.float64]
    arrays = [rank_array(3, (3, 5), d) for d in dtypes] + [np.float32(2.5).reshape(()), np.zeros((2, 0, 3))]
    arrays.append(np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2])  # non-native, non-contiguous
    out = run_ranks(lambda r: [comms[r].all_gather_list(a) for a in arrays], 2)
    for r in range(2):
        for a, got in zip(arrays, out[r]):
            want = np.asarray(a, order="C").astype(a.dtype.newbyteorder("="))
            assert_same(got[1 - r], want, f"{a.dtype} on rank {r}")
    bf = [rank_array(r, (4, 4), ml_dtypes.bfloat16) for r in range(2)]
    sums = run_ranks(lambda r: comms[r].all_reduce(bf[r]), 2)
    assert_same(sums[0], rank_order_sum(bf))
    assert sums[0].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_and_nested_groups_share_a_transport(world, backend):
    transports = world(4, backend)
    pairs = {r: GroupCommunicator(transports[r], [0, 1] if r < 2 else [3, 2], "tp" if r < 2 else "sp") for r in range(4)}
    everyone = _comms(transports)

    def body(r):
        comm = pairs[r]
        for i in range(20):
            members = [0, 1] if r < 2 else [3, 2]
            xs = [rank_array(g, (17,), "int64", seed=i) for g in members]
            assert_same(comm.all_reduce(xs[comm.rank]), rank_order_sum(xs), f"pair step {i} rank {r}")
            ys = [rank_array(g, (3,), "int64", seed=100 + i) for g in range(4)]
            assert_same(everyone[r].all_reduce(ys[r]), rank_order_sum(ys), f"world step {i} rank {r}")
        return comm.rank

    assert run_ranks(body, 4) == [0, 1, 1, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lost_peer_raises_peer_lost_naming_it(world, backend):
    transports = world(3, backend)
    comms = _comms(transports, timeout=10.0)

    def body(r):
        if r == 2:
            time.sleep(0.3)
            transports[2].close()
            return None
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="rank 2") as info:
            comms[r].all_reduce(np.ones(1000))
        assert time.monotonic() - t0 < 10.0
        return info.value.peer

    assert run_ranks(body, 3) == [2, 2, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_silent_peer_raises_timeout_within_limit(world, backend):
    comms = _comms(world(2, backend))
    t0 = time.monotonic()
    with pytest.raises(CommTimeout, match=r"rank 0 waited 0\.5 s for rank 1 in all_reduce \(tag 'world'(, shared memory)?\)"):
        comms[0].all_reduce(np.ones(4), timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + 2.0


def test_connect_timeout_names_missing_ranks():
    t = TcpTransport(0, 3, timeout=0.3)
    try:
        t.listen()
        t0 = time.monotonic()
        with pytest.raises(CommTimeout, match=r"ranks \[1, 2\] did not connect"):
            t.connect({})
        assert time.monotonic() - t0 < 2.3
    finally:
        t.close()
        t.close()  # idempotent


def test_shape_mismatch_names_both_ranks(world):
    comms = _comms(world(2, "threads"))
    xs = [np.ones(3), np.ones(4)]
    with pytest.raises(CommError, match="rank 0 has float64\\[3\\] but rank 1 sent float64\\[4\\]"):
        run_ranks(lambda r: comms[r].all_reduce(xs[r]), 2)


def test_stats_count_bytes_and_calls(world):
    comms = _comms(world(3, "threads"))
    run_ranks(lambda r: comms[r].all_reduce(np.ones(100, np.float32)), 3)
    run_ranks(lambda r: comms[r].send_recv(np.ones(10, np.int64)), 3)
    s = comms[1].stats.as_dict()
    assert s["all_reduce"] == {"calls": 1, "bytes_sent": 800, "bytes_received": 800, "seconds": pytest.approx(s["all_reduce"]["seconds"])}
    assert s["send_recv"]["bytes_sent"] == 80 and s["send_recv"]["bytes_received"] == 80
    assert comms[1].stats.total_bytes_sent() == 880 and comms[1].stats.total_seconds() > 0
    comms[1].stats.reset()
    assert comms[1].stats.as_dict() == {}


def test_size_one_is_identity():
    comm = single_communicator()
    x = np.arange(6.0).reshape(2, 3)
    assert comm.all_reduce(x) is x and comm.all_gather(x, dim=1) is x and comm.reduce_scatter(x) is x
    assert comm.send_recv(x) is x and comm.broadcast(x) is x and comm.all_gather_list(x)[0] is x
    assert comm.all_to_all([x])[0] is x
    comm.barrier()
    assert comm.stats.as_dict() == {}


def _self_signed(tmp_path):
    """(cert, key) paths of a self-signed CA certificate for 127.0.0.1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor the openssl command is available to make a certificate")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=daskllm-test",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "daskllm-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(k, hashes.SHA256())
    )
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert, key


def test_tls_round_trip(world, tmp_path):
    from distributed.security import Security

    cert, key = _self_signed(tmp_path)
    sec = Security(tls_ca_file=str(cert), tls_worker_cert=str(cert), tls_worker_key=str(key), require_encryption=True)
    listen_ctx, connect_ctx = tls_contexts_from_security(sec)
    assert listen_ctx is not None and connect_ctx is not None
    comms = _comms(world(3, "tcp", ssl_listen=listen_ctx, ssl_connect=connect_ctx))
    for op in OPS:
        _check_all(comms, op, (5, 3), "float32")
    xs = [rank_array(r, (1 << 19,)) for r in range(3)]  # 2 MiB: several TLS chunks, split path
    out = run_ranks(lambda r: comms[r].all_reduce(xs[r]), 3)
    assert_same(out[2], rank_order_sum(xs))
