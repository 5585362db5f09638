"""Driver side: run one job attempt as a barrier Spark job and watch it to the end.

The kernel only plans, watches and records: the data flows executor -> TF child.
Every wait is bounded: workers must all start within `start_timeout` once their
stage runs, and a KeyboardInterrupt cancels the Spark job group, which kills the
tasks and with them their TF processes.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pyspark import InheritableThread
from pyspark.sql import DataFrame

from ..errors import JobFailed, TfosError
from ..feed.columns import prepare
from ..job import JobSpec, JobStore
from ..monitor import DriverChannel
from ..runtime.user_code import check_train_source
from .feeder import RESULT_DDL, make_task
from .slots import check_slots

POLL_S = 0.2
ERROR_GRACE_S = 2.0
_SECONDARY = re.compile(r"Collective ops is aborted|UnavailableError|CancelledError|unhealthy")


@dataclass
class RunMonitor:
    """Collects a run's events from the channel: to metrics.jsonl, and for the watchdog."""

    store: JobStore
    job: str
    run: int
    started: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    last_event: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sink(self, event: dict[str, Any]) -> None:
        event["run"] = self.run
        with self._lock:
            self.last_event = time.time()
            kind = event.get("kind")
            if kind == "started":
                self.started.add(int(event.get("worker", -1)))
            elif kind == "error":
                self.errors.append(f"worker {event.get('worker')}: {event.get('message')}")
            self.store.append_events(self.job, [event])

    def root_error(self) -> str | None:
        """The first error that is a cause, not a peer's complaint that a collective broke."""
        causes = [e for e in self.errors if not _SECONDARY.search(e)]
        return (causes or self.errors or [None])[0]


def _spark_error_message(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"WorkerFailed: (.*?)(?:\n\s+at |\n\tat |\nTraceback|\Z)", text, re.S)
    if m:
        return m.group(1).strip()
    if "No module named 'tfos_magic'" in text or "No module named 'tensorflow'" in text:
        return ("The Spark executors' Python cannot import tfos_magic/TensorFlow. Point "
                "spark.pyspark.python (or PYSPARK_PYTHON) at a Python that has tfos-magic installed.")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"Spark job failed: {first[:2000]}"


def check_checkpoint_dir(path: str) -> None:
    """Local paths are checked here; URIs (hdfs://, s3://, ...) are checked by the chief worker."""
    if "://" in path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tfos-write-test-"):
            pass
    except OSError as exc:
        raise TfosError(
            f"The checkpoint dir {path!r} is not writable ({exc.strerror or exc}). Pass a writable "
            "--checkpoint-dir (any path tf.io.gfile handles), or leave it out to use the job's directory."
        ) from None


def one_partition_per_worker(frame: DataFrame, workers: int) -> DataFrame:
    """Round-robin repartition (even partitions), skipped when the frame already has one per
    worker: the shuffle would cost more than the streaming itself (docs/performance.md)."""
    if frame.rdd.getNumPartitions() == workers:
        return frame
    return frame.repartition(workers)


def _hosts(sc) -> tuple[str, str | None]:
    """(address executors use to reach the driver, host TF workers bind to or None for auto)."""
    override = os.environ.get("TFOS_DRIVER_HOST")
    if sc.master.startswith("local"):
        return override or "127.0.0.1", "127.0.0.1"
    return override or sc.getConf().get("spark.driver.host", "127.0.0.1"), None


