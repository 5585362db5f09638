"""Runs in the notebook's kernel: run one attempt of a job as Spark jobs and watch it to its end.

An attempt is the worker job (a barrier `mapInArrow`, one task per TF worker, after
the user's ETL stages) and, in ps mode, the PS job (one long-running task per
parameter server), started once the workers' own tasks run. The supervisor ends the
PS job when the workers finish, and tears the whole attempt down when any task
fails, saying whether a restart may help (a crash, a lost executor) or not (an error
in the cell or the data). Every wait is bounded, except the user's own ETL, which is
shown as progress and can be stopped. Spark itself is reached only through a
`SparkBackend` (driver/spark_backend.py).
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import TfosError
from ..job import JobStore
from ..protocol.events import log_line
from .gpu_record import GpuRecord
from .observers import JobObserver
from .spark_backend import SparkBackend, SparkJob

POLL_S = 0.2
ERROR_GRACE_S = 2.0
# How long a stop waits for the workers' checkpoint before cancelling them anyway.
STOP_SAVE_S = 10.0
# Events that show a TF process moving on (gpu events do when their `rows` grew).
PROGRESS_KINDS = frozenset({"started", "training", "step", "epoch", "checkpoint", "model", "stopping", "finished"})
# Complaints of a worker whose peer died: symptoms, never the cause. TF's collectives, then
# PyTorch's: Gloo words a dead peer by what its socket saw (and the words changed between
# releases), NCCL by its abort.
_SECONDARY = re.compile(r"Collective ops is aborted|UnavailableError|CancelledError|unhealthy|"
                        r"Socket closed|Connection (?:reset|closed) by peer|Broken pipe|"
                        r"NCCL communicator was aborted|ncclRemoteError")


def is_secondary(message: str) -> bool:
    """A peer's complaint that a collective or a connection broke: a symptom, not a cause."""
    return bool(_SECONDARY.search(message))


# Causes that a restart cures: a task's agreed port taken by another process before its
# gRPC server bound it (protocol/net.py: ReservedPort); the next attempt agrees on new ports.
_TRANSIENT = re.compile(r"Could not start gRPC server")


def is_transient(message: str) -> bool:
    """A task's own failure that says nothing of the cell or the data: worth a restart."""
    return bool(_TRANSIENT.search(message))


@dataclass(frozen=True)
class TaskError:
    """One task's error report: the message, whether a restart may help, and where its
    full traceback and log tail were kept (None when the task sent none)."""

    message: str
    retryable: bool
    details_file: str | None = None

    def __str__(self) -> str:
        return self.message + (f" (traceback and log: {self.details_file})" if self.details_file else "")


