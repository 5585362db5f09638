"""A job's results in MLflow (driver/mlflow_tracking.py), against real tracking stores: a
local sqlite store, and an `mlflow server` on loopback. Each run is read back with
MlflowClient, and the logged model loaded and run, in a fresh process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import keras3_cell, regression_cell, run, torch_cell

from tfos_magic import get_job

pytestmark = pytest.mark.e2e

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range(2000, numPartitions=2).select(*[F.rand(seed=i).alias(f"x{{i}}") for i in range(4)])
df = df.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + F.col("x2"))
val = df.limit(300)
df
"""

READ_BACK = r"""
import json, sys
import numpy as np
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
client = mlflow.MlflowClient()
run = client.get_run(sys.argv[2])
history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
           for k in ("loss", "val_loss", "interval_loss")}
model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
out = model.predict(np.full((3, 4), 0.5, dtype="float32"))
print(json.dumps({"params": run.data.params, "status": run.info.status, "history": history,
                  "predicted": np.asarray(out).reshape(3, -1).tolist(), "tags": run.data.tags}))
"""


def read_back(uri: str, run_id: str) -> dict:
    """The run as a fresh process sees it."""
    proc = subprocess.run([sys.executable, "-c", READ_BACK, uri, run_id], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def tracking(monkeypatch, tmp_path):
    """Point the kernel's mlflow at `uri`, and reset it after the test. A sqlite store keeps
    its artifacts in ./mlruns: the kernel's working directory is the test's own."""
    import mlflow

    monkeypatch.chdir(tmp_path)

    def use(uri: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)

    yield use
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_a_job_logs_to_a_sqlite_store_and_a_resumed_job_continues_its_run(shell, tmp_path, tracking):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking(uri)
    run(shell, ETL.format(name="mlf"))
    _, err = run(shell, "%%tf_train mlf --workers 2 --epochs 2 --batch-size 50 --label y --validation-df val\n"
                        + keras3_cell(inputs=4, hidden=16, learning_rate=0.01))
    assert err is None, err
    job = get_job("mlf")
    assert job.state == "succeeded"
    run_id = job._state["mlflow_run_id"]
    seen = read_back(uri, run_id)
    assert seen["status"] == "FINISHED" and seen["tags"]["tfos.job"] == "mlf"
    assert seen["params"]["epochs"] == "2" and seen["params"]["workers"] == "2" and seen["params"]["label"] == "y"
    assert [s for s, _ in seen["history"]["loss"]] == [1, 2] and len(seen["history"]["val_loss"]) == 2
    assert [v for _, v in seen["history"]["loss"]] == pytest.approx([h["loss"] for h in job.history])
    assert seen["history"]["interval_loss"], "the chief's per-interval loss"
    import numpy as np

    want = job.load_model().predict(np.full((3, 4), 0.5, dtype="float32"), verbose=0)
    assert np.allclose(np.ravel(seen["predicted"]), np.ravel(want), atol=1e-5), (seen["predicted"], want)

    # The same cell to 3 epochs: it resumes, and appends to the same run.
    _, err = run(shell, "%%tf_train mlf --workers 2 --epochs 3 --batch-size 50 --label y --validation-df val\n"
                        + keras3_cell(inputs=4, hidden=16, learning_rate=0.01))
    assert err is None, err
    job = get_job("mlf")
    assert job._state["mlflow_run_id"] == run_id
    again = read_back(uri, run_id)
    assert [s for s, _ in again["history"]["loss"]] == [1, 2, 3] and again["status"] == "FINISHED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback, its runs in sqlite and its artifacts in a folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'runs.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(30)


def test_a_legacy_job_logs_to_a_tracking_server(shell, tracking, mlflow_server, capsys):
    tracking(mlflow_server)
    run(shell, ETL.format(name="mlfsrv"))
    capsys.readouterr()
    _, err = run(shell, "%%tf_train mlfsrv --workers 1 --epochs 2 --batch-size 50 --label y --mlflow on --restart\n"
                        + regression_cell(inputs=4, hidden=16, learning_rate=0.01))
    assert err is None, err
    job = get_job("mlfsrv")
    run_id = job._state["mlflow_run_id"]
    link = f"{mlflow_server}/#/experiments/"
    assert link in job._state["mlflow_link"] and run_id in job._state["mlflow_link"]
    assert f"MLflow: {job._state['mlflow_link']}" in capsys.readouterr().out, "the summary links the run"
    # Logging a legacy model (mlflow.tensorflow) leaves the kernel's tf.keras the legacy one.
    import tensorflow as tf

    assert tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__
    seen = read_back(mlflow_server, run_id)
    assert seen["status"] == "FINISHED" and [s for s, _ in seen["history"]["loss"]] == [1, 2]
    assert len(seen["predicted"]) == 3


def test_mlflow_off_logs_nothing(shell, tracking, tmp_path):
    tracking(f"sqlite:///{tmp_path / 'off.db'}")
    run(shell, ETL.format(name="mlfoff"))
    _, err = run(shell, "%%tf_train mlfoff --epochs 1 --label y --mlflow off\n"
                        + regression_cell(inputs=4, hidden=8, learning_rate=0.01))
    assert err is None, err
    assert "mlflow_run_id" not in get_job("mlfoff")._state


def test_a_torch_job_logs_its_module(shell, tmp_path, tracking):
    """A %%torch_train job's params and metrics, and its module through mlflow.pytorch:
    a fresh process loads it with mlflow.pyfunc, without the cell, and it predicts as
    Job.load_model()'s module does."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking(uri)
    run(shell, ETL.format(name="mlft"))
    _, err = run(shell, "%%torch_train mlft --workers 2 --epochs 2 --batch-size 50 --label y --validation-df val\n"
                        + torch_cell(inputs=4, hidden=16, learning_rate=0.01))
    assert err is None, err
    job = get_job("mlft")
    assert job.state == "succeeded", job.error
    seen = read_back(uri, job._state["mlflow_run_id"])
    assert seen["status"] == "FINISHED" and seen["params"]["framework"] == "torch"
    assert [s for s, _ in seen["history"]["loss"]] == [1, 2] and len(seen["history"]["val_loss"]) == 2
    import numpy as np
    import torch

    with torch.no_grad():
        want = job.load_model()(torch.full((3, 4), 0.5)).numpy()
    assert np.allclose(np.ravel(seen["predicted"]), want, atol=1e-5), (seen["predicted"], want)
