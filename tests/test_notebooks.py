"""The notebooks in notebooks/ run top to bottom (nbclient, a real kernel, LocalClusters) and are
committed without outputs. Each one asserts what it shows (same tokens, same logits, ...)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
ALL = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def test_the_notebooks_are_there():
    assert set(ALL) >= {"quickstart", "data", "tensor", "sequence", "expert", "pipeline", "mesh"}


@pytest.mark.parametrize("name", ALL)
def test_committed_without_outputs(name):
    import nbformat
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {i} of {name}.ipynb has outputs"


@pytest.mark.cluster
@pytest.mark.timeout(900)        # the quickstart loads the real default model (SmolLM2) twice
@pytest.mark.parametrize("name", ALL)
def test_runs_top_to_bottom(name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")          # jupyter_core's path-migration warning
    # A fresh worker imports daskllm when its rank actor is created, inside the 30 s start-up
    # time-out; four fresh workers on a busy 2-core machine measured ~40 s. Give them longer.
    monkeypatch.setenv("DASK_DASKLLM__CONNECT_TIMEOUT", "180")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(NOTEBOOKS.parent),
                                                                   os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    pictures = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if "image/png" in o.get("data", {}))
    assert pictures >= 1, f"{name}.ipynb drew no picture"
