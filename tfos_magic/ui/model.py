"""The dashboard's state, built from a job's event stream; no widget, no display.

The live widget, the static summary and the tests all read this one model. Events go
in one at a time (`feed`); the widget asks for what is new since its last tick
(`take_delta`: appended points only, never whole series) and, now and then, for a
decimated copy of everything (`snapshot`) that lets a reloaded page redraw the chart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..job.digest import ValidationShares, decimate, stopped_early_text
from ..protocol.events import log_line

MAX_SNAPSHOT_POINTS = 2000
MAX_LOG_LINES = 500


@dataclass
class Series:
    """(x, y) points, appended in order; `sent` is how many the front end already has."""

    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    sent: int = 0

    def append(self, x: float, y: float) -> None:
        self.x.append(float(x))
        self.y.append(float(y))

    def take_new(self) -> tuple[list[float], list[float]]:
        new = self.x[self.sent:], self.y[self.sent:]
        self.sent = len(self.x)
        return new

    def decimated(self, most: int = MAX_SNAPSHOT_POINTS) -> tuple[list[float], list[float]]:
        """At most `most` points: every k-th, always keeping the first and the last."""
        idx = decimate(range(len(self.x)), most)
        return [self.x[i] for i in idx], [self.y[i] for i in idx]


@dataclass
class Checkpoint:
    step: int
    epoch: int | None
    time: float
    path: str
    size: int | None = None


@dataclass
class DashboardModel:
    """Everything the dashboard shows about one run of one job."""

    job: str
    workers: int = 1
    ps: int = 0
    epochs: int = 1
    has_validation: bool = False
    state: str = "starting"
    phase: str = "planning the job"
    attempt: int = 1
    restarts: list[str] = field(default_factory=list)
    job_group: str | None = None
    spark_ui: str | None = None
    error: str | None = None
    stopped_early: str | None = None  # a callback of the cell ended training before --epochs, and why
    error_file: str | None = None
    started: float = field(default_factory=time.time)
    first_step_at: float | None = None
    ended: float | None = None
    step: int = 0
    initial_step: int = 0
    epoch: int = 0  # finished epochs
    initial_epoch: int = 0
    restored_from: str | None = None
    steps_per_epoch: int | None = None
    rows: int = 0  # rows streamed so far in this run (all workers)
    rows_per_s: float | None = None
    started_tasks: set[tuple[str, int]] = field(default_factory=set)
    warm_tasks: set[tuple[str, int]] = field(default_factory=set)  # TF processes that were spares (warm starts)
    framework: str = "TF"  # what the training processes run: "TF", or "PyTorch" (from the tasks' events)
    spark_tasks: tuple[int, int] | None = None  # (done, total) of the Spark stage computing the data
    loss: dict[int, Series] = field(default_factory=dict)  # worker -> (step, loss)
    val_loss: Series = field(default_factory=Series)  # (step, val_loss) at each epoch end
    epoch_loss: Series = field(default_factory=Series)  # (step, loss) at each epoch end
    checkpoints: list[Checkpoint] = field(default_factory=list)
    model_path: str | None = None
    gpus: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # worker -> devices or [proc stats]
    peak_gpu: dict[int, dict[str, float]] = field(default_factory=dict)
    tensorboard_dir: str | None = None  # where the chief writes TensorBoard's event files
    mlflow_link: str | None = None  # the MLflow run the job logs to (driver/mlflow_tracking.py)
    _validation: ValidationShares = field(default_factory=ValidationShares)  # ps mode: the workers' shares
    _chief_epoch_steps: dict[int, int] = field(default_factory=dict)
    _validated: set[int] = field(default_factory=set)
    logs: list[str] = field(default_factory=list)
    _logs_sent: int = 0
    _rows_by_worker: dict[int, int] = field(default_factory=dict)
    _epoch_end_steps: list[int] = field(default_factory=list)

    # --- input ----------------------------------------------------------
    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(event)

    def _on_spark(self, e: dict[str, Any]) -> None:
        """Driver-side progress of the Spark stage that computes the DataFrame (not in metrics.jsonl)."""
        self.spark_tasks = (int(e.get("done", 0)), int(e.get("total", 0)))
        if self.first_step_at is None and len(self.started_tasks) == 0:
            done, total = self.spark_tasks
            self.phase = f"Spark is computing the DataFrame: {done} of {total} tasks done"

    def _learn_framework(self, e: dict[str, Any]) -> None:
        if e.get("framework"):
            self.framework = "PyTorch" if e["framework"] == "torch" else "TF"

    def _on_task(self, e: dict[str, Any]) -> None:
        """A Spark task of the training stage began: the data is computed, the training processes come next."""
        self._learn_framework(e)
        if self.first_step_at is None and len(self.started_tasks) == 0:
            self.phase = f"Spark tasks of the training stage running; {self.framework} processes starting"

    def _on_attempt(self, e: dict[str, Any]) -> None:
        self.attempt = int(e.get("attempt", self.attempt))
        self.started_tasks, self.warm_tasks = set(), set()
        self.phase = f"attempt {self.attempt}: starting Spark tasks"

    def _on_started(self, e: dict[str, Any]) -> None:
        self.state = "running"
        self._learn_framework(e)
        task = (e.get("role", "worker"), int(e.get("worker", 0)))
        self.started_tasks.add(task)
        if e.get("warm"):
            self.warm_tasks.add(task)
        want = self.workers + self.ps
        if self.first_step_at is None:
            self.phase = (f"{self.framework} processes starting: {len(self.started_tasks)} of {want}"
                          if len(self.started_tasks) < want
                          else f"{self.framework} cluster joining, first step building") + self._start_note()

    def _start_note(self, training: bool = False) -> str:
        """Whether the TF processes started warm (spares with TensorFlow loaded) or cold;
        once training, said only of a warm start."""
        if not self.started_tasks:
            return ""
        warm, started = len(self.warm_tasks & self.started_tasks), len(self.started_tasks)
        if not warm:
            return "" if training else f" (cold start: each process loads {self._library})"
        return " (warm start)" if warm == started else f" (warm start: {warm} of {started} processes)"

    @property
    def _library(self) -> str:
        return "PyTorch" if self.framework == "PyTorch" else "TensorFlow"

    def _on_training(self, e: dict[str, Any]) -> None:
        if int(e.get("worker", 0)) == 0:
            # This run's clock starts again: the history shown before a resumed run must not
            # count as its start-up, nor its steps as this run's rate (ETA).
            self.first_step_at = None
            self.initial_step = self.step = int(e.get("initial_step") or 0)
            self.initial_epoch = self.epoch = int(e.get("initial_epoch") or 0)
            if e.get("tensorboard"):
                self.tensorboard_dir = str(e["tensorboard"])
            if e.get("restored_from"):
                self.restored_from = e["restored_from"]
                self.phase = f"resumed from step {self.initial_step} (epoch {self.initial_epoch})"

    def _on_step(self, e: dict[str, Any]) -> None:
        worker = int(e.get("worker", 0))
        metrics = e.get("metrics") or {}
        step = e.get("step")
        if self.first_step_at is None:
            self.first_step_at = float(e.get("time", time.time()))
        self.phase = "training" + self._start_note(training=True)
        if step is not None:
            if worker == 0:
                self.step = max(self.step, int(step))
            if metrics.get("loss") is not None:
                self.loss.setdefault(worker, Series()).append(int(step), metrics["loss"])
        if e.get("rows") is not None:
            self._rows_by_worker[worker] = int(e["rows"])
            self.rows = sum(self._rows_by_worker.values())
        if metrics.get("rows_per_s") is not None and worker == 0:
            self.rows_per_s = float(metrics["rows_per_s"]) * self.workers

    def _on_epoch(self, e: dict[str, Any]) -> None:
        shared = self._validation.add(e)
        if shared is not None:
            self._shared_validation(shared, e)
        if int(e.get("worker", 0)) != 0:
            return
        metrics = e.get("metrics") or {}
        self.epoch = max(self.epoch, int(e["epoch"]))
        step = int(e.get("step") or self.step)
        self.step = max(self.step, step)
        self._epoch_end_steps.append(step)
        if len(self._epoch_end_steps) == 1 and step > self.initial_step:
            self.steps_per_epoch = step - self.initial_step
        elif len(self._epoch_end_steps) > 1:
            self.steps_per_epoch = self._epoch_end_steps[-1] - self._epoch_end_steps[-2]
        if metrics.get("loss") is not None:
            self.epoch_loss.append(step, metrics["loss"])
        self._chief_epoch_steps[int(e["epoch"])] = step
        if metrics.get("val_loss") is not None and metrics.get("val_rows") is None:
            self.has_validation = True
            self.val_loss.append(step, metrics["val_loss"])
        elif shared is not None:
            self._shared_validation(shared, e)
        if metrics.get("rows_per_s") is not None:
            self.rows_per_s = float(metrics["rows_per_s"]) * self.workers

    def _shared_validation(self, epoch: int, e: dict[str, Any]) -> None:
        """ps mode: the epoch's validation point once every worker scored its share of the
        rows, at the chief's step of that epoch (job/digest.py: ValidationShares)."""
        if epoch in self._validated or epoch not in self._chief_epoch_steps \
                or self._validation.reported(epoch) < self.workers:
            return
        loss, _ = self._validation.combined(epoch)
        self._validated.add(epoch)
        self.has_validation = True
        self.val_loss.append(self._chief_epoch_steps[epoch], loss)

    def _on_checkpoint(self, e: dict[str, Any]) -> None:
        self.checkpoints.insert(0, Checkpoint(int(e.get("step") or 0), e.get("epoch"), float(e.get("time", 0)),
                                              str(e.get("path")), e.get("size")))

    def _on_stopping(self, e: dict[str, Any]) -> None:
        self.phase = f"stopping: the workers checkpoint at step {e.get('step')}, then end"

    def _on_model(self, e: dict[str, Any]) -> None:
        self.model_path = e.get("path")

    def _on_log(self, e: dict[str, Any]) -> None:
        self.add_log(log_line(e))

    def add_log(self, line: str) -> None:
        """A line the cell printed on a worker, or a note; the newest MAX_LOG_LINES are kept."""
        self.logs.append(line)
        if len(self.logs) > MAX_LOG_LINES:
            drop = len(self.logs) - MAX_LOG_LINES
            self.logs = self.logs[drop:]
            self._logs_sent = max(0, self._logs_sent - drop)

    def _on_gpu(self, e: dict[str, Any]) -> None:
        worker = int(e.get("worker", 0))
        devices = list(e.get("devices") or [])
        self.gpus[worker] = devices or [dict(e.get("process") or {}, gpu=None)]
        peak = self.peak_gpu.setdefault(worker, {})
        for d in devices:
            for key in ("utilization", "memory_used"):
                value = d.get(f"peak_{key}", d.get(key))  # a stored sample carries the peak it stands for
                if value is not None:
                    peak[key] = max(peak.get(key, 0.0), float(value))
            if d.get("memory_total") is not None:
                peak["memory_total"] = float(d["memory_total"])

    def _on_mlflow(self, e: dict[str, Any]) -> None:
        self.mlflow_link = e.get("link")

    def _on_stopped_early(self, e: dict[str, Any]) -> None:
        if int(e.get("worker", 0)) == 0:
            self.stopped_early = stopped_early_text(e)

    def _on_error(self, e: dict[str, Any]) -> None:
        self.error = f"{e.get('role', 'worker')} {e.get('worker')}: {e.get('message')}"
        self.error_file = e.get("details_file") or self.error_file

    # --- driver-side lifecycle -------------------------------------------
    def attempt_failed(self, attempt: int, message: str) -> None:
        self.restarts.append(f"attempt {attempt}: {message}")

    def end(self, state: str, error: str | None = None, ended: float | None = None) -> None:
        self.state, self.ended = state, ended or time.time()
        self.phase = state
        if error:
            self.error = error

    # --- derived ----------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        if self.steps_per_epoch is None:
            return None
        return self.initial_step + self.steps_per_epoch * (self.epochs - self.initial_epoch)

    def elapsed(self, now: float | None = None) -> float:
        return (self.ended or now or time.time()) - self.started

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, from the step rate since the first step; None while unknown."""
        total = self.total_steps
        if total is None or self.first_step_at is None or self.ended:
            return None
        spent = (now or time.time()) - self.first_step_at
        done = self.step - self.initial_step
        if done <= 0 or spent <= 0:
            return None
        return max(0.0, (total - self.step) * spent / done)

    def status(self, now: float | None = None) -> dict[str, Any]:
        """The small, whole-state part of the dashboard (cheap to send every tick)."""
        gpu = {str(w): d for w, d in self.gpus.items()}
        return {
            "job": self.job, "state": self.state, "phase": self.phase, "attempt": self.attempt,
            "restarts": list(self.restarts), "job_group": self.job_group, "spark_ui": self.spark_ui,
            "error": self.error, "error_file": self.error_file, "stopped_early": self.stopped_early,
            "step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "epochs": self.epochs,
            "rows": self.rows, "rows_per_s": self.rows_per_s, "elapsed": self.elapsed(now), "eta": self.eta(now),
            "workers": self.workers, "ps": self.ps, "gpu": gpu,
            "checkpoints": [vars(c) for c in self.checkpoints[:20]], "model_path": self.model_path,
        }

    def take_delta(self) -> dict[str, Any]:
        """Points and log lines added since the last call: the only series data a tick sends."""
        series = {}
        for name, s in self._all_series().items():
            xs, ys = s.take_new()
            if xs:
                series[name] = (xs, ys)
        logs, self._logs_sent = self.logs[self._logs_sent:], len(self.logs)
        return {"series": series, "logs": logs}

    def snapshot(self, most: int = MAX_SNAPSHOT_POINTS) -> dict[str, tuple[list[float], list[float]]]:
        """Every series, decimated to at most `most` points: what a reloaded page redraws."""
        return {name: s.decimated(most) for name, s in self._all_series().items()}

    def _all_series(self) -> dict[str, Series]:
        out = {f"loss/worker {w}": s for w, s in sorted(self.loss.items())}
        if self.val_loss.x:
            out["val_loss"] = self.val_loss
        return out

    def best_loss(self) -> float | None:
        values = self.epoch_loss.y or (self.loss[0].y if 0 in self.loss else [])
        return min(values) if values else None

    def final_loss(self) -> float | None:
        values = self.epoch_loss.y or (self.loss[0].y if 0 in self.loss else [])
        return values[-1] if values else None
