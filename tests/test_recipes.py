"""The launch recipes in cluster/ stay true: shell linted, and each run as far as this machine allows.

ssh.sh and tls.py run for real across hosts in test_multihost.py; here: shellcheck on the shell
recipes, ssh.sh's usage and the command it builds, tls.py's certificates and its LocalCluster
run, and slurm.sbatch run end to end with a stand-in `srun` on this machine (SLURM itself
cannot run here). gpu.py needs a GPU: test_gpu.py covers its path, here it is only compiled.
"""
from __future__ import annotations

import os
import py_compile
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import golden_dir

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _need(tool: str, why: str):
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have {tool} ({why}); .ci/run installs it")
        pytest.skip(f"needs {tool} ({why})")


def test_every_recipe_is_covered():
    assert sorted(p.name for p in CLUSTER.iterdir() if p.suffix in (".sh", ".sbatch", ".py")) == \
        ["capture.py", "gpu.py", "slurm.sbatch", "ssh.sh", "testbed.py", "tls.py"]


@pytest.mark.parametrize("recipe", ["ssh.sh", "slurm.sbatch"])
def test_shell_recipes_pass_shellcheck(recipe):
    _need("shellcheck", "Debian package shellcheck")
    out = subprocess.run(["shellcheck", "--shell=bash", str(CLUSTER / recipe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ssh_recipe_usage_and_the_command_it_runs(tmp_path):
    out = subprocess.run(["bash", str(CLUSTER / "ssh.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "usage:" in out.stderr
    fake = tmp_path / "dask"                      # a stand-in `dask` that prints what it was asked
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**ENV, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DASKLLM_THREADS": "3",
           "DASKLLM_DASK_CONFIG": "/etc/daskllm-tls"}
    out = subprocess.run(["bash", str(CLUSTER / "ssh.sh"), "--ssh-private-key", "k", "n1", "n2"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    assert args[0] == "ssh" and args[-4:] == ["--ssh-private-key", "k", "n1", "n2"]
    assert args[args.index("--nthreads") + 1] == "3" and args[args.index("--nworkers") + 1] == "1"
    assert args[args.index("--remote-python") + 1].startswith("env DASK_CONFIG=/etc/daskllm-tls /")
    real = subprocess.run([sys.executable, "-m", "distributed.cli.dask_ssh", "--help"], capture_output=True, text=True)
    for option in ("--scheduler-port", "--nworkers", "--nthreads", "--remote-python", "--ssh-private-key"):
        assert option in real.stdout, f"dask ssh has no {option} any more"


def test_tls_recipe_writes_a_config_distributed_reads(tmp_path):
    pytest.importorskip("cryptography", reason="certificates need the cryptography package")
    out = subprocess.run([sys.executable, str(CLUSTER / "tls.py"), "certs", str(tmp_path / "tls")],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    check = ("import dask, distributed.security as s; sec = s.Security(); "
             "print(dask.config.get('distributed.comm.default-scheme'), sec.require_encryption, "
             "sec.get_connection_args('client')['ssl_context'] is not None)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         env={**ENV, "DASK_CONFIG": str(tmp_path / "tls")}, timeout=60)
    assert out.stdout.split() == ["tls", "True", "True"], out.stderr
    assert oct((tmp_path / "tls" / "key.pem").stat().st_mode & 0o777) == "0o600"


@pytest.mark.cluster
def test_tls_recipe_runs_on_a_local_tls_cluster():
    pytest.importorskip("cryptography", reason="Security.temporary() needs the cryptography package")
    out = subprocess.run([sys.executable, str(CLUSTER / "tls.py"), str(golden_dir("llama"))],
                         capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), "the recipe should print the generated text"


def test_gpu_recipe_compiles():
    py_compile.compile(str(CLUSTER / "gpu.py"), doraise=True)


@pytest.mark.cluster
def test_slurm_recipe_runs_with_a_stand_in_srun(tmp_path):
    """The whole batch script on this machine: 2 "nodes", srun starting both workers here, in a
    network namespace of its own (so its scheduler's port 8786 collides with nothing)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root with unshare (util-linux)")
        pytest.skip("needs root and unshare for a private network namespace")
    srun = tmp_path / "srun"
    srun.write_text('#!/usr/bin/env bash\n# srun --ntasks=N CMD...: N copies of CMD on this machine\n'
                    'n=${1#--ntasks=}; shift\nfor _ in $(seq "$n"); do "$@" & done\nwait\n')
    srun.chmod(0o755)
    env = {**ENV, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "1"}
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec bash "
                                 f"{CLUSTER / 'slurm.sbatch'} {golden_dir('llama')}"],
                                cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        proc.wait(timeout=150)                        # the script ends when its Python part does
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)       # the scheduler and workers it left running
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, (tmp_path / "err").read_text()[-3000:]
    assert (tmp_path / "out").read_text().strip(), "the batch script should print the generated text"
    assert (tmp_path / "daskllm-scheduler-4242.json").exists()