def launch(spark, spec: JobSpec, df: DataFrame, store: JobStore,
           validation: DataFrame | None = None) -> dict[str, Any]:
    """Run the job to its end; return the final state dict, or raise JobFailed/KeyboardInterrupt."""
    opts = spec.options
    name = spec.name
    sc = spark.sparkContext
    entry = check_train_source(spec.train_source or "", name)
    if opts.strategy != "allreduce":
        raise TfosError(f"--strategy {opts.strategy!r} is not supported yet; use --strategy allreduce.")
    check_slots(sc, opts.workers, f"--workers {opts.workers}")
    frame, feed = prepare(df, label=opts.label, features=opts.features, inputs=opts.inputs,
                          fillna=opts.fillna, require_label=entry == "build_model", validation=validation)
    checkpoint_dir = opts.checkpoint_dir or store.default_checkpoint_dir(name)
    check_checkpoint_dir(checkpoint_dir)
    if opts.restart:
        store.forget_metrics(name)

    run = int((store.read_state(name) or {}).get("run", 0)) + 1
    monitor = RunMonitor(store, name, run)
    channel = DriverChannel.get()
    token = channel.register(name, monitor.sink)
    driver_host, worker_host = _hosts(sc)
    plan = {
        "job": name, "run": run, "token": token, "channel_address": f"{driver_host}:{channel.port}",
        "host": worker_host, "train_source": spec.train_source, "feed": feed.to_dict(),
        "options": opts.to_dict(), "checkpoint_dir": checkpoint_dir,
    }
    group = f"tfos-{name}-run{run}"
    # The driver's pid and host let another process tell a live run from one whose kernel died.
    store.write_state(name, state="running", run=run, started=time.time(), ended=None, error=None,
                      checkpoint_dir=checkpoint_dir, workers=opts.workers, job_group=group,
                      driver_pid=os.getpid(), driver_host=socket.gethostname())
    outcome: dict[str, Any] = {}

    def submit() -> None:
        sc.setJobGroup(group, f"tfos-magic job {name} (run {run})", interruptOnCancel=True)
        try:
            stream = one_partition_per_worker(frame, opts.workers).mapInArrow(make_task(plan), RESULT_DDL, barrier=True)
            outcome["rows"] = stream.collect()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    thread = InheritableThread(target=submit, name=f"tfos-{name}", daemon=True)
    try:
        thread.start()
        _watch(sc, thread, group, monitor, opts.workers, opts.start_timeout)
    except KeyboardInterrupt:
        sc.cancelJobGroup(group)
        thread.join(timeout=60)
        store.write_state(name, state="stopped", ended=time.time(), error="interrupted by the user")
        raise
    except TfosError as exc:
        sc.cancelJobGroup(group)
        thread.join(timeout=60)
        if not isinstance(exc, JobFailed):
            store.write_state(name, state="failed", ended=time.time(), error=str(exc))
            raise
        outcome["error"] = exc
    finally:
        channel.unregister(name)

    if "error" in outcome:
        message = monitor.root_error() or _spark_error_message(outcome["error"])
        store.write_state(name, state="failed", ended=time.time(), error=message)
        raise JobFailed(f"Job {name!r} failed: {message}") from None
    return store.write_state(name, state="succeeded", ended=time.time(), error=None)


def _watch(sc, thread: threading.Thread, group: str, monitor: RunMonitor, workers: int, start_timeout: float) -> None:
    """Wait for the Spark job; fail if its barrier stage runs but TF workers do not all start."""
    running_since: float | None = None
    first_error: float | None = None
    tracker = sc.statusTracker()
    while thread.is_alive():
        thread.join(POLL_S)
        if monitor.errors:
            # A worker failed: end the job now rather than let Spark retry the stage. Wait a
            # moment first, so the failing worker's own report can arrive after its peers'.
            first_error = first_error or time.time()
            if time.time() - first_error > ERROR_GRACE_S:
                raise JobFailed("a TF worker failed")
            continue
        if len(monitor.started) >= workers:
            continue
        if running_since is None:
            for job_id in tracker.getJobIdsForGroup(group):
                info = tracker.getJobInfo(job_id)
                # The barrier stage is the job's last; earlier stages are the user's ETL.
                stage = tracker.getStageInfo(max(info.stageIds)) if info and info.stageIds else None
                if stage and stage.numActiveTasks > 0:
                    running_since = time.time()
        elif time.time() - running_since > start_timeout:
            missing = sorted(set(range(workers)) - monitor.started)
            raise TfosError(
                f"Only {len(monitor.started)} of {workers} TF workers started within {start_timeout:.0f}s "
                f"(missing: {', '.join(map(str, missing))}). The cluster may lack free task slots or the "
                "executors cannot start Python processes; check the Spark UI, or raise --start-timeout."
            )
