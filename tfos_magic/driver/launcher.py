"""Runs in the notebook's kernel (the Spark driver): check a job, plan it, and run its attempts until it succeeds.

The kernel only plans, watches and records: the data flows from Spark executors to
TF processes on the same executors. A KeyboardInterrupt cancels the Spark job
groups, which kills the tasks and with them their TF processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pyspark.sql import DataFrame

from ..errors import JobFailed, TfosError
from ..job import JobSpec, JobStore, RunOrigin, TrainOptions
from ..protocol.cells import build_model_takes_sample, check_train_source, defines, fit_hooks
from ..protocol.feed_spec import STRING, FeedSpec
from ..protocol.plan import RegistryPlan, TaskPlan
from ..task.feeder import RESULT_DDL, make_ps_task, make_task
from .channel import DriverChannel
from .checkpoint_dir import VisibilityMarker, check_visible, check_writable, checkpoint_dir_for
from .columns import prepare
from .sample import collect_sample
from . import mlflow_tracking
from .observers import JobObserver, Observers
from .registry import EmbeddedRegistry, ZooKeeperView
from .executor_env import plan_env, ship_package
from .slots import check_dynamic_allocation, check_slots
from .spark_backend import SparkBackend, SparkJob, backend_for
from .supervisor import AttemptFailed, AttemptJobs, JobStopped, RunMonitor, StopControl, is_secondary, run_attempt

log = logging.getLogger(__name__)


def one_partition_per_worker(frame: DataFrame, workers: int) -> DataFrame:
    """The frame split into one partition per worker, planned without running it."""
    return backend_for(frame.sparkSession).feed_frame(frame, workers)


# Jobs this kernel is running now, each with its stop flag (a background run, or a
# foreground one stopped through a stop request from another process).
_ACTIVE: dict[str, threading.Event] = {}


def running_here(name: str) -> bool:
    return name in _ACTIVE


def request_stop(store: JobStore, name: str) -> bool:
    """Ask the run of `name` to stop: at once if this kernel runs it, else through the stop
    request file that the running kernel polls. Returns whether it is running here."""
    store.request_stop(name)
    event = _ACTIVE.get(name)
    if event is not None:
        event.set()
    return event is not None


def refuse_if_running(store: JobStore, name: str) -> None:
    """A second run of a running job would fight the first over its checkpoints. A run
    whose kernel died reads `interrupted` (job/store.py) and may be resumed."""
    state = store.read_state(name) or {}
    pid, host = state.get("driver_pid"), state.get("driver_host")
    elsewhere = state.get("state") == "running" and pid != os.getpid()
    if name in _ACTIVE or elsewhere:
        who = "this kernel" if name in _ACTIVE else f"process {pid} on {host}"
        raise TfosError(f"Job {name!r} is already running in {who} (run {state.get('run')}, attempt "
                        f"{state.get('attempt')}). Wait for it to end, or stop it first with %tfos_stop {name}; "
                        "to train something else at the same time, give it another job name.")


def _check_strategy(opts: TrainOptions, hooks: list[str] = ()) -> int:
    """Tasks the job needs at once. `hooks`: the cell's functions for Keras' fit."""
    if opts.framework == "torch":
        keras_only = [f"{h}()" for h in hooks] + [flag for flag, value in (
            ("--sample-weight", opts.sample_weight), ("--class-weight", opts.class_weight)) if value]
        if keras_only:
            raise TfosError(f"{' and '.join(keras_only)} are for Keras' fit, which a %%torch_train job does not run. "
                            "Weigh the loss in train(ctx), with a loop of your own over ctx.dataloader().")
    if opts.strategy == "allreduce":
        return opts.workers
    if opts.strategy != "ps":
        raise TfosError(f"--strategy must be allreduce or ps, not {opts.strategy!r}.")
    if opts.ps < 1:
        raise TfosError("--strategy ps needs at least one parameter server: pass --ps 1 (or more).")
    fit_only = [f"{h}()" for h in hooks] + [flag for flag, value in (
        ("--sample-weight", opts.sample_weight), ("--class-weight", opts.class_weight)) if value]
    if fit_only:
        raise TfosError(f"{' and '.join(fit_only)} cannot be used with --strategy ps: its workers train in a TF1 "
                        "graph loop of their own, not in Keras' fit, so Keras callbacks and weights cannot take "
                        "part. Use --strategy allreduce (the default) for them.")
    return opts.workers + opts.ps


def _check_torch_feed(feed: FeedSpec) -> None:
    """PyTorch takes tensors of numbers: text and ragged columns are TensorFlow's (tf.string, tf.RaggedTensor)."""
    for c in feed.features:
        if c.dtype == STRING:
            raise TfosError(f"The column {c.name!r} is text or binary, which a %%torch_train job cannot take as a "
                            "tensor: turn it into numbers in the %%spark_etl cell (token ids as an array column, "
                            "decoded pixels), or train it with %%tf_train, whose models take tf.string inputs.")
        if c.ragged:
            raise TfosError(f"--ragged {c.name}: PyTorch has no ragged tensors to feed. Pass --pad {c.name}=N "
                            "instead, which pads each row with zeros to N values.")