@dataclass
class RunMonitor:
    """A run's events from the channel: appended to metrics.jsonl (`gpu` samples thinned:
    driver/gpu_record.py), and watched here."""

    store: JobStore
    job: str
    run: int
    attempt: int = 1
    started: set[tuple[str, int]] = field(default_factory=set)
    # Spark tasks of the attempt that have begun (their `task` event), and when the first
    # worker task did: the TF stage's start, from which its start-up is timed.
    tasks: set[tuple[str, int]] = field(default_factory=set)
    tasks_started_at: float | None = None
    errors: list[TaskError] = field(default_factory=list)
    training: bool = False  # the chief got past its set-up (a `training` event)
    last_progress: float = field(default_factory=time.monotonic)
    last_event: dict[str, dict[str, Any]] = field(default_factory=dict)  # "worker 0" -> its last progress
    _rows: dict[str, int] = field(default_factory=dict)
    stop_saved: str | None = None  # the checkpoint the workers wrote when asked to stop
    # Events of the current attempt not yet shown: filled by the channel's threads,
    # drained by the kernel's main thread (so output lands in the running cell).
    pending: collections.deque = field(default_factory=collections.deque)
    gpu_record: GpuRecord = field(default_factory=GpuRecord)  # which `gpu` events metrics.jsonl keeps
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new_attempt(self, attempt: int) -> None:
        with self._lock:
            self.attempt, self.started, self.errors = attempt, set(), []
            self.tasks, self.tasks_started_at = set(), None
            self.training, self.stop_saved = False, None
            self.last_progress, self.last_event, self._rows = time.monotonic(), {}, {}
            self.pending.clear()

    def sink_for(self, attempt: int) -> Callable[[dict[str, Any]], None]:
        return lambda event: self.sink(event, attempt)

    def sink(self, event: dict[str, Any], attempt: int) -> None:
        with self._lock:
            event["run"], event["attempt"] = self.run, attempt
            details = event.pop("details", None)
            if event.get("kind") == "error" and details:
                # Kept in a file of its own: metrics.jsonl stays small and readable.
                name = f"run-{self.run}-attempt-{attempt}-{event.get('role', 'worker')}-{event.get('worker')}.txt"
                header = f"{event.get('role', 'worker')} {event.get('worker')}: {event.get('message')}\n\n"
                event["details_file"] = str(self.store.write_error_details(self.job, name, header + details))
            written = self.gpu_record.to_write(event, time.monotonic()) if event.get("kind") == "gpu" else event
            if written is not None:
                self.store.append_events(self.job, [written])
            if attempt != self.attempt:
                return  # a late word from an attempt already over
            role = event.get("role", "worker")
            self._note_progress(event, role)
            self.pending.append(event)
            if event.get("kind") == "task":
                self.tasks.add((role, int(event.get("worker", -1))))
                if role == "worker" and self.tasks_started_at is None:
                    self.tasks_started_at = time.monotonic()
            elif event.get("kind") == "started":
                self.started.add((role, int(event.get("worker", -1))))
            elif event.get("kind") == "training" and role == "worker" and event.get("worker") == 0:
                self.training = True
            elif event.get("kind") == "checkpoint" and event.get("reason") == "stop":
                self.stop_saved = str(event.get("path"))
            elif event.get("kind") == "error":
                message = f"{role} {event.get('worker')}: {event.get('message')}"
                retryable = bool(event.get("retryable")) or is_secondary(message) or is_transient(message)
                self.errors.append(TaskError(message, retryable, event.get("details_file")))

    def _note_progress(self, event: dict[str, Any], role: str) -> None:
        kind, who = event.get("kind"), f"{role} {event.get('worker')}"
        if kind == "gpu":  # rows handed to tf.data: progress when they grew
            rows = event.get("rows") or 0
            if rows <= self._rows.get(who, 0):
                return
            self._rows[who] = rows
            event = {"kind": "rows", "rows": rows, "time": event.get("time")}
        elif kind not in PROGRESS_KINDS:
            return
        self.last_progress = time.monotonic()
        self.last_event[who] = event

    def stalled(self, timeout: float) -> "AttemptFailed | None":
        """A failure when no TF process has moved on for `timeout` seconds, naming each one's last event."""
        idle = time.monotonic() - self.last_progress
        if idle < timeout:
            return None
        now = time.time()
        with self._lock:
            events = sorted(self.last_event.items())
        last = "; ".join(f"{who}: {_describe_event(e)} {now - float(e.get('time') or now):.0f}s ago"
                         for who, e in events) or "none"
        return AttemptFailed(
            f"No progress from any worker for {idle:.0f}s (--stall-timeout {timeout:g}). Last event of each task: "
            f"{last}. Something blocks training: a stuck input pipeline, a collective waiting for a peer, or "
            "code in the cell that waits; each task's log is in the Spark UI.", retryable=False)

    def drain(self, observers: JobObserver) -> None:
        """Hand the pending events to the observers; called on the kernel's main thread.
        A `log` event becomes one `[worker 0] text` line."""
        while True:
            try:
                event = self.pending.popleft()
            except IndexError:
                return
            if event.get("kind") == "log":
                observers.on_log(log_line(event))
            else:
                observers.on_event(event)

    def root_error(self) -> TaskError | None:
        """The first error that is a cause, not a peer's complaint that a collective broke."""
        causes = [e for e in self.errors if not is_secondary(e.message)]
        return (causes or self.errors or [None])[0]

    def retryable(self) -> bool:
        return all(e.retryable for e in self.errors)

    def failed(self) -> "AttemptFailed":
        root = self.root_error()
        if root is None:
            return AttemptFailed("a TF task failed", self.retryable())
        return AttemptFailed(str(root), self.retryable(), root.details_file)


def _describe_event(event: dict[str, Any]) -> str:
    kind = event.get("kind")
    if kind in ("step", "checkpoint", "stopping"):
        return f"{kind} (step {event.get('step')})"
    if kind == "epoch":
        return f"epoch {event.get('epoch')} done"
    if kind == "rows":
        return f"{event.get('rows')} rows read"
    return str(kind)


class JobStopped(Exception):
    """The user asked the job to stop (%tfos_stop, a stop request file)."""


