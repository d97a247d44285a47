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
        "rebuild-timeout": 300.0,   # s: a lost replica is rebuilt on free workers until this long after
                                    #    the loss (0: no rebuild; its requests move to live replicas or fail)
        "comm-spin": 0.0,           # s: a rank waiting for a peer polls without sleeping this long first
        "kv-cache-fraction": 0.5,   # of a worker's memory limit, after weights, for the KV cache
        "kv-cache-bytes": None,     # fixed KV cache budget per rank (overrides the fraction)
        "dashboard-interval": 1.0,  # s between the statistics an LLM publishes to the /daskllm page (0: off)
        "max-batch-tokens": 4096,   # tokens a rank takes in one step (x sp per replica; longer prefills are chunked)
    }
}
dask.config.update_defaults(DEFAULTS)


def get(name: str):
    """A daskllm setting, e.g. get("step-timeout")."""
    return dask.config.get(f"daskllm.{name}")
