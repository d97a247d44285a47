"""Several hosts on one Linux machine: network namespaces on a bridge, each running its own sshd.

It lets `cluster/ssh.sh` (dask ssh) start a real multi-host cluster where there is one machine:
tests/test_multihost.py and benchmarks/links.py use it. Needs root, iproute2 and
openssh-server (`.ci/run` installs them). Host i gets the address 10.231.S.i on a bridge of
its own (S picked free at start); this machine is 10.231.S.254 on the same bridge, so a client
here reaches every host directly. Each host may hide paths (an empty tmpfs mounted over them in
its sshd's mount namespace): a checkpoint "missing on that host". Everything it made is removed
by close(), also after a failure: namespaces, bridge, sshd and every process in the namespaces.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def missing_tools() -> list:
    """What this machine lacks to build a testbed (empty: it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces need it)")
    for tool in ("ip", "tc", "ssh-keygen"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not os.path.exists(SSHD):
        missing.append("sshd (Debian: openssh-server)")
    if shutil.which("ip") and os.geteuid() == 0:
        probe = f"dlprobe{os.getpid()}"
        if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
            missing.append("network namespaces (ip netns add failed)")
        else:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return missing


def _sh(*cmd, check=True):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {out.stderr.strip()}")
    return out.stdout


class Testbed:
    """`n` hosts h1..hn; `hide` maps a host number to paths that host cannot see.

    Example
    -------
    >>> with Testbed(3) as bed:                                      # doctest: +SKIP
    ...     cluster = bed.launch()                     # cluster/ssh.sh over h1 h2 h3
    ...     print(cluster.address)                     # tcp://10.231.S.1:8786
    """

    def __init__(self, n: int = 3, hide: dict | None = None, workdir: str | None = None):
        self.n, self.hide = n, {int(k): [str(p) for p in v] for k, v in (hide or {}).items()}
        self.tag = f"dl{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="daskllm-testbed-"))
        self.subnet = None
        self._sshd = {}            # host -> Popen of its sshd
        self._made_netns, self._made_bridge = [], False
        self._procs = []           # Popen objects started here (dask ssh, captures, ...)

    # names ---------------------------------------------------------------------------------

    def ns(self, h: int) -> str:
        return f"{self.tag}h{h}"

    def ip(self, h: int) -> str:
        return f"10.231.{self.subnet}.{h}"

    def veth(self, h: int) -> str:
        """The bridge-side end of host h's link (its peer is eth0 inside the host)."""
        return f"{self.tag}v{h}"

    @property
    def here(self) -> str:
        return f"10.231.{self.subnet}.254"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    # start and stop ----------------------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        used = _sh("ip", "-4", "route", "show")
        self.subnet = next(s for s in [os.getpid() % 200 + 20, *range(20, 250)] if f"10.231.{s}." not in used)
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _sh("ip", "addr", "add", f"{self.here}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for h in range(1, self.n + 1):
            _sh("ip", "netns", "add", self.ns(h))
            self._made_netns.append(h)
            _sh("ip", "link", "add", self.veth(h), "type", "veth", "peer", "name", "eth0", "netns", self.ns(h))
            _sh("ip", "link", "set", self.veth(h), "master", self.bridge, "up")
            _sh("ip", "-n", self.ns(h), "addr", "add", f"{self.ip(h)}/24", "dev", "eth0")
            _sh("ip", "-n", self.ns(h), "link", "set", "eth0", "up")
            _sh("ip", "-n", self.ns(h), "link", "set", "lo", "up")
        self._start_sshd()

    def _start_sshd(self):
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.dir / "host_key")
        shutil.copy(f"{self.key}.pub", self.dir / "authorized_keys")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)     # sshd's privilege-separation directory
        pythonpath = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        for h in range(1, self.n + 1):
            config = self.dir / f"sshd_h{h}.conf"
            config.write_text("\n".join([
                f"ListenAddress {self.ip(h)}", "Port 22", f"HostKey {self.dir / 'host_key'}",
                f"AuthorizedKeysFile {self.dir / 'authorized_keys'}", "PermitRootLogin prohibit-password",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                f"PidFile {self.dir / f'sshd_h{h}.pid'}",
                # daskllm as this checkout has it, on every host (a real host has it installed)
                f"SetEnv PYTHONPATH={pythonpath}", ""]))
            run = f"exec {SSHD} -D -e -f {config}"
            if self.hide.get(h):
                run = " && ".join(f"mkdir -p {p} && mount -t tmpfs daskllm-hidden {p}" for p in self.hide[h]) + " && " + run
            with open(self.dir / f"sshd_h{h}.log", "wb") as log:
                self._sshd[h] = subprocess.Popen(["ip", "netns", "exec", self.ns(h), "unshare", "-m",
                                                  "--propagation", "private", "sh", "-c", run],
                                                 stdout=log, stderr=log)
        for h in self._sshd:
            self.wait_port(h, 22, 10)

    def wait_port(self, h: int, port: int, timeout: float):
        """Until host h accepts TCP connections on `port` (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.ip(h), port), timeout=1).close()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"host h{h} ({self.ip(h)}) did not accept port {port} within {timeout} s: {e}")
                time.sleep(0.1)

    def stop_processes(self, keep_sshd=True):
        """End every process started in the hosts (dask ssh's scheduler and workers), sshd too unless kept."""
        for p in self._procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p.args[0] == "tcpdump" else signal.SIGKILL)
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if p.stderr is not None:
                p.stderr.close()
        self._procs = [p for p in self._procs if p.poll() is None]
        keep = {p.pid for p in self._sshd.values()} if keep_sshd else set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self._signal_hosts(sig, keep)
            deadline = time.monotonic() + 5
            while left and time.monotonic() < deadline:      # bounded: 5 s per signal
                time.sleep(0.1)
                left = [pid for h in self._made_netns for pid in self.pids(h) if pid not in keep]
            if not left:
                break
        if not keep_sshd:
            for p in self._sshd.values():
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            self._sshd = {}

    def _signal_hosts(self, sig, keep) -> list:
        pids = [pid for h in self._made_netns for pid in self.pids(h) if pid not in keep]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def pids(self, h: int) -> list:
        out = subprocess.run(["ip", "netns", "pids", self.ns(h)], capture_output=True, text=True, timeout=10).stdout
        return [int(x) for x in out.split() if x.isdigit() and int(x) != os.getpid()]

    def close(self):
        self.stop_processes(keep_sshd=False)
        for h in self._made_netns:
            subprocess.run(["ip", "netns", "del", self.ns(h)], capture_output=True)
        self._made_netns = []
        if self._made_bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self._made_bridge = False
        shutil.rmtree(self.dir, ignore_errors=True)

    # the cluster ---------------------------------------------------------------------------

    def launch(self, hosts=None, dask_config: str | None = None, threads: int = 1, security=None,
               timeout: float = 60):
        """cluster/ssh.sh over `hosts` (default all): the scheduler on the first, a worker on each.

        Returns a connected distributed.Client (direct_to_workers=True) once every worker is up.
        """
        from distributed import Client
        hosts = list(hosts or range(1, self.n + 1))
        env = {**os.environ, "DASKLLM_THREADS": str(threads)}
        if dask_config:
            env["DASKLLM_DASK_CONFIG"] = str(dask_config)
        with open(self.dir / f"dask-ssh-{len(self._procs)}.log", "wb") as log:
            self._procs.append(subprocess.Popen(
                ["bash", str(REPO / "cluster" / "ssh.sh"), "--ssh-private-key", str(self.key),
                 *[self.ip(h) for h in hosts]], env=env, stdout=log, stderr=subprocess.STDOUT))
        scheme = "tls" if security is not None else "tcp"
        self.wait_port(hosts[0], 8786, timeout)
        client = Client(f"{scheme}://{self.ip(hosts[0])}:8786", security=security, direct_to_workers=True,
                        timeout=timeout)
        try:
            client.wait_for_workers(len(hosts), timeout=timeout)
        except BaseException:
            client.close()
            raise
        return client

    def log(self) -> str:
        """The output of every dask ssh launched so far (for failure messages)."""
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.dir.glob("dask-ssh-*.log")))

    # the links -------------------------------------------------------------------------------

    def cut(self, h: int):
        """Host h loses its link: nothing goes in or out (no reset reaches anyone)."""
        _sh("ip", "link", "set", self.veth(h), "down")

    def kill_host(self, h: int):
        """Every process on host h but its sshd dies at once (SIGKILL): a machine lost, as far as Dask sees."""
        for pid in self.pids(h):
            if pid != self._sshd[h].pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def mend(self, h: int):
        _sh("ip", "link", "set", self.veth(h), "up")

    def shape(self, rate: str | None, delay: str | None) -> str:
        """tc netem on every host's link (egress of each host, so once per hop); None, None: clear.

        Returns what was applied. A kernel without netem (some VM kernels) gets tbf for the rate
        and no delay, and the answer says so."""
        for h in range(1, self.n + 1):
            subprocess.run(["ip", "netns", "exec", self.ns(h), "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True)
        if not (rate or delay):
            return "none"
        args = (["rate", rate] if rate else []) + (["delay", delay] if delay else [])
        applied = "netem " + " ".join(args)
        for h in range(1, self.n + 1):
            tc = ["ip", "netns", "exec", self.ns(h), "tc", "qdisc", "add", "dev", "eth0", "root"]
            out = subprocess.run(tc + ["netem", "limit", "100000", *args], capture_output=True, text=True)
            if out.returncode == 0:
                continue
            if "unknown" not in out.stderr or not rate:
                raise RuntimeError(f"tc netem on h{h} failed: {out.stderr.strip()}")
            burst = max(_bits(rate) // 8 // 1000, 16384)           # one millisecond of the rate
            _sh(*tc, "tbf", "rate", rate, "burst", burst, "latency", "100ms")
            applied = f"tbf rate {rate} (this kernel has no netem: no delay added)"
        return applied

    def rx_bytes(self, h: int) -> int:
        """Bytes host h has received on its link so far."""
        return int(Path(f"/sys/class/net/{self.veth(h)}/statistics/tx_bytes").read_text())

    def capture(self, path):
        """Start tcpdump on every link of the testbed into `path` (a bridge's own device does not
        see what it forwards between two hosts, so it listens on all interfaces, for our subnet)."""
        from capture import Capture
        return Capture(self, path)


def _bits(rate: str) -> int:
    """'100mbit' -> 100_000_000."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r}: use kbit, mbit or gbit")


if __name__ == "__main__":
    print("missing:", missing_tools() or "nothing", file=sys.stderr)
