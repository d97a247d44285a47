"""A TLS cluster: every Dask connection and every rank-to-rank connection is encrypted.

    python cluster/tls.py certs DIR
        Write a certificate authority, one certificate and key for every role, and a Dask config
        (DIR/distributed.yaml: tls:// by default, encryption required) into DIR. Copy DIR to the
        same path on every host (keep key.pem private), then start the cluster with
        DASKLLM_DASK_CONFIG=DIR cluster/ssh.sh host1 host2 ...
    python cluster/tls.py CHECKPOINT_DIR tls://host1:8786 DIR
        Generate on that cluster with tp=2, as a client holding DIR's certificate.
    python cluster/tls.py CHECKPOINT_DIR
        The same on a throw-away TLS LocalCluster on this machine.

The ranks reuse their worker's certificates for their own connections, so nothing else is
needed. For a real deployment issue certificates from your own CA (see distributed's docs on
TLS); `Security.temporary()` below makes a self-signed one. Needs the `cryptography` package.
"""
import sys
from pathlib import Path

from distributed import Client, LocalCluster
from distributed.security import Security

from daskllm import LLM


def write_certs(directory) -> Path:
    """DIR/{ca,cert,key}.pem and DIR/distributed.yaml for a scheduler, workers and clients."""
    import yaml
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    made = Security.temporary()             # one self-signed certificate: its own authority
    (directory / "ca.pem").write_text(made.tls_ca_file)
    (directory / "cert.pem").write_text(made.tls_client_cert)
    key = directory / "key.pem"
    key.touch(mode=0o600)
    key.write_text(made.tls_client_key)
    pair = {"cert": str(directory / "cert.pem"), "key": str(key)}
    config = {"distributed": {"comm": {
        "default-scheme": "tls", "require-encryption": True,
        "tls": {"ca-file": str(directory / "ca.pem"), "scheduler": pair, "worker": pair, "client": pair}}}}
    (directory / "distributed.yaml").write_text(yaml.safe_dump(config))
    return directory


def security_from(directory) -> Security:
    """The client's Security for a cluster whose certificates write_certs made in `directory`."""
    directory = Path(directory)
    return Security(tls_ca_file=str(directory / "ca.pem"), tls_client_cert=str(directory / "cert.pem"),
                    tls_client_key=str(directory / "key.pem"), require_encryption=True)


def generate(client, model) -> str:
    with LLM(model, tp=2, client=client) as llm:
        return llm.generate("Hello", max_new_tokens=16)[0].text


def main(argv):
    if len(argv) == 2 and argv[0] == "certs":
        print(write_certs(argv[1]))
    elif len(argv) == 3:
        model, address, directory = argv
        security = security_from(directory)
        with Client(address, security=security, direct_to_workers=True) as client:
            print(generate(client, model))
    elif len(argv) == 1:
        security = Security.temporary()
        with LocalCluster(n_workers=2, threads_per_worker=1, security=security, dashboard_address=":0") as cluster, \
                Client(cluster, security=security, direct_to_workers=True) as client:
            print(generate(client, argv[0]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