def _registry(opts: TrainOptions, job: str) -> tuple[Any, RegistryPlan]:
    """The driver's view of the registry and what the tasks need to reach it."""
    hosts = opts.zookeeper
    if opts.strategy == "ps" and hosts:
        view = ZooKeeperView(hosts, job, opts.zk_auth)  # fails within its timeout if unreachable
        view.clear()  # nodes a dead kernel left behind
        return view, RegistryPlan("zookeeper", hosts, opts.zk_auth)
    # It takes only the plan's roles and indexes, for the current attempt (begin_attempt).
    return EmbeddedRegistry(workers=opts.workers, ps=opts.ps if opts.strategy == "ps" else 0), RegistryPlan("embedded")


def _worker_profile(backend: SparkBackend, gpus: int, observers: JobObserver):
    """GPUs for the workers: a resource profile of their stage where Spark has one for a
    DataFrame's stage, else the session's task-level GPUs (the start line says which)."""
    if gpus <= 0:
        return None
    if backend.local:
        log.warning("tfos: --gpus-per-worker %d ignored: local mode has no stage-level scheduling", gpus)
        observers.on_log(f"tfos: note: --gpus-per-worker {gpus} is ignored in local mode (no stage-level scheduling).")
        return None
    request = backend.gpu_request(gpus)
    if request.note:
        observers.on_log(f"tfos: note: {request.note}.")
    return request.profile


def reserve(store: JobStore, name: str) -> threading.Event:
    """Claim `name` for a run of this kernel, before it is planned: from then on a stop
    (%tfos_stop, a stop request from another process) reaches it, even while it is still
    being planned (a background run's cell has returned by then). Returns its stop flag,
    for `launch(..., reserved=)`."""
    refuse_if_running(store, name)
    store.clear_stop_request(name)  # a stale one, from before this run
    event = _ACTIVE[name] = threading.Event()
    return event


def release(name: str) -> None:
    """Give up a claim `reserve` made for a run that never started."""
    _ACTIVE.pop(name, None)


def launch(spark, spec: JobSpec, df: DataFrame, store: JobStore, validation: DataFrame | None = None,
           observers: JobObserver | None = None, origin: RunOrigin | None = None,
           reserved: threading.Event | None = None) -> dict[str, Any]:
    """Run the job to its end; return the final state dict, or raise JobFailed/KeyboardInterrupt.

    Progress goes to `observers` (text, dashboard, CLI), always on this thread. `origin`
    (the notebook and cell that started the run) goes into state.json for the sidebar.
    Nothing here runs the user's ETL: that happens inside the job, in its job group.
    However it ends, state.json holds a final state with the reason, and the observers
    get `on_end`. `reserved` is the stop flag of a run `reserve` claimed.
    """
    name = spec.name
    observers = observers or JobObserver()
    if reserved is None:
        reserved = reserve(store, name)
    try:
        planned = _plan(spark, spec, df, store, validation, observers)
    except BaseException as exc:
        # Refused before it ran (too few slots, a checkpoint dir the executors do not see,
        # an error from Spark while planning): it reads `failed` with the reason too.
        _ACTIVE.pop(name, None)
        interrupted = isinstance(exc, KeyboardInterrupt)
        observers.on_end(store.write_state(
            name, state="stopped" if interrupted else "failed", ended=time.time(), error_file=None,
            error="interrupted by the user" if interrupted else _error_text(exc)))
        raise
    try:
        return _run(planned, store, observers, origin or RunOrigin(), reserved)
    finally:
        planned.close()


