"""The job API: register, train, resume, stop and status, without a cell.

The magics are thin callers of these functions; so are the `tfos` command line and
the server extension. Runs in the process that drives the jobs (the notebook's kernel).
What a kernel holds in memory (the DataFrames, its background runs) is here; what
outlives it is in the job store.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .driver.observers import JobObserver, Observers
from .errors import TfosError
from .job import JobSpec, JobStore, RunOrigin
from .job.spec import redact_conf
from .job.store import check_name
from .protocol.cells import check_train_source, run_cell
from .protocol.options import TrainOptions, options_from

log = logging.getLogger(__name__)
STOP_WAIT_S = 15.0
# Spark's own runtime settings: not what a user chose, and wrong for a new session.
_RUNTIME_CONF = ("spark.app.id", "spark.app.startTime", "spark.app.submitTime", "spark.app.initial.",
                 "spark.driver.host", "spark.driver.port", "spark.executor.id", "spark.driver.extraJavaOptions",
                 "spark.executor.extraJavaOptions", "spark.repl.", "spark.submit.", "spark.sql.warehouse.dir",
                 "spark.ui.proxyBase", "spark.driver.appUIAddress", "spark.rdd.scope")
# Builds the views of a run (the dashboard, text): (spec, spark, has_validation, background).
ViewFactory = Callable[[JobSpec, Any, bool, bool], JobObserver]


@dataclass
class _Run:
    thread: threading.Thread
    observers: Observers


_FRAMES: dict[str, Any] = {}  # job name -> its DataFrame, for this process's life
_RUNS: dict[str, _Run] = {}  # job name -> its background run in this process


def _store(store: JobStore | None) -> JobStore:
    return store or JobStore()


# --- registering a job's data -------------------------------------------------------
def register(name: str, frame: Any, etl_source: str | None = None, df_var: str | None = None,
             store: JobStore | None = None) -> JobSpec:
    """Keep `frame` as the job's DataFrame in this process, and its ETL source in the store
    (to rebuild the DataFrame after a kernel restart)."""
    from pyspark.sql import DataFrame

    name, store = check_name(name), _store(store)
    if not isinstance(frame, DataFrame):
        got = "nothing" if frame is None else f"a {type(frame).__name__}"
        raise TfosError(
            f"The %%spark_etl cell of job {name!r} must produce a Spark DataFrame, but it produced "
            f"{got}. End the cell with the DataFrame as its last line, or pass --df VARIABLE.")
    spec = store.load_spec(name) if store.exists(name) else JobSpec(name)
    if etl_source is not None:
        spec.etl_source, spec.etl_df_var = etl_source, df_var
    store.save_spec(spec)
    _FRAMES[name] = frame
    return spec


def run_etl(name: str, source: str, namespace: dict[str, Any], df_var: str | None = None,
            store: JobStore | None = None) -> Any:
    """Run an ETL cell's source in `namespace` (where `spark` is bound) and register its DataFrame."""
    from .session import get_spark

    name = check_name(name)
    get_spark(namespace)
    value = run_cell(source, name, namespace, kind="spark_etl")
    if df_var:
        if df_var not in namespace:
            raise TfosError(f"--df {df_var}: the cell defined no variable {df_var!r}.")
        value = namespace[df_var]
    register(name, value, source, df_var, store)
    return value


def frame(name: str, namespace: dict[str, Any] | None = None, rerun_etl: bool = False,
          store: JobStore | None = None) -> Any:
    """The job's DataFrame: held by this process, else rebuilt from the stored ETL source
    when `rerun_etl` (in `namespace`, which then also gets the cell's other variables)."""
    name, store = check_name(name), _store(store)
    if name in _FRAMES:
        return _FRAMES[name]
    spec = store.load_spec(name) if store.exists(name) else None
    if spec is None or not spec.etl_source:
        raise TfosError(f"Job {name!r} has no DataFrame in this kernel and no stored ETL cell. Run a "
                        f"`%%spark_etl {name}` cell first (it registers the DataFrame the job trains on).")
    if not rerun_etl:
        raise TfosError(f"Job {name!r} has no DataFrame in this kernel (it was registered by another kernel, "
                        f"or before a restart). Run its `%%spark_etl {name}` cell again, add --rerun-etl to "
                        f"re-run the stored ETL cell, or use %tfos_resume {name}.")
    if namespace is None:
        namespace = {}
    _session_for(spec, namespace)
    return run_etl(name, spec.etl_source, namespace, spec.etl_df_var, store)


