"""A TLS cluster: every Dask connection and every rank-to-rank connection is encrypted.

Run: python cluster/tls.py CHECKPOINT_DIR
For a real deployment, issue certificates from your own CA and give the scheduler, the
workers and the client a Security built from those files (see distributed's docs on TLS);
`Security.temporary()` below makes a throw-away CA for a single machine.
"""
import sys

from distributed import Client, LocalCluster
from distributed.security import Security

from daskllm import LLM


def main(model):
    security = Security.temporary()          # needs the `cryptography` package
    with LocalCluster(n_workers=2, threads_per_worker=1, security=security) as cluster, \
            Client(cluster, security=security, direct_to_workers=True) as client:
        # The ranks reuse the workers' certificates for their own connections.
        with LLM(model, tp=2, client=client) as llm:
            print(llm.generate("Hello", max_new_tokens=16)[0].text)


if __name__ == "__main__":
    main(sys.argv[1])