def _error_text(exc: BaseException) -> str:
    """The message a user reads for an error: a TfosError's own text; for anything else
    (a Py4J error, an OSError of the store) its type and first lines."""
    if isinstance(exc, TfosError):
        return str(exc)
    text = str(exc).strip()
    lines = text.splitlines()
    first = " ".join(lines[:3])[:1000] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass
class _Planned:
    """A job checked and planned, ready to run its attempts."""

    backend: SparkBackend
    frame: DataFrame
    plan: TaskPlan
    profile: Any
    registry: Any
    channel: DriverChannel
    groups: str
    marker: VisibilityMarker | None
    mlflow: bool = False  # log the run to MLflow (driver/mlflow_tracking.py)

    def close(self) -> None:
        if self.marker is not None:
            self.marker.remove()


def _plan(spark, spec: JobSpec, df: DataFrame, store: JobStore, validation: DataFrame | None,
          observers: JobObserver) -> _Planned:
    """Check the job against the cluster and plan it; nothing of it runs yet."""
    opts, name = spec.options, spec.name
    backend = backend_for(spark)
    entry = check_train_source(spec.train_source or "", name)
    _check_strategy(opts, fit_hooks(spec.train_source or "", name) if entry == "build_model" else [])
    check_dynamic_allocation(backend)
    for missing in backend.lacks:
        observers.on_log(f"tfos: note: this session does not offer {missing}.")
    profile = _worker_profile(backend, opts.gpus_per_worker, observers)
    ps = opts.ps if opts.strategy == "ps" else 0
    check_slots(backend, opts.workers, f"--workers {opts.workers}" + (f" plus --ps {ps}" if ps else ""),
                profile, gpus=opts.gpus_per_worker, others=ps)
    frame, feed = prepare(df, label=opts.label, features=opts.features, inputs=opts.inputs,
                          fillna=opts.fillna, require_label=entry == "build_model", validation=validation,
                          weight=opts.sample_weight, ragged=opts.ragged, pad=opts.pad)
    if opts.framework == "torch":
        _check_torch_feed(feed)
        if defines(spec.train_source or "", name, "preprocess"):
            raise TfosError("preprocess() is a tf.data map over a %%tf_train job's rows; a %%torch_train job "
                            "transforms its batches in the module's forward(), or in a train(ctx) loop of its own.")
    sample = ""
    if entry == "build_model" and build_model_takes_sample(spec.train_source or "", name):
        # Seeded by the job's name: a resumed run adapts on the same rows as the run it resumes.
        observers.on_log("tfos: drawing build_model()'s sample of the training rows (a Spark job over the ETL)")
        sample = collect_sample(frame, feed, seed=zlib.crc32(name.encode()))
    frame = backend.feed_frame(frame, opts.workers)
    checkpoint_dir = checkpoint_dir_for(opts.checkpoint_dir, store, name)
    check_writable(checkpoint_dir)
    ship_package(backend)  # the executors' Python needs only pyspark and pyarrow of its own
    env_plan = plan_env(backend, opts.env)
    run = int((store.read_state(name) or {}).get("run", 0)) + 1
    # Job groups are unique in the session: a cancelled group stays cancelled for any job
    # submitted in it later (cancelJobGroupAndFutureJobs), and a job made again from
    # nothing starts at run 1 again.
    groups = f"tfos-{name}-run{run}-{secrets.token_hex(2)}"
    # On a cluster, the executors must see the checkpoint dir: checked here, and by each task as it starts.
    marker = None if backend.local else VisibilityMarker(checkpoint_dir)
    try:
        if marker is not None:
            check_visible(backend, checkpoint_dir, marker, f"{groups}-storage", observers)
        addresses = backend.addresses()
        channel = DriverChannel.get(addresses.bind)
        registry, registry_plan = _registry(opts, name)  # last: a ZooKeeper view holds a connection
    except BaseException:
        if marker is not None:
            marker.remove()
        raise
    plan = TaskPlan(job=name, run=run, channel_address=f"{addresses.advertise}:{channel.port}",
                    host=addresses.tasks, train_source=spec.train_source or "", feed=feed, options=opts,
                    checkpoint_dir=checkpoint_dir, registry=registry_plan,
                    log_dir=store.log_dir(name, checkpoint_dir), failpoint=os.environ.get("TFOS_FAILPOINT") or None,
                    env=env_plan, checkpoint_marker=marker.path if marker else None, sample=sample)
    return _Planned(backend, frame, plan, profile, registry, channel, groups, marker,
                    mlflow=mlflow_tracking.wanted(spec.options.mlflow))


