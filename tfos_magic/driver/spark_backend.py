"""Runs in the notebook's kernel: what the driver asks of Spark, behind one small interface.

The launcher and the supervisor never reach for the SparkContext, its status tracker
or a DataFrame's JVM plan themselves: they ask a `SparkBackend`. `ClassicSpark`
answers for a classic session (py4j to the driver's JVM); `ConnectSpark`
(driver/connect_backend.py) for a Spark Connect session, which has no RDDs and no
SparkContext; `backend_for` picks one from the session. The unit tests use a scripted
fake (tests/spark_fake.py), so the supervisor's decisions are tested in milliseconds
beside the real end-to-end runs.

This is also the one place that tells Spark lines apart (3.5 and 4.x, docs/deploy.md):
it asks the API for what it offers rather than comparing versions.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from pyspark import InheritableThread
from pyspark.sql import DataFrame

from ..errors import TfosError

log = logging.getLogger(__name__)

# A DataFrame stage with a resource profile of its own (`mapInArrow(..., profile=)`):
# Spark 4.0 and later. Before, the workers' GPUs come from the session's task-level
# resources, which every task of the session holds.
STAGE_PROFILES = "profile" in inspect.signature(DataFrame.mapInArrow).parameters
TASK_GPUS = "spark.task.resource.gpu.amount"

# How long a cancelled job may take to end before the caller goes on without it.
CANCEL_WAIT_S = 60.0


@dataclass(frozen=True)
class GroupActivity:
    """The tasks of a job group's stages: done and in all (the progress shown while the
    ETL runs), and running now (whether anything of the job runs at all: a job the
    cluster starves of task slots runs nothing)."""

    done: int
    total: int
    running: int


@dataclass(frozen=True)
class DriverAddresses:
    """Where the kernel's channel listens (`bind`), the address executors use to reach
    it (`advertise`), and where TF tasks bind (`tasks`; None: each executor's own)."""

    advertise: str
    bind: str
    tasks: str | None


@dataclass(frozen=True)
class GpuRequest:
    """How each worker task gets its GPUs: `profile` for the workers' stage, or None when
    they come from the session's task-level resources; `note` says which, for the start line."""

    profile: Any
    note: str | None = None


def schema_text(df: Any) -> str:
    """`df`'s schema as `printSchema` shows it, as text (StructType.treeString is 4.0+)."""
    schema = df.schema
    if hasattr(schema, "treeString"):
        return str(schema.treeString())
    return str(df._jdf.schema().treeString())


class SparkBackend(ABC):
    """The Spark calls of the driver side: run and cancel job groups, watch their
    stages, decide how a frame is split among the workers, count task slots, ship files
    to the executors and read the session's settings."""

    master: str
    # What the session cannot offer the job, said once on its start line (Connect: the UI
    # link, the slot count); empty for a classic session.
    lacks: tuple[str, ...] = ()
    # The Spark Connect server a session made again after a restart connects to (sc://host:port).
    remote: str | None = None

    @property
    def local(self) -> bool:
        """A local master: every executor is this host, and nothing crosses a network."""
        return self.master.startswith("local")

    @abstractmethod
    def run_in_group(self, group: str, description: str, action: Callable[[], Any]) -> Any:
        """Run `action` (a Spark action) on this thread, its jobs in job group `group`."""

    @abstractmethod
    def activity(self, group: str) -> GroupActivity | None:
        """The group's stages' tasks, or None before the group has any job."""

    @abstractmethod
    def cancel(self, group: str) -> None:
        """Cancel the group's jobs, and the jobs it would submit later (an adaptive query
        submits each shuffle stage as a job of its own, after the previous one)."""

    @abstractmethod
    def feed_frame(self, df: Any, workers: int) -> Any:
        """`df` split into `workers` partitions for a barrier stage, without running any
        of it: a Spark action here would run the user's ETL on the kernel's thread,
        outside the job, with no progress shown and no way to stop it."""

    @abstractmethod
    def partitions_text(self, df: Any) -> str:
        """How `df` is split, as the %%spark_etl cell says it, read without running
        anything: "N partitions" when the plan fixes it, else why it cannot tell."""

    @abstractmethod
    def task_slots(self, profile: Any = None) -> int | None:
        """Tasks the cluster can run at once under `profile` (None: the default one);
        None when the session cannot tell."""

    @abstractmethod
    def session_age(self) -> float:
        """Seconds since the session started: executors of a young one may still be registering."""

    @abstractmethod
    def addresses(self) -> DriverAddresses:
        """Where the kernel's channel listens and how executors reach it."""

    @abstractmethod
    def barrier_tasks(self, count: int, fn: Callable[[], str]) -> Callable[[], list[str]]:
        """The action that runs `fn` once in each of `count` tasks of one barrier stage
        (all at once, each on a task slot of its own) and returns what they returned."""

    @abstractmethod
    def gpu_request(self, gpus: int) -> GpuRequest:
        """How each worker task gets `gpus` GPUs on this cluster; refuses, naming the
        setting to change, when the session cannot give them."""

    def map_in_arrow(self, df: Any, fn: Callable[..., Any], schema: str, profile: Any = None) -> Any:
        """`df.mapInArrow(fn, schema)` as one barrier stage, under `profile` if given (4.0+):
        the same call on a classic and a Connect session."""
        if profile is None:
            return df.mapInArrow(fn, schema, barrier=True)
        return df.mapInArrow(fn, schema, barrier=True, profile=profile)

    @abstractmethod
    def conf(self, key: str, default: str | None = None) -> str | None:
        """One of the session's settings (a Spark conf key), else `default`."""

    @abstractmethod
    def settings(self) -> dict[str, str]:
        """Every setting of the session that can be read, to make it again after a restart."""

    @abstractmethod
    def ship_py_file(self, path: str) -> None:
        """Put a local .zip or .py on the executors' Python path for this session's tasks."""

    @abstractmethod
    def ship_archive(self, uri: str, alias: str) -> None:
        """Have each executor unpack the archive at `uri` as `alias` in the folder of the
        session's files (`SparkFiles.get(alias)` in a task)."""

    @abstractmethod
    def ui_url(self) -> str | None:
        """The Spark UI's address, where the session has one."""

    @property
    def session_key(self) -> int:
        """Identifies the session: what was shipped to one need not be shipped again."""
        return id(self)

    def thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        """A daemon thread for a Spark action: on a classic session it inherits the
        caller's local properties (pyspark's InheritableThread)."""
        return InheritableThread(target=target, name=name, daemon=True)


class SparkJob:
    """One Spark action in its own job group and thread, so it can be watched and cancelled."""

    def __init__(self, backend: SparkBackend, group: str, description: str, action: Callable[[], Any]) -> None:
        self.backend, self.group, self.error, self.result = backend, group, None, None
        # Its own flag, not Thread.is_alive(): a KeyboardInterrupt that lands in
        # Thread.join() can leave is_alive() False for a thread that still runs (CPython
        # before 3.13), and the interrupt must not look like the end of the job.
        self._done = threading.Event()

        def body() -> None:
            try:
                self.result = backend.run_in_group(group, description, action)
            except BaseException as exc:  # noqa: BLE001 - handed to the watching thread
                self.error = exc
            finally:
                self._done.set()

        self.thread = backend.thread(body, group)
        self.thread.start()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for the action to end; whether it has."""
        return self._done.wait(timeout)

    def cancel(self, wait: float = CANCEL_WAIT_S) -> None:
        """Cancel the group, again every second while the action still runs (a job
        submitted meanwhile), for up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while self.running:
            self.backend.cancel(self.group)
            if self.wait(min(1.0, max(0.0, deadline - time.monotonic()))) or time.monotonic() >= deadline:
                return


class ClassicSpark(SparkBackend):
    """A classic SparkSession: the driver's JVM through py4j."""

    def __init__(self, spark: Any) -> None:
        self.spark = spark
        self.sc = spark.sparkContext
        self.master = self.sc.master

    def run_in_group(self, group: str, description: str, action: Callable[[], Any]) -> Any:
        self.sc.setJobGroup(group, description, interruptOnCancel=True)
        return action()

    def activity(self, group: str) -> GroupActivity | None:
        tracker = self.sc.statusTracker()
        stages: set[int] = set()
        for job_id in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job_id)
            stages.update(info.stageIds if info else [])
        done = total = running = 0
        # A stage can belong to several jobs (an adaptive query's final job lists the
        # shuffle stages it reuses): each is counted once.
        for stage_id in stages:
            stage = tracker.getStageInfo(stage_id)
            if stage is not None:
                done, total = done + stage.numCompletedTasks, total + stage.numTasks
                running += stage.numActiveTasks
        return GroupActivity(done, total, running) if stages else None

    def cancel(self, group: str) -> None:
        jsc = self.sc._jsc.sc()
        try:
            jsc.cancelJobGroupAndFutureJobs(group)  # Spark 4
        except Exception:  # noqa: BLE001 - older Sparks: SparkJob.cancel repeats the plain cancel
            self.sc.cancelJobGroup(group)

    def feed_frame(self, df: Any, workers: int) -> Any:
        """Round-robin `repartition(workers)` (even partitions), skipped when the frame
        already has one partition per worker in a stage Spark can run as a barrier
        stage: the shuffle would then cost more than the streaming itself
        (docs/performance.md). Only a plan that runs nothing when turned into an RDD is
        looked at that closely; any other (an adaptive plan, a shuffle, a subquery, a
        cache not yet filled) is repartitioned as it is."""
        if _runs_when_planned(df._jdf.queryExecution().executedPlan()):
            return df.repartition(workers)
        rdd = df._jdf.rdd()
        if rdd.getNumPartitions() == workers and _uniform_stage(rdd):
            return df
        return df.repartition(workers)

    def partitions_text(self, df: Any) -> str:
        if _runs_when_planned(df._jdf.queryExecution().executedPlan()):
            return "its shuffles decide the partitions when it runs"
        return f"{int(df._jdf.rdd().getNumPartitions())} partitions"

    def task_slots(self, profile: Any = None) -> int:
        jsc = self.sc._jsc.sc()
        try:
            manager = jsc.resourceProfileManager()
            if profile is None:
                java_profile = manager.defaultResourceProfile()
            else:
                java_profile = profile._java_resource_profile
                manager.addResourceProfile(java_profile)  # known to the scheduler before it counts for it
            return int(jsc.maxNumConcurrentTasks(java_profile))
        except Exception:  # noqa: BLE001 - a private API; fall back to the public estimate
            log.debug("tfos: maxNumConcurrentTasks failed", exc_info=True)
            return int(self.sc.defaultParallelism)

    def session_age(self) -> float:
        return max(0.0, time.time() - self.sc.startTime / 1000.0)

    def addresses(self) -> DriverAddresses:
        override = os.environ.get("TFOS_DRIVER_HOST")
        if self.local:
            return DriverAddresses(override or "127.0.0.1", "127.0.0.1", "127.0.0.1")
        conf = self.sc.getConf()
        host = conf.get("spark.driver.host", None) or "127.0.0.1"
        return DriverAddresses(override or host, conf.get("spark.driver.bindAddress", None) or host, None)

    def barrier_tasks(self, count: int, fn: Callable[[], str]) -> Callable[[], list[str]]:
        rdd = self.sc.parallelize(range(count), count).barrier().mapPartitions(lambda _rows: [fn()])
        return rdd.collect

    def gpu_request(self, gpus: int) -> GpuRequest:
        if STAGE_PROFILES:
            return GpuRequest(stage_gpus(gpus))
        raw = self.sc.getConf().get(TASK_GPUS, None)
        try:
            have = float(raw) if raw is not None else 0.0
        except ValueError:
            have = 0.0
        if have < gpus:
            raise TfosError(
                f"--gpus-per-worker {gpus}: Spark {self.sc.version} cannot give the workers' stage GPUs of its own "
                f"(stage-level scheduling of a DataFrame needs Spark 4.0), so they come from the session's task-level "
                f"resources, and this session gives each task {raw or 'no'} GPU(s) ({TASK_GPUS}). Create the "
                f"session with --conf {TASK_GPUS}={gpus} (with spark.executor.resource.gpu.amount and a discovery "
                "script, docs/deploy.md), or pass a smaller --gpus-per-worker.")
        return GpuRequest(None, f"GPUs from the session's task-level resources: {have:g} a task ({TASK_GPUS}; "
                                f"Spark {self.sc.version} has no stage-level scheduling for a DataFrame)")

    def conf(self, key: str, default: str | None = None) -> str | None:
        return self.sc.getConf().get(key, default)

    def settings(self) -> dict[str, str]:
        return dict(self.sc.getConf().getAll())

    def ship_py_file(self, path: str) -> None:
        self.sc.addPyFile(path)

    def ship_archive(self, uri: str, alias: str) -> None:
        self.sc.addArchive(f"{uri}#{alias}")

    def ui_url(self) -> str | None:
        return self.sc.uiWebUrl

    @property
    def session_key(self) -> int:
        return id(self.sc)