def _session_for(spec: JobSpec, namespace: dict[str, Any]) -> Any:
    """The active session, or one made like the session the job last ran on."""
    from .session import get_spark

    settings = spec.spark or {}
    return get_spark(namespace, master=settings.get("master"), conf=settings.get("conf"), remote=settings.get("remote"))


def spark_settings(spark: Any) -> dict[str, Any]:
    """The master and the conf keys a user set, for a session made again after a restart.
    Secrets (keys matching spark.redaction.regex) are stored redacted: a session made
    again takes them from the usual places (spark-defaults.conf, the environment)."""
    from .driver.spark_backend import backend_for

    backend = backend_for(spark)
    conf = {k: v for k, v in backend.settings().items() if not k.startswith(_RUNTIME_CONF)}
    conf.pop("spark.master", None)
    conf = redact_conf(conf, backend.conf("spark.redaction.regex"))
    settings = {"master": backend.master, "conf": dict(sorted(conf.items()))}
    if backend.remote:
        settings["remote"] = backend.remote
    return settings


# --- running ------------------------------------------------------------------------
def train(name: str, train_source: str, options: TrainOptions, *, namespace: dict[str, Any] | None = None,
          views: ViewFactory | None = None, background: bool = False, rerun_etl: bool = False,
          store: JobStore | None = None, origin: RunOrigin | None = None) -> dict[str, Any] | None:
    """Store the train source and options, and run the job: to its end (returns the final
    state; raises JobFailed or KeyboardInterrupt), or in a background thread (returns None).
    `origin` names the notebook and cell that started it, for the sidebar."""
    name, store = check_name(name), _store(store)
    _refuse_background_duplicate(name)
    check_train_source(train_source, name)
    options.check()
    df = frame(name, namespace, rerun_etl, store)
    spec = store.load_spec(name)
    spec.train_source, spec.options = train_source, options
    return _run(spec, df, namespace or {}, views, background, store, origin)


def resume(name: str, *, namespace: dict[str, Any] | None = None, views: ViewFactory | None = None,
           background: bool = False, store: JobStore | None = None,
           overrides: argparse.Namespace | dict[str, Any] | None = None,
           restart: bool = False, origin: RunOrigin | None = None) -> dict[str, Any] | None:
    """Continue a stored job from its latest checkpoint with its stored cells and options
    (`overrides`, e.g. {"epochs": 10}, replace stored ones): the DataFrame is rebuilt from
    the stored ETL source unless this process holds it. With `restart`, the stored cells
    run again from step 0 instead (earlier checkpoints and metrics are dropped): a batch
    re-run of a job that needs no notebook."""
    name, store = check_name(name), _store(store)
    spec = store.load_spec(name)
    if not spec.train_source:
        raise TfosError(f"Job {name!r} has never been trained: there is nothing to resume. Run its "
                        f"`%%tf_train {name}` cell.")
    _refuse_background_duplicate(name)
    given = dict(vars(overrides) if isinstance(overrides, argparse.Namespace) else overrides or {})
    given["restart"] = restart  # only an explicit restart throws the checkpoints away
    if spec.options.zk_auth and spec.options.zk_auth.endswith(":***") and not given.get("zk_auth"):
        secret = os.environ.get("TFOS_ZK_AUTH")  # the store keeps no password
        if not secret:
            raise TfosError(f"Job {name!r} used ZooKeeper digest auth, whose password is not stored: set "
                            "TFOS_ZK_AUTH=user:password, or pass --zk-auth.")
        given["zk_auth"] = secret
    spec.options = options_from(given, base=spec.options)
    namespace = {} if namespace is None else namespace
    df = frame(name, namespace, rerun_etl=True, store=store)
    return _run(spec, df, namespace, views, background, store, origin)