def _run(planned: _Planned, store: JobStore, observers: JobObserver, origin: RunOrigin,
         stop_event: threading.Event) -> dict[str, Any]:
    """Run the planned job's attempts until one succeeds, recording its state."""
    plan, channel, registry = planned.plan, planned.channel, planned.registry
    name, opts, run = plan.job, plan.options, plan.run
    if opts.restart:
        store.forget_metrics(name)
    monitor = RunMonitor(store, name, run)
    requests = registry.handle if isinstance(registry, EmbeddedRegistry) else None
    expected = [("worker", i) for i in range(opts.workers)]
    if opts.strategy == "ps":
        expected += [("ps", i) for i in range(opts.ps)]
    # The driver's pid and host let another process tell a live run from one whose kernel died.
    state = store.write_state(
        name, state="running", run=run, attempt=1, started=time.time(), ended=None, error=None, error_file=None,
        checkpoint_dir=plan.checkpoint_dir, workers=opts.workers, ps=opts.ps if opts.strategy == "ps" else 0,
        epochs=opts.epochs, driver_pid=os.getpid(), driver_host=socket.gethostname(),
        **origin.state_fields(),  # a run from no notebook clears the last one's
        feed=plan.feed.to_dict())  # how features were encoded: Job.predict encodes them the same way
    heartbeat = store.heartbeat(name)  # readers elsewhere tell a live run from a dead kernel's
    last_check = [0.0]

    def stop() -> bool:
        if stop_event.is_set():
            return True
        now = time.monotonic()
        if now - last_check[0] >= 1.0:  # a stat a second for requests from other processes
            last_check[0] = now
            if store.stop_requested(name):
                stop_event.set()
        return stop_event.is_set()

    if planned.mlflow:
        observers = Observers([observers, _tracker(store, name, opts, observers)])
    observers.on_start(dict(state, job=name))
    try:
        with _interrupt_raises_only():
            start_over = opts.restart
            for attempt in range(1, opts.max_restarts + 2):
                if stop():  # asked while the job was being planned, or between attempts
                    raise JobStopped("stopped on request")
                monitor.new_attempt(attempt)
                # A fresh token per attempt: registering it closes the previous attempt's channel,
                # which makes any of its TF processes still alive exit at once.
                registry.begin_attempt(attempt)  # only this attempt's tasks may register from now on
                token = channel.register(name, _acting_sink(channel, name, monitor.sink_for(attempt)), requests)
                group = f"{planned.groups}-a{attempt}"
                store.write_state(name, attempt=attempt, job_group=group)
                observers.on_event({"kind": "attempt", "attempt": attempt, "job_group": group})
                try:
                    _attempt(planned.backend, planned.frame,
                             plan.for_attempt(attempt, token, channel.spare_token(), start_over=start_over),
                             planned.profile, monitor,
                             expected, group, observers,
                             StopControl(stop, lambda: channel.control(name, {"control": "stop"})))
                    break
                except AttemptFailed as exc:
                    channel.retire_spares()  # no TF process outlives a failure
                    start_over = start_over and not monitor.training  # the chief cleared them
                    if not exc.retryable or attempt > opts.max_restarts:
                        store.write_state(name, error_file=exc.details_file)
                        raise JobFailed(f"Job {name!r} failed: {exc}"
                                        + (f" (after {attempt - 1} restart(s))" if attempt > 1 else "")) from None
                    observers.on_attempt_failed(attempt, str(exc))
    except KeyboardInterrupt:
        channel.retire_spares()  # no TF process, spare or not, outlives an interrupt, a stop or a failure
        observers.on_end(store.write_state(name, state="stopped", ended=time.time(), error="interrupted by the user"))
        raise
    except JobStopped:
        channel.retire_spares()
        final = store.write_state(name, state="stopped", ended=time.time(), error="stopped on request")
        observers.on_end(final)
        return final
    except BaseException as exc:  # a TfosError, or anything from Spark or the store: never left `running`
        channel.retire_spares()
        observers.on_end(store.write_state(name, state="failed", ended=time.time(), error=_error_text(exc)))
        raise
    finally:
        heartbeat.close()
        _ACTIVE.pop(name, None)
        store.clear_stop_request(name)
        channel.unregister(name)
        registry.close()
    final = store.write_state(name, state="succeeded", ended=time.time(), error=None)
    observers.on_end(final)
    return final


