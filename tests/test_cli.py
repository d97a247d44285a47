"""The `daskllm` command as a newcomer runs it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(*args, timeout=180):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "daskllm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_generate():
    out = _run("--help")
    assert out.returncode == 0 and "generate" in out.stdout
    out = _run("generate", "--help")
    assert "--max-new-tokens" in out.stdout and "--temperature" in out.stdout


@pytest.mark.cluster
def test_generate_with_the_builtin_model(tmp_path):
    os.environ["DASKLLM_CACHE"] = str(tmp_path)
    try:
        out = _run("generate", "--max-new-tokens", "8", "--ignore-eos", "Once upon a time")
    finally:
        del os.environ["DASKLLM_CACHE"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "no text was streamed"
    assert "loading" in out.stderr
    assert (tmp_path / "builtin-v1" / "model.safetensors").exists()


def test_bad_temperature_is_refused_before_starting_workers():
    out = _run("generate", "--temperature", "-1", "hi", timeout=60)
    assert out.returncode == 2 and "temperature must be >= 0" in out.stderr
    assert "starting workers" not in out.stderr