def stage_gpus(gpus: int) -> Any:
    """A resource profile of 1 CPU and `gpus` GPUs a task, for the workers' stage."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    return ResourceProfileBuilder().require(TaskResourceRequests().cpus(1).resource("gpu", gpus)).build


# Physical operators that run Spark jobs when their plan is turned into an RDD (a
# broadcast collects its side), besides shuffles (an adaptive plan runs them then).
_RUNS_WHEN_PLANNED = ("BroadcastExchangeExec", "SubqueryBroadcastExec")


def _runs_when_planned(plan: Any) -> bool:
    """Whether turning `plan` (a JVM SparkPlan) into an RDD might run Spark jobs, or
    whether its partitioning is decided by a shuffle: then only a repartition is safe."""
    todo = [plan]
    while todo:
        node = todo.pop()
        name = node.getClass().getSimpleName()
        if name == "AdaptiveSparkPlanExec":  # a leaf: what it runs is its current physical plan
            todo.append(node.executedPlan())
            continue
        if name in _RUNS_WHEN_PLANNED or name.endswith("ExchangeExec") or node.subqueries().size() > 0:
            return True
        if name == "InMemoryTableScanExec" and not _cache_filled(node):
            return True
        children = node.children()
        todo.extend(children.apply(i) for i in range(children.size()))
    return False


def _cache_filled(scan: Any) -> bool:
    """Whether a cached frame's blocks exist already; filling them runs its plan."""
    try:
        return bool(scan.relation().cacheBuilder().isCachedColumnBuffersLoaded())
    except Exception:  # noqa: BLE001 - a private API: assume the worst
        return False


def _uniform_stage(rdd: Any) -> bool:
    """Whether every RDD in `rdd`'s stage (its narrow dependencies, back to a shuffle or a
    source) has as many partitions as `rdd`: the rule of Spark's barrier stages."""
    size, todo = rdd.getNumPartitions(), [rdd]
    while todo:
        current = todo.pop()
        if current.getNumPartitions() != size:
            return False
        deps = current.dependencies().iterator()
        while deps.hasNext():
            dep = deps.next()
            if not dep.getClass().getName().endswith("ShuffleDependency"):
                todo.append(dep.rdd())
    return True


def is_connect(spark: Any) -> bool:
    """Whether `spark` is a Spark Connect session (an sc:// remote, or spark.api.mode=connect)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def held_session(value: Any) -> Any | None:
    """`value` (the notebook's `spark`) when only the notebook can lead to it: a Spark
    Connect session, which no SparkContext of this process knows; else None."""
    return value if value is not None and is_connect(value) else None


def backend_for(spark: Any) -> SparkBackend:
    """The backend of the notebook's session: Connect or classic."""
    if is_connect(spark):
        from .connect_backend import ConnectSpark

        return ConnectSpark(spark)
    return ClassicSpark(spark)
