"""runtime.tuning's OpenBLAS spin: set the way a rank sets it, in a fresh process each (it
restarts OpenBLAS's threads, which must not happen under this test process's other tests).
The rank's side, on a cluster the user started, is test_runtime.test_speed_settings_are_in_force_in_a_worker_the_user_started."""
import json
import os
import subprocess
import sys

import dask
import pytest

from daskllm.runtime import settings, tuning

PROBE = r"""
import json, os, sys
import numpy as np
from daskllm.runtime import tuning

spin = json.loads(sys.argv[1])
out = {"before": tuning.blas_spin_in_force(), "applied": tuning.apply(2, spin)}
rng = np.random.default_rng(0)
a = rng.standard_normal((300, 200)).astype(np.float32)
out["exact"] = bool(np.allclose(a @ a.T, a.astype(np.float64) @ a.T.astype(np.float64), rtol=1e-4, atol=1e-3))
out["idle_cpu"] = tuning.idle_spin_cpu()
out["in_force"] = tuning.in_force()
tasks = sorted(os.listdir("/proc/self/task"))
out["again"] = tuning.apply(2, spin)
a @ a.T
out["threads_kept"] = sorted(os.listdir("/proc/self/task")) == tasks
print(json.dumps(out))
"""


def _probe(spin) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}   # as a nanny starts a worker
    env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spin)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def openblas():
    if tuning.blas_spin_in_force() is None:
        pytest.skip("numpy's BLAS here is not a pthreads OpenBLAS: there is no idle spin to set")


def test_a_rank_s_spin_puts_idle_blas_threads_to_sleep_and_keeps_their_count(openblas):
    untouched = _probe(None)                    # the rank's other settings, OpenBLAS's own spin (2**28)
    assert untouched["before"] == 0 and untouched["applied"]["blas_spin"] == "untouched"
    assert untouched["in_force"] == {"blas_threads": 2, "blas_spin": 0, "temporary_mmapped": False}
    assert untouched["exact"]
    assert untouched["idle_cpu"] >= 0.03        # the probe sees it: ~0.1 s of spinning after a GEMM
    tuned = _probe(24)
    assert tuned["applied"]["blas_spin"] == 24 and tuned["applied"]["blas_threads"] == 2
    assert tuned["in_force"]["blas_spin"] == 24 and tuned["in_force"]["blas_threads"] == 2
    assert tuned["exact"]
    assert tuned["idle_cpu"] < 0.03             # asleep ~6 ms after the GEMM
    assert tuned["again"]["blas_spin"] == 24 and tuned["threads_kept"]   # in force already: no restart


@pytest.mark.parametrize("bad", [3, 31, "24", 2.5, True])
def test_a_bad_spin_setting_is_named(bad):
    with dask.config.set({"daskllm.blas-spin": bad}), \
            pytest.raises(ValueError, match=r"daskllm.blas-spin must be None or an integer from 4 to 30"):
        settings.blas_spin()


def test_the_spin_setting_fails_before_any_worker_is_touched():
    from daskllm import LLM
    from conftest import golden_dir
    with dask.config.set({"daskllm.blas-spin": 99}), pytest.raises(ValueError, match="blas-spin"):
        LLM(golden_dir("llama"), address="tcp://127.0.0.1:1")     # nothing listens there: never reached
