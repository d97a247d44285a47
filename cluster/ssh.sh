#!/usr/bin/env bash
# Start a Dask cluster over SSH (`dask ssh`): the scheduler on the first host, one worker on every host.
# Usage: cluster/ssh.sh [dask ssh options] scheduler-host [host ...]
#   e.g. cluster/ssh.sh --ssh-private-key ~/.ssh/id_ed25519 node1 node2 node3
# Then connect with LLM(..., address="tcp://node1:8786"); stop the cluster with Ctrl-C.
# Needs paramiko here (pip install 'daskllm[ssh]'), passwordless SSH to every host, and daskllm
# installed on every host under the same Python path as here (or set DASKLLM_REMOTE_PYTHON).
#   DASKLLM_THREADS       threads per worker (default: all the cores of each host); one rank per worker
#   DASKLLM_DASK_CONFIG   a directory of Dask config files at the same path on every host, read by the
#                         scheduler and the workers: e.g. the TLS settings that
#                         `python cluster/tls.py certs DIR` writes (then use tls:// and a Security)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 [dask ssh options] scheduler-host [host ...]" >&2; exit 2; }
python=${DASKLLM_REMOTE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}
if [ -n "${DASKLLM_DASK_CONFIG:-}" ]; then
    python="env DASK_CONFIG=$DASKLLM_DASK_CONFIG $python"
fi
exec dask ssh --scheduler-port 8786 --nworkers 1 --nthreads "${DASKLLM_THREADS:-0}" \
     --remote-python "$python" "$@"
