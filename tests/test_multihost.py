"""Clusters across hosts: three network namespaces with sshd each, a cluster started by cluster/ssh.sh.

One testbed per module (cluster/testbed.py): hosts h1, h2, h3 on a bridge of their own, the
scheduler on h1 and one worker on each host, started by `dask ssh` as a user would. Everything
runs twice, on a plain cluster and on a TLS one (certificates from cluster/tls.py), and a
capture on the hosts' links shows what the ranks' own connections carry in each. The checkpoint is
visible on every host (one filesystem), except a copy that h2 cannot see (a tmpfs over it in
h2's mount namespace).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gc
import warnings

import dask
import numpy as np
import pytest
from conftest import golden_dir

from daskllm import LLM
from daskllm.engine.router import NoReplicaError
from daskllm.io.builtin import random_llama_weights, write_checkpoint
from daskllm.io.checkpoint import Checkpoint
from daskllm.io.tokenizer import Tokenizer
from daskllm.parallel.local_mesh import InProcessReplica
from daskllm.parallel.mesh import Mesh
from daskllm.runtime.placement import PlacementError, tls_mismatch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "cluster"))
import testbed  # noqa: E402  (cluster/ is recipes, not a package)
import tls  # noqa: E402

pytestmark = [pytest.mark.multihost, pytest.mark.cluster]

LLAMA = golden_dir("llama")
PROMPTS = [[3, 17, 42, 5], [9, 8, 7]]
FAST = {"daskllm.step-timeout": 8, "daskllm.comm-timeout": 3,
        "daskllm.rebuild-timeout": 0}   # these tests watch the loss itself, not the automatic rebuild


def _cannot_run() -> list:
    missing = testbed.missing_tools()
    if not shutil.which("tcpdump"):
        missing.append("tcpdump")
    try:
        import paramiko  # noqa: F401  (dask ssh needs it)
    except ImportError:
        missing.append("paramiko (pip install 'daskllm[ssh]')")
    return missing


@pytest.fixture(scope="module", autouse=True)
def collect_refused_connections():
    """The refusal tests (TLS on one side only, an unreachable scheduler) leave sockets of
    distributed's failed connection attempts for the garbage collector: collect them when this
    module ends, so their ResourceWarning is not raised inside an unrelated later test."""
    yield
    _collect_quietly()


def _collect_quietly():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    missing = _cannot_run()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the multi-host tests, but this machine lacks: {', '.join(missing)}")
        pytest.skip(f"multi-host tests need {', '.join(missing)}")
    hidden = tmp_path_factory.mktemp("not-on-h2")
    with testbed.Testbed(3, hide={2: [hidden]}) as bed:
        bed.hidden = hidden
        yield bed


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of PROMPTS from the single-rank forward in this process."""
    with InProcessReplica(Checkpoint(str(LLAMA)), Mesh()) as single:
        return single.generate(PROMPTS, 6)


@pytest.fixture(scope="module", params=["tcp", "tls"])
def cluster(request, bed):
    """cluster/ssh.sh over h1 h2 h3: a connected Client, plain or TLS (the same hosts, in turn)."""
    config = tls.write_certs(bed.dir / "tls") if request.param == "tls" else None
    security = tls.security_from(config) if config else None
    try:
        client = bed.launch(dask_config=config, security=security)
    except BaseException:
        bed.stop_processes()
        raise RuntimeError(f"the cluster did not start; dask ssh said:\n{bed.log()}")
    client.scheme, client.tls_dir, client.tls_security = request.param, config, security
    yield client
    client.close()
    bed.stop_processes()


def _hosts_of(llm) -> list:
    return [[w.split("://")[1].rsplit(":", 1)[0] for w in r.workers] for r in llm.replicas]


def _generate(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]


def test_tensor_parallel_across_two_hosts(bed, cluster, reference):
    with LLM(LLAMA, tp=2, client=cluster) as llm:
        (hosts,) = _hosts_of(llm)
        assert len(set(hosts)) == 2, hosts                          # two ranks, two hosts
        assert _generate(llm) == reference
        assert llm.comm_stats()[0]["tp"]["all_reduce"]["calls"] > 0


def test_data_parallel_across_hosts(bed, cluster, reference):
    with LLM(LLAMA, dp=2, client=cluster) as llm:
        (a,), (b,) = _hosts_of(llm)
        assert a != b
        assert _generate(llm) == reference
        assert {r.index for r in llm.replicas} == {0, 1}


