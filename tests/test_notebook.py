"""Acceptance: a notebook run by nbclient in a real kernel, as `jupyter nbconvert --execute` would.

Covers a 2-worker all-reduce fit on 100k rows with a validation DataFrame, the
low-level train(ctx) path, and a resume from the saved step; the assertions on the
jobs live in the notebook's own cells. Here: what the saved file keeps of the live
dashboard, read without a kernel (the static summary, the widget state, nbconvert).
"""

import subprocess
import sys
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
    path = tmp_path / "executed.ipynb"
    path.write_text(nbformat.writes(nb))

    def text(output):
        return output.get("text", "") + output.get("data", {}).get("text/plain", "")

    outputs = "".join(text(o) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "tfos job 'regression' succeeded" in outputs
    assert "regression_loop" in outputs
    train = next(c for c in nb.cells if c.source.startswith("%%tf_train regression --workers 2 --epochs 3"))
    last = train.outputs[-1]
    assert last.output_type == "display_data", train.outputs
    assert {"image/png", "text/html", "text/plain"} <= set(last.data), last.data.keys()
    assert "application/vnd.jupyter.widget-view+json" not in last.data, "the live view became the summary"
    # The notebook later resumes this job to a 4th epoch: the summary is of the first run's 3.
    final = next(h["loss"] for h in tfos_magic_history(tmp_path) if h["epoch"] == 3)
    assert f"final {final:.4g}" in last.data["text/html"], last.data["text/html"][-600:]
    assert "val_loss" in last.data["text/plain"]
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]
    assert "state" in state and state["state"], "GitHub needs the widget state to render the file"

    html = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--stdout", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert html.returncode == 0, html.stderr[-2000:]
    assert "<img alt='loss curve of tfos job regression'" in html.stdout.replace('"', "'")


def tfos_magic_history(tmp_path):
    from tfos_magic import get_job

    return get_job("regression", str(tmp_path / "home")).history
