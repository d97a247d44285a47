#!/usr/bin/env bash
# Start a Dask cluster over SSH: the scheduler on the first host, one worker per host.
# Usage: cluster/ssh.sh host1 host2 host3 ...      (daskllm installed on every host)
# Each worker gets all the cores of its host; daskllm puts one rank per worker.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 scheduler-host worker-host [worker-host ...]" >&2; exit 2; }
threads=${DASKLLM_THREADS:-$(nproc)}
exec dask-ssh --scheduler-port 8786 --nworkers 1 --nthreads "$threads" "$@"