@dataclass(frozen=True)
class StopControl:
    """How the watch loop learns of a stop request, and tells the TF processes (it returns
    how many got the word)."""

    requested: Callable[[], bool] = lambda: False
    tell_tasks: Callable[[], int] = lambda: 0


class AttemptFailed(TfosError):
    def __init__(self, message: str, retryable: bool, details_file: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.details_file = details_file


def _spark_error(exc: BaseException) -> tuple[str, bool]:
    """What a Spark job's failure says, and whether a restart may cure it. Our tasks'
    own failures travel in Spark's error text as the class that raised them: a
    WorkerCrashed (a TF process that died without a word) may be cured, a WorkerFailed
    (an error in the cell or the data, an environment that does not fit) may not, nor
    may any other Python exception. Anything else (a lost executor, a killed task) may."""
    text = str(exc)
    m = re.search(r"\b(WorkerFailed|WorkerCrashed): (.*?)(?:\n\s+at |\n\tat |\nTraceback|\Z)", text, re.S)
    if m:
        return m.group(2).strip(), m.group(1) == "WorkerCrashed"
    if "No module named 'tfos_magic'" in text or "No module named 'tensorflow'" in text:
        return ("The Spark executors' Python cannot import tfos_magic/TensorFlow. Ship an environment with the "
                "job (--env, made by `tfos pack-env env.tar.gz`; docs/deploy.md), or point spark.pyspark.python "
                "(or PYSPARK_PYTHON) at a Python that has tfos-magic installed."), False
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    python_error = "Traceback (most recent call last)" in text or "PythonException" in text
    return f"Spark job failed: {first[:2000]}", not python_error


@dataclass
class AttemptJobs:
    """One attempt's Spark jobs: the workers' (the ETL's stages, then the TF stage) and,
    in ps mode, the parameter servers'. That one starts only when the workers' own tasks
    do: its tasks would otherwise hold task slots, and their start-up clock run, while
    the ETL still computes the data."""

    backend: SparkBackend
    workers: SparkJob
    start_ps: Callable[[], SparkJob] | None = None
    ps: SparkJob | None = None

    def running(self) -> list[SparkJob]:
        return [job for job in (self.workers, self.ps) if job is not None and job.running]


def run_attempt(jobs: AttemptJobs, monitor: RunMonitor, expected: list[tuple[str, int]], start_timeout: float,
                observers: JobObserver, stop: StopControl = StopControl(), stall_timeout: float = 600.0) -> None:
    """Watch one attempt; return when the workers succeed, raise AttemptFailed otherwise,
    JobStopped on a stop request and KeyboardInterrupt on an interrupt.

    Whatever happens, every Spark job of the attempt is over when this returns or raises.
    """
    try:
        try:
            _watch(jobs, monitor, expected, start_timeout, observers, stop.requested, stall_timeout)
        except (JobStopped, KeyboardInterrupt):
            _checkpoint_before_stop(jobs.workers, monitor, observers, stop)
            raise
    finally:
        for job in jobs.running():
            job.cancel()
        monitor.drain(observers)


def _checkpoint_before_stop(workers: SparkJob, monitor: RunMonitor, observers: JobObserver,
                            stop: StopControl) -> None:
    """Ask the TF processes to stop, and give them up to STOP_SAVE_S to agree on a step
    and checkpoint it (training/stopping.py). Before training began there is nothing to
    save. A second interrupt while waiting ends the wait."""
    if not monitor.training or not workers.running or stop.tell_tasks() == 0:
        return
    observers.on_log(f"tfos: stopping; waiting up to {STOP_SAVE_S:.0f}s for the workers' checkpoint")
    deadline = time.monotonic() + STOP_SAVE_S
    while time.monotonic() < deadline and workers.running and monitor.stop_saved is None:
        workers.wait(POLL_S)
        monitor.drain(observers)
    monitor.drain(observers)
    if monitor.stop_saved is None:
        observers.on_log(f"tfos: no checkpoint within {STOP_SAVE_S:.0f}s; the job resumes from the last one")


def _watch(jobs: AttemptJobs, monitor: RunMonitor, expected: list[tuple[str, int]], start_timeout: float,
           observers: JobObserver, stop: Callable[[], bool], stall_timeout: float) -> None:
    workers = jobs.workers
    first_error: float | None = None
    etl = _EtlWatch(jobs, start_timeout, observers)
    while True:
        workers.wait(POLL_S)
        monitor.drain(observers)
        observers.on_poll()
        if stop():
            raise JobStopped("stopped on request")
        if monitor.errors:
            # Wait a moment so that the failing task's own report can arrive after its peers'.
            first_error = first_error or time.time()
            if time.time() - first_error > ERROR_GRACE_S or not workers.running:
                raise monitor.failed()
            continue
        if not workers.running:
            if workers.error is not None:
                # Spark's word may come before the failing process's own report: wait for it a moment.
                first_error = first_error or time.time()
                if time.time() - first_error <= ERROR_GRACE_S:
                    continue
                message, retryable = _spark_error(workers.error)
                raise AttemptFailed(message, retryable=retryable)
            if any(json.loads(row["result"]).get("status") == "stopped" for row in workers.result or ()):
                raise JobStopped("stopped on request")  # ended by a stop, never a success
            return
        if jobs.ps is not None and not jobs.ps.running:
            message, retryable = _spark_error(jobs.ps.error) if jobs.ps.error else ("the parameter-server job ended", True)
            raise AttemptFailed(f"parameter server lost: {message}", retryable=retryable)
        if set(expected) <= monitor.started:
            stall = monitor.stalled(stall_timeout)
            if stall is not None:
                raise stall
            continue
        if monitor.tasks_started_at is None:
            etl.poll()  # the ETL's stages still run, or the job waits for task slots
            continue
        if jobs.start_ps is not None and jobs.ps is None:
            jobs.ps = jobs.start_ps()
        if time.monotonic() - monitor.tasks_started_at > start_timeout:
            raise _not_started(monitor, expected, start_timeout)


class _EtlWatch:
    """Before the TF stage's tasks start: the ETL's stages (and the repartition that splits
    the data among the workers) run in the workers' job group, each shuffle of an adaptive
    query as a Spark job of its own. Their tasks are shown as progress; as long as any of
    them runs, the ETL is making its way, however long it takes. A job none of whose tasks
    has run for `start_timeout` seconds is starved of task slots: that fails the attempt."""

    def __init__(self, jobs: AttemptJobs, start_timeout: float, observers: JobObserver) -> None:
        self.jobs, self.start_timeout, self.observers = jobs, start_timeout, observers
        self.idle_since = time.monotonic()
        self.shown: tuple[int, int] | None = None

    def poll(self) -> None:
        activity = self.jobs.backend.activity(self.jobs.workers.group)
        now = time.monotonic()
        if activity is not None:
            if (activity.done, activity.total) != self.shown:
                self.shown = (activity.done, activity.total)
                self.observers.on_event({"kind": "spark", "done": activity.done, "total": activity.total,
                                         "running": activity.running})
            if activity.running:
                self.idle_since = now
        if now - self.idle_since > self.start_timeout:
            raise AttemptFailed(
                f"No Spark task of the job ran for {self.start_timeout:.0f}s, and its TF tasks never started: the "
                "cluster had no free task slots for it (other jobs hold them, or executors were lost; the TF stage "
                "needs all its tasks at once). Free slots, lower --workers, or raise --start-timeout; the Spark UI "
                "shows what holds them.", retryable=False)


def _not_started(monitor: RunMonitor, expected: list[tuple[str, int]], start_timeout: float) -> "AttemptFailed":
    """The failure when the TF stage began but not every TF process started in time,
    saying whether their Spark tasks never ran (no slots) or ran but could not start TF."""
    absent = [(r, i) for r, i in expected if (r, i) not in monitor.started]
    no_task = [f"{r}/{i}" for r, i in absent if (r, i) not in monitor.tasks]
    no_tf = [f"{r}/{i}" for r, i in absent if (r, i) in monitor.tasks]
    why = []
    if no_task:
        why.append(f"the Spark tasks of {', '.join(no_task)} never started (no free task slots?)")
    if no_tf:
        why.append(f"{', '.join(no_tf)} ran as Spark tasks but their TF processes did not start: the tasks were "
                   "still computing their first rows (work in the TF stage itself, such as a slow UDF with no shuffle "
                   "before it), or the executors' Python environment is slow or broken (their task logs in the "
                   "Spark UI say which)")
    return AttemptFailed(
        f"Only {len(monitor.started)} of {len(expected)} TF tasks started within {start_timeout:.0f}s of the TF "
        f"stage starting: {'; '.join(why)}. Check the Spark UI, or raise --start-timeout.", retryable=False)