def _run(spec: JobSpec, df: Any, namespace: dict[str, Any], views: ViewFactory | None, background: bool,
         store: JobStore, origin: RunOrigin | None) -> dict[str, Any] | None:
    from .driver.launcher import launch, refuse_if_running, release, reserve

    # Checked before anything of the job is written: a refused run leaves the stored cells
    # and options as they were, for the sidebar and the next resume.
    refuse_if_running(store, spec.name)
    spark = _session_for(spec, namespace)
    spec.spark = spark_settings(spark)
    validation = _validation_frame(spec.options.validation_df, namespace)
    store.save_spec(spec)
    observers = Observers([views(spec, spark, validation is not None, background)] if views else [])
    if not spec.options.restart:
        _show_history(observers, store, spec.name)
    if not background:
        return launch(spark, spec, df, store, validation, observers=observers, origin=origin)
    # Claimed before the thread starts: a stop while the run is still being planned reaches it.
    reserved = reserve(store, spec.name)
    try:
        for view in observers.observers:  # shown by the caller's cell, before the thread starts
            show = getattr(view, "show", None)
            if callable(show):
                show()

        def body() -> None:
            try:
                launch(spark, spec, df, store, validation, observers=observers, origin=origin, reserved=reserved)
            except BaseException:  # noqa: BLE001 - already recorded in state.json and shown by the views
                log.info("tfos: background job %s ended with an error", spec.name, exc_info=True)
            finally:
                _RUNS.pop(spec.name, None)

        thread = threading.Thread(target=body, name=f"tfos-{spec.name}", daemon=True)
        _RUNS[spec.name] = _Run(thread, observers)
        thread.start()
    except BaseException:
        _RUNS.pop(spec.name, None)
        release(spec.name)
        raise
    return None


def _show_history(observers: Observers, store: JobStore, name: str) -> None:
    """A run that continues a job starts its views with the earlier runs' curve and
    checkpoints, so the chart reads as one job, not as a fresh start."""
    earlier = [e for e in store.events(name) if e.get("kind") in ("step", "epoch", "checkpoint")]
    for view in observers.observers:
        model = getattr(view, "model", None)
        for event in earlier if model is not None else ():
            model.feed(event)


def _refuse_background_duplicate(name: str) -> None:
    run = _RUNS.get(name)
    if run is not None and run.thread.is_alive():
        raise TfosError(f"Job {name!r} is already running in this kernel, in the background. Stop it with "
                        f"%tfos_stop {name}, or give the new run another job name.")


def _validation_frame(var: str | None, namespace: dict[str, Any]) -> Any:
    if var is None:
        return None
    from pyspark.sql import DataFrame

    value = namespace.get(var, _FRAMES.get(var))
    if not isinstance(value, DataFrame):
        raise TfosError(f"--validation-df {var}: no Spark DataFrame named {var!r} in the notebook "
                        "(or registered job of that name).")
    return value


def live_observers(name: str) -> Observers | None:
    """The views of `name`'s background run in this process, to add another to."""
    run = _RUNS.get(name)
    return run.observers if run is not None else None


# --- stopping and reading --------------------------------------------------------------
def stop(name: str, store: JobStore | None = None, wait: float = STOP_WAIT_S) -> str:
    """Stop a running job; returns its state after at most `wait` seconds ("stopped", or
    "running" while the kernel that runs it elsewhere honours the request)."""
    from .driver.launcher import request_stop

    name, store = check_name(name), _store(store)
    state = store.read_state(name) or {}
    here = request_stop(store, name)
    if not here and state.get("state") != "running":
        store.clear_stop_request(name)
        raise TfosError(f"Job {name!r} is not running (state: {state.get('state', 'registered')}).")
    run = _RUNS.get(name)
    if here and run is not None:
        run.thread.join(wait)
    return (store.read_state(name) or {}).get("state", "registered")


def status(name: str, store: JobStore | None = None) -> dict[str, Any]:
    """The job's state as any reader sees it (a run whose kernel died reads `interrupted`)."""
    name, store = check_name(name), _store(store)
    store.load_spec(name)  # a clear error for an unknown job
    return dict(store.read_state(name) or {"state": "registered"}, job=name)