def test_cli_on_the_third_host(bed, cluster):
    """`daskllm generate --address` run on h3, against the scheduler on h1, as a user there would."""
    tok = Tokenizer.from_dir(LLAMA)
    ids = tok.encode("Hello world")
    with InProcessReplica(Checkpoint(str(LLAMA)), Mesh()) as single:
        expected = tok.decode(single.generate([ids], 8)[0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if cluster.tls_dir is not None:
        env["DASK_CONFIG"] = str(cluster.tls_dir)     # the client host's Dask config holds its certificate
    out = subprocess.run(["ip", "netns", "exec", bed.ns(3), sys.executable, "-m", "daskllm.cli", "generate",
                          "--model", str(LLAMA), "--tp", "2", "--max-new-tokens", "8", "--ignore-eos",
                          "--address", f"{cluster.scheme}://{bed.ip(1)}:8786", "Hello world"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected.strip()


def _rank_flows(flows: dict, client) -> dict:
    """The flows between two hosts that are neither Dask's (scheduler, worker, nanny ports) nor the client's."""
    info = client.scheduler_info()["workers"]
    dask_ports = {8786} | {int(a.rsplit(":", 1)[1]) for a in info} | {
        int(w["nanny"].rsplit(":", 1)[1]) for w in info.values() if w.get("nanny")}
    return {k: v for k, v in flows.items()
            if not k[0].endswith(".254") and not k[2].endswith(".254")
            and k[1] not in dask_ports and k[3] not in dask_ports}


def test_rank_traffic_on_the_wire(bed, cluster):
    """The ranks' bytes cross the bridge: in clear on a plain cluster (the capture finds them),
    encrypted on a TLS cluster (the same capture finds none of them, and TLS records instead)."""
    from safetensors.numpy import load_file
    embed = load_file(str(LLAMA / "model.safetensors"))["model.embed_tokens.weight"]
    marker = np.ascontiguousarray(embed[PROMPTS[0][0]], dtype=np.float32).tobytes()   # rank 0's embedding row
    capture = bed.capture(bed.dir / f"ranks-{cluster.scheme}.pcap")
    with LLM(LLAMA, tp=2, client=cluster) as llm:
        llm.generate([PROMPTS[0]], max_new_tokens=4, ignore_eos=True)
    flows = capture.stop()
    assert capture.dropped == 0, f"tcpdump dropped {capture.dropped} packets: the streams have holes"
    ranks = _rank_flows(flows, cluster)
    assert ranks, f"no rank-to-rank flow between hosts in the capture: {sorted(flows)}"
    assert sum(len(v) for v in ranks.values()) > 4 * len(marker)
    everything = b"".join(flows.values())
    if cluster.scheme == "tcp":
        assert any(marker in v for v in ranks.values()), "the capture should see the embedding row in clear"
        assert any(b"hello 1 2" in v for v in ranks.values())
    else:
        assert marker not in everything and b"hello 1 2" not in everything
        assert all(v[:1] == b"\x16" for v in ranks.values()), "every rank flow should open with a TLS handshake"


def test_fewer_workers_than_the_mesh_needs(bed, cluster):
    with pytest.raises(PlacementError, match=rf"needs 4 workers \(one rank per worker\) but the cluster has 3 at "
                       rf"{cluster.scheme}://{bed.ip(1)}:8786: workers on {bed.ip(1)}, {bed.ip(2)}, {bed.ip(3)}; start more"):
        LLM(LLAMA, tp=2, dp=2, client=cluster)


def test_checkpoint_missing_on_a_host_is_named(bed, cluster):
    path = bed.hidden / "llama"
    if not path.exists():
        shutil.copytree(LLAMA, path)
    with pytest.raises(PlacementError, match=rf"cannot read the checkpoint {path}.*host {bed.ip(2)}\b") as info:
        LLM(path, dp=3, client=cluster)                               # a replica on every host
    assert bed.ip(1) not in str(info.value) and bed.ip(3) not in str(info.value)


def _big_checkpoint(path) -> int:
    """A random Llama of ~6 MB (large enough that its bytes stand out of the cluster's chatter)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 128,
           "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    tensors = random_llama_weights(cfg, seed=3)
    write_checkpoint(path, cfg, tensors)
    return sum(t.nbytes for t in tensors.values())


def test_shipped_weights_go_to_each_host_not_through_the_scheduler(bed, cluster):
    path = bed.hidden / "big"
    if not (path / "config.json").exists():
        _big_checkpoint(path)
    total = (path / "model.safetensors").stat().st_size
    with InProcessReplica(Checkpoint(str(path)), Mesh()) as single:
        expected = single.generate(PROMPTS, 4)
    hosts = range(1, bed.n + 1)
    before = {h: bed.rx_bytes(h) for h in hosts}
    with LLM(path, tp=2, client=cluster, ship_weights=True) as llm:
        received = {h: bed.rx_bytes(h) - before[h] for h in hosts}
        ranks_on = {h for h in hosts if bed.ip(h) in _hosts_of(llm)[0]}
        assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)] == expected
    # Each rank's half came straight from the client: every rank's host got its half, and the
    # scheduler's host (h1) little beyond its own rank's half; relayed through the scheduler,
    # h1 would take every half.
    for h in ranks_on:
        assert received[h] > 0.45 * total, (h, received)
    assert received[1] < (0.75 if 1 in ranks_on else 0.25) * total, received


def test_tls_mismatch_is_refused_within_the_connect_timeout(bed, cluster):
    """A client without certificates to the TLS cluster, or one offering TLS to the plain one."""
    if cluster.scheme == "tls":
        wrong = {"address": f"tcp://{bed.ip(1)}:8786"}
    else:
        wrong = {"address": f"tls://{bed.ip(1)}:8786", "security": tls.security_from(tls.write_certs(bed.dir / "tls-other"))}
    with dask.config.set({"daskllm.connect-timeout": 5, "distributed.comm.timeouts.connect": 5}):
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            LLM(LLAMA, **wrong)
        elapsed = time.monotonic() - start
    assert elapsed < 5 + 5          # the words for it: test_a_tls_mismatch_is_explained (placement.tls_mismatch)


def test_a_tls_mismatch_is_explained(bed, cluster):
    """placement.tls_mismatch says which side lacks TLS and what would be right."""
    right = f"{cluster.scheme}://{bed.ip(1)}:8786"
    assert tls_mismatch(right, cluster.tls_security) is None
    assert tls_mismatch(f"tcp://{bed.ip(3)}:8799") is None                # nothing there: not a TLS matter
    if cluster.scheme == "tls":
        assert tls_mismatch(f"tcp://{bed.ip(1)}:8786") == (
            f"the scheduler at tcp://{bed.ip(1)}:8786 speaks TLS: connect to tls://{bed.ip(1)}:8786 with security= "
            "a distributed.security.Security holding the cluster's CA and a client certificate "
            "(cluster/tls.py security_from(DIR)), or with that Security in your Dask config")
        assert tls_mismatch(right, None).startswith(f"the scheduler at {right} needs a client certificate")
    else:
        assert tls_mismatch(f"tls://{bed.ip(1)}:8786") == (
            f"the scheduler at tls://{bed.ip(1)}:8786 does not speak TLS (a plain cluster): "
            f"connect to tcp://{bed.ip(1)}:8786")


def test_unreachable_scheduler_is_refused_within_the_connect_timeout(bed, cluster):
    # The sockets an earlier refusal test left to the garbage collector (one to the scheduler, seen
    # once in CI) must not be closed, and warned about, inside this test's event loop.
    _collect_quietly()
    with dask.config.set({"daskllm.connect-timeout": 5, "distributed.comm.timeouts.connect": 5}):
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            LLM(LLAMA, address=f"{cluster.scheme}://{bed.ip(3)}:8799", security=cluster.tls_security)
        elapsed = time.monotonic() - start
    assert elapsed < 5 + 5
    assert f"{bed.ip(3)}:8799" in str(info.value)


def test_a_host_lost_mid_generation_is_named(bed, cluster):
    """A host of a tp=2 replica is lost mid-generation (plain cluster: its link is cut; TLS
    cluster: its processes are killed): the call ends within the timeouts, naming that host."""
    with dask.config.set(FAST):
        llm = LLM(LLAMA, tp=2, client=cluster)
        try:
            request = llm.submit([[1, 2, 3]], max_new_tokens=200, ignore_eos=True)[0]
            deadline = time.monotonic() + 30
            while not request.generated and time.monotonic() < deadline:
                time.sleep(0.01)
            lost = next(h for h in (2, 3, 1) if bed.ip(h) in _hosts_of(llm)[0])   # not the scheduler's, if it can
            start = time.monotonic()
            bed.cut(lost) if cluster.scheme == "tcp" else bed.kill_host(lost)
            try:
                with pytest.raises(NoReplicaError) as info:
                    request.wait(timeout=30)
                elapsed = time.monotonic() - start
            finally:
                bed.mend(lost)
        finally:
            llm.close()
    assert elapsed < FAST["daskllm.step-timeout"] + 4
    ip = bed.ip(lost).replace(".", r"\.")
    assert re.search(rf"(on worker {cluster.scheme}://{ip}:\d+ .*(did not answer|failed)"
                     rf"|local rank \d, is on worker {cluster.scheme}://{ip}:\d+ \(host {ip}\))", str(info.value)), \
        str(info.value)
