"""daskllm's settings under `daskllm.*` in dask.config, with their defaults.

Override with dask.config.set({"daskllm.step-timeout": 30}) or a YAML file in ~/.config/dask/.
"""
from __future__ import annotations

import dask.config

DEFAULTS = {
    "daskllm": {
        "connect-timeout": 30.0,    # s: ranks opening their direct connections at start-up
        "load-timeout": 600.0,      # s: a rank reading its slices of the checkpoint
        "step-timeout": 120.0,      # s: one driver call (a prefill or decode step) on every rank
        "comm-timeout": 60.0,       # s: one collective waiting for a peer inside a step
        "control": "direct",        # steps over a control connection per rank ("actor": as Dask actor calls)
        "rank-tuning": True,        # ranks undo the nanny's malloc setting (runtime/tuning.py); off: to measure it
        "blas-spin": 24,            # OpenBLAS's idle threads in a rank spin 2**N cycles before sleeping (its
                                    #    default 28, ~0.1 s, slowed numba's decode kernels; runtime/tuning.py);
                                    #    None: leave OpenBLAS as it is
        "quiet-dask": True,         # Dask's fast timers slowed beside the ranks while they live (runtime/quiet.py)
        "rebuild-timeout": 300.0,   # s: a lost replica is rebuilt on free workers until this long after
                                    #    the loss (0: no rebuild; its requests move to live replicas or fail)
        "comm-spin": 0.0,           # s: a rank waiting for a peer polls without sleeping this long first
        "shared-memory": True,      # collectives of ranks on one host go through shared memory (x86-64)
        "kv-cache-fraction": 0.5,   # of a worker's memory limit, after weights, for the KV cache
        "kv-cache-bytes": None,     # fixed KV cache budget per rank (overrides the fraction)
        "dashboard-interval": 1.0,  # s between the statistics an LLM publishes to the /daskllm page (0: off)
        "max-batch-tokens": 4096,   # tokens a rank takes in one step (x sp per replica; longer prefills are chunked)
        "decode-steps": "auto",     # decode steps per message while the batch is steady (ranks feed their own
                                    #    tokens): an int >= 1, or "auto": as many as fit in RUN_SECONDS, at most 8
    }
}
RUN_SECONDS = 0.05                  # "auto": a run's length, the most a request arriving meanwhile waits to join
MAX_RUN = 8
dask.config.update_defaults(DEFAULTS)


def get(name: str):
    """A daskllm setting, e.g. get("step-timeout"). Its default where dask.config has lost it: a
    `dask.config.set` context entered before daskllm was imported drops the defaults added
    meanwhile when it exits."""
    return dask.config.get(f"daskllm.{name}", default=DEFAULTS["daskllm"][name])


def blas_spin():
    """The blas-spin setting, checked: None or an int from 4 to 30 (OPENBLAS_THREAD_TIMEOUT's range)."""
    value = get("blas-spin")
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 4 <= value <= 30):
        return value
    raise ValueError(f"daskllm.blas-spin must be None or an integer from 4 to 30 (idle OpenBLAS threads spin "
                     f"2**N cycles; OpenBLAS's own default is 28), got {value!r}")


def decode_steps():
    """The decode-steps setting, checked: "auto" or an int >= 1."""
    value = get("decode-steps")
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"daskllm.decode-steps must be 'auto' or an integer >= 1, got {value!r}")
