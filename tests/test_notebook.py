"""Acceptance: a notebook run by nbclient in a real kernel, as `jupyter nbconvert --execute` would.

Covers a 2-worker all-reduce fit on 200k rows, the low-level train(ctx) path, and a
resume from the saved step. The assertions live in the notebook's own cells.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent / "notebooks" / "train_e2e.ipynb"


@pytest.mark.slow
def test_end_to_end_notebook(tmp_path, monkeypatch, tfos_kernel):
    monkeypatch.setenv("TFOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFOS_SPARK_MASTER", "local[2]")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name=tfos_kernel, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "tfos job 'regression' succeeded" in outputs
    assert "regression_loop" in outputs
    (tmp_path / "executed.ipynb").write_text(nbformat.writes(nb))
