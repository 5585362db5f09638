"""A job's results in MLflow, logged from the kernel: the driver already has every event.

With `--mlflow auto` (the default; `TFOS_MLFLOW` sets it for a site) a job logs when the
`mlflow` package is installed and a tracking URI is set (`MLFLOW_TRACKING_URI`, or
`mlflow.set_tracking_uri` in the kernel) or a run is active in the kernel; `on` logs to
MLflow's default store otherwise, and fails the job's start when mlflow is missing;
`off` never logs. A job logs into the kernel's active run when there is one (and leaves
it open), else into a run of its own named after the job, which a resumed job continues
(its id is kept in state.json). Logged: the options as params; each epoch's job-level
metrics, at the epoch's number; the chief's per-interval loss, at its global step; and,
when the job succeeds, the model (`mlflow.keras` for a Keras 3 model, `mlflow.tensorflow`
for a legacy one) with a signature from the feed's columns. Nothing is logged from the
executors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from typing import Any, Callable, Iterator

from ..errors import TfosError
from .observers import JobObserver

FLUSH_S = 10.0  # interval losses are sent in batches this often


def wanted(mode: str) -> bool:
    """Whether a job with `--mlflow mode` logs to MLflow in this kernel."""
    if mode == "off":
        return False
    installed = importlib.util.find_spec("mlflow") is not None
    if mode == "on":
        if not installed:
            raise TfosError("--mlflow on, but the mlflow package is not installed in the kernel's Python: "
                            "pip install mlflow, or pass --mlflow auto (logs when mlflow is installed and set up).")
        return True
    if not installed:
        return False
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return True
    # A kernel that never imported mlflow set no URI and started no run: no import (seconds) to learn so.
    mlflow = sys.modules.get("mlflow")
    return mlflow is not None and (mlflow.tracking.is_tracking_uri_set() or mlflow.active_run() is not None)


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page for a tracking server; for a local store, the run and the store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {tracking_uri}"


class MlflowTracker(JobObserver):
    """Logs one run of a job; `announce(event)` tells the other observers and the store
    where (an `mlflow` event with the run's id and link)."""

    def __init__(self, job: str, options: dict[str, Any], store: Any, announce: Callable[[dict[str, Any]], None],
                 restart: bool) -> None:
        import mlflow

        self._mlflow = mlflow
        self.job, self.options, self.store, self._announce = job, options, store, announce
        self.restart = restart
        self.run_id: str | None = None
        self._owned = False  # a run of our own, ended here; the kernel's active run is left open
        self._pending: list[Any] = []
        self._flushed = time.monotonic()

    def on_start(self, state: dict[str, Any]) -> None:
        mlflow = self._mlflow
        active = mlflow.active_run()
        earlier = None if self.restart else (self.store.read_state(self.job) or {}).get("mlflow_run_id")
        if active is not None:
            run = active
        else:
            run = mlflow.start_run(run_id=earlier) if earlier else mlflow.start_run(run_name=self.job)
            self._owned = True
        self.run_id = run.info.run_id
        client = mlflow.MlflowClient()
        logged = client.get_run(self.run_id).data.params
        params = {k: str(v) for k, v in self.options.items() if k not in ("zk_auth",) and v is not None}
        # A param cannot change within a run: a resumed job logs only what it did not log yet.
        new = {k: v[:6000] for k, v in params.items() if k not in logged}
        if new:
            mlflow.log_params(new, run_id=self.run_id)
        client.set_tag(self.run_id, "tfos.job", self.job)
        link = run_link(mlflow.get_tracking_uri(), run.info.experiment_id, self.run_id)
        self.store.write_state(self.job, mlflow_run_id=self.run_id, mlflow_link=link)
        self._announce({"kind": "mlflow", "run_id": self.run_id, "link": link, "time": time.time()})

    def on_event(self, event: dict[str, Any]) -> None:
        if self.run_id is None or event.get("role", "worker") != "worker" or event.get("worker") != 0:
            return
        from mlflow.entities import Metric

        kind, now = event.get("kind"), int(time.time() * 1000)
        metrics = event.get("metrics") or {}
        if kind == "epoch":
            self._pending += [Metric(k, float(v), now, int(event["epoch"])) for k, v in metrics.items()
                              if isinstance(v, (int, float))]
            self._flush()
        elif kind == "step" and isinstance(metrics.get("loss"), (int, float)) and event.get("step") is not None:
            self._pending.append(Metric("interval_loss", float(metrics["loss"]), now, int(event["step"])))
            if time.monotonic() - self._flushed >= FLUSH_S:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._mlflow.MlflowClient().log_batch(self.run_id, metrics=self._pending)
            self._pending = []
        self._flushed = time.monotonic()

    def on_end(self, state: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        try:
            self._flush()
            if state.get("state") == "succeeded":
                self._log_model()
        finally:
            if self._owned:
                status = {"succeeded": "FINISHED", "failed": "FAILED"}.get(state.get("state"), "KILLED")
                self._mlflow.end_run(status=status)

    def _log_model(self) -> None:
        """The saved model, as MLflow's own flavor of its Keras, with the feed's signature."""
        from ..job.job import Job

        job = Job(self.job, self.store)
        mlflow = self._mlflow
        if job.spec.options.framework == "torch":
            self._log_torch_model(job)
            return
        model = job.load_model(compile=False)
        example = job.input_example()
        from ..protocol.keras_kinds import KERAS3, kind_of

        signature = mlflow.models.infer_signature(example, _predict(model, example))
        flavor = mlflow.keras if kind_of(model) == KERAS3 else mlflow.tensorflow
        with _keeping_tf_keras():
            flavor.log_model(model, name="model", signature=signature)  # into the active run: this job's


    def _log_torch_model(self, job: Any) -> None:
        """A PyTorch job's module through mlflow.pytorch. The module is built from the stored
        cell outside the cell's module (`__tfos_train__` is gone from sys.modules again), so
        MLflow's cloudpickle keeps its class by value: the logged model loads wherever
        PyTorch is, without the cell."""
        from ..protocol.torch_model import predict_on_batch, triton_kept_out

        mlflow = self._mlflow
        module = job.load_model()
        example = job.input_example()
        with triton_kept_out():
            import mlflow.pytorch

            signature = mlflow.models.infer_signature(example, predict_on_batch(module, example))
            # "pickle": MLflow's traced format ("pt2") takes no dict of inputs (--inputs dict).
            mlflow.pytorch.log_model(module, name="model", signature=signature, serialization_format="pickle")


@contextlib.contextmanager
def _keeping_tf_keras() -> Iterator[None]:
    """The kernel's `tf.keras` as it was: mlflow.tensorflow imports the module
    `tensorflow.keras`, which replaces TensorFlow's lazily chosen (legacy) `tf.keras` with
    Keras 3's, and the kernel could then no longer load a legacy job's model."""
    import tensorflow as tf

    attribute, module = vars(tf).get("keras"), sys.modules.get("tensorflow.keras")
    try:
        yield
    finally:
        if attribute is not None:
            tf.keras = attribute
        if module is None:
            sys.modules.pop("tensorflow.keras", None)
        else:
            sys.modules["tensorflow.keras"] = module


def _predict(model: Any, example: Any) -> Any:
    import numpy as np

    out = model(example, training=False)
    return np.asarray(out) if not isinstance(out, (dict, list, tuple)) else out