def _tracker(store: JobStore, name: str, opts: TrainOptions, observers: JobObserver) -> JobObserver:
    """The MLflow observer of this run; where it logs goes to the store and the other observers."""

    def announce(event: dict[str, Any]) -> None:
        store.append_events(name, [event])
        observers.on_event(event)

    return mlflow_tracking.MlflowTracker(name, opts.to_dict(secrets=False), store, announce, restart=opts.restart)


@contextlib.contextmanager
def _interrupt_raises_only() -> Iterator[None]:
    """PySpark's SIGINT handler cancels every Spark job of the session at once, so the
    workers could not checkpoint first. While a job runs on the main thread, an interrupt
    only raises KeyboardInterrupt; the supervisor then stops this job's tasks itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _acting_sink(channel: DriverChannel, name: str, sink: Callable[[dict[str, Any]], None]):
    """The job's event sink, which also acts at once, from the channel's thread: it passes
    the chief's stop step on to every TF process (training/stopping.py), and halts them
    all on a task's own error, so that no worker trains on (in ps mode, alone) into steps
    the restart will throw away while the attempt is being torn down."""

    def forward(event: dict[str, Any]) -> None:
        sink(event)
        if event.get("kind") == "stopping" and event.get("step") is not None:
            channel.control(name, {"control": "stop_at", "step": int(event["step"])})
        elif event.get("kind") == "error" and not is_secondary(str(event.get("message", ""))):
            channel.control(name, {"control": "halt"})

    return forward


def _attempt(backend: SparkBackend, frame: DataFrame, plan: TaskPlan, profile, monitor: RunMonitor,
             expected: list[tuple[str, int]], group: str, observers: JobObserver, stop: StopControl) -> None:
    opts = plan.options
    stream = backend.map_in_arrow(frame, make_task(plan), RESULT_DDL, profile)
    jobs = AttemptJobs(backend, SparkJob(backend, group, f"tfos {plan.job}: {opts.workers} worker(s)", stream.collect))
    if opts.strategy == "ps":
        # A barrier stage too: each PS task then knows the address Spark reaches its executor at.
        jobs.start_ps = lambda: SparkJob(backend, f"{group}-ps", f"tfos {plan.job}: {opts.ps} parameter server(s)",
                                         backend.barrier_tasks(opts.ps, make_ps_task(plan)))
    run_attempt(jobs, monitor, expected, opts.start_timeout, observers, stop, opts.stall_timeout)
