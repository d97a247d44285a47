"""Shared test fixtures: golden checkpoints and one multi-process LocalCluster per session."""
from __future__ import annotations

from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
DENSE = ["llama", "llama_bf16_sharded", "llama_mha_tied", "llama_mqa_linear", "mistral", "qwen2", "qwen3"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def golden_dir(name: str) -> Path:
    return GOLDEN / name


def load_golden(name: str) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(GOLDEN / name / "golden.safetensors"))


@pytest.fixture(scope="session")
def client():
    """A LocalCluster of 4 worker processes (1 thread each), shared by the cluster tests."""
    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=4, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = Client(cluster, direct_to_workers=True)
    yield c
    c.close()
    cluster.close()
