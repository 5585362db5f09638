"""Runs in the notebook's kernel: the driver's Spark calls on a Spark Connect session.

A Connect session (`SparkSession.builder.remote("sc://...")`, or `spark.api.mode=connect`,
which makes even a local master one) is a gRPC client of a Spark Connect server: no
SparkContext, no RDDs, no JVM in reach. What the launcher needs maps onto the client's
own API:

- the barrier stages: `DataFrame.mapInArrow(..., barrier=True, profile=)`, the same call
  as on a classic session; a probe over every task slot is a barrier `mapInArrow` over
  `spark.range`;
- job groups: operation tags (`addTag` on the action's thread, `interruptTag`);
- stage progress: `registerProgressHandler`, whose reports arrive on the thread that
  runs the action, so the tag that thread holds says whose stages they are;
- shipping the package and `--env`: `addArtifacts(pyfile=True | archive=True)`, which
  the server keeps per session and puts in each task's SparkFiles folder;
- settings: `spark.conf`.

What Connect does not offer is said on the job's start line (`lacks`) rather than
failing: the Spark UI link, and the task slots of a non-local cluster (Spark then
holds a barrier stage too large for the cluster, and the job's start-up timeout ends
it with that reason). A frame is always repartitioned for the workers: without its
RDD, whether it already has one partition per worker cannot be read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
import time
from typing import Any, Callable

from ..errors import TfosError
from .spark_backend import STAGE_PROFILES, DriverAddresses, GpuRequest, GroupActivity, SparkBackend, stage_gpus

_LOCAL_MASTER = re.compile(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?$")


class _Progress:
    """The stages each tag's operations reported, from the session's progress handler.
    The client calls it on the thread that runs the action, so the tag that thread
    works under (`current.group`) names them."""

    def __init__(self) -> None:
        self.current = threading.local()
        self.lock = threading.Lock()
        self.stages: dict[str, dict[int, tuple[int, int]]] = {}  # group -> stage -> (done, tasks)
        self.running: dict[str, int] = {}

    def __call__(self, stages: Any = None, inflight_tasks: int = 0, operation_id: Any = None,
                 done: bool = False, **_more: Any) -> None:
        # An exception here would fail the user's action: a report is never worth that.
        try:
            group = getattr(self.current, "group", None)
            if group is None:
                return
            with self.lock:
                seen = self.stages.setdefault(group, {})
                for stage in stages or ():
                    seen[int(stage.stage_id)] = (int(stage.num_completed_tasks), int(stage.num_tasks))
                self.running[group] = 0 if done else int(inflight_tasks)
        except Exception:  # noqa: BLE001 - see above
            pass

    def activity(self, group: str) -> GroupActivity | None:
        with self.lock:
            seen = self.stages.get(group)
            if not seen:
                return None
            return GroupActivity(sum(d for d, _ in seen.values()), sum(t for _, t in seen.values()),
                                 self.running.get(group, 0))


# One handler per session (the client keeps them for its life): id(session) -> (session, handler).
_HANDLERS: dict[int, tuple[Any, _Progress]] = {}
_HANDLERS_LOCK = threading.Lock()


def _progress_of(spark: Any) -> _Progress:
    with _HANDLERS_LOCK:
        known = _HANDLERS.get(id(spark))
        if known is not None and known[0] is spark:
            return known[1]
        progress = _Progress()
        spark.registerProgressHandler(progress)
        _HANDLERS[id(spark)] = (spark, progress)
        return progress


def check_connect_client(spark: Any) -> None:
    """Refuse a Connect client that lacks what the jobs use (progress reports are 4.0+)."""
    if not hasattr(spark, "registerProgressHandler") or not STAGE_PROFILES:
        raise TfosError(
            f"This is a Spark Connect session of pyspark {spark.version}, and tfos-magic needs a Spark 4 Connect "
            "client (pyspark>=4.0: progress reports and stage profiles). Upgrade pyspark in the kernel, or create a "
            "classic session (SparkSession.builder.master(...).getOrCreate() without .remote(...)).")


class ConnectSpark(SparkBackend):
    """A Spark Connect session: the gRPC client's own API (see the module's docstring)."""

    def __init__(self, spark: Any) -> None:
        check_connect_client(spark)
        self.spark = spark
        self.server = str(spark.client.host).strip("[]")
        self.master = self.conf("spark.master") or "unknown"
        self.progress = _progress_of(spark)
        # A server this process started (spark.api.mode=connect on a master) is made again
        # the same way; another is reached at its address (without any token in its URL).
        self.started_here = "SPARK_LOCAL_REMOTE" in os.environ
        endpoint = getattr(getattr(spark.client, "_builder", None), "endpoint", None)  # host:port, no token
        self.remote = None if self.started_here or not endpoint else f"sc://{endpoint}"
        lacks = ["a link to the Spark UI (on Spark Connect the UI is the server's)"]
        if self.task_slots() is None:
            lacks.append(f"a count of the cluster's task slots (Spark Connect, master {self.master}): a job larger "
                         "than the cluster waits until its start-up timeout")
        self.lacks = tuple(lacks)

    @property
    def session_key(self) -> int:
        return id(self.spark)

    def thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        # The action's thread takes its tag in run_in_group; nothing else is inherited.
        return threading.Thread(target=target, name=name, daemon=True)

    def run_in_group(self, group: str, description: str, action: Callable[[], Any]) -> Any:
        self.spark.addTag(group)
        self.progress.current.group = group
        try:
            return action()
        finally:
            self.progress.current.group = None
            self.spark.removeTag(group)

    def activity(self, group: str) -> GroupActivity | None:
        return self.progress.activity(group)

    def cancel(self, group: str) -> None:
        # Interrupts the operations running with the tag now; SparkJob.cancel repeats it
        # while its action still runs, for one submitted meanwhile.
        self.spark.interruptTag(group)

    def feed_frame(self, df: Any, workers: int) -> Any:
        return df.repartition(workers)

    def partitions_text(self, df: Any) -> str:
        return "a Spark Connect session shows its partitions only when it runs"

    def task_slots(self, profile: Any = None) -> int | None:
        if profile is not None or not self.local or not _loopback(self.server):
            return None
        match = _LOCAL_MASTER.match(self.master)
        if match is None:
            return None
        threads = match.group(1)
        return (os.cpu_count() or 1) if threads == "*" else int(threads or 1)

    def session_age(self) -> float:
        started = self.conf("spark.app.startTime")
        return max(0.0, time.time() - int(started) / 1000.0) if started and started.isdigit() else 0.0

    def addresses(self) -> DriverAddresses:
        override = os.environ.get("TFOS_DRIVER_HOST")
        if self.local and _loopback(self.server):
            return DriverAddresses(override or "127.0.0.1", "127.0.0.1", "127.0.0.1")
        here = _route_to(self.server)  # this host's address on the way to the server
        return DriverAddresses(override or here, here, "127.0.0.1" if self.local else None)

    def barrier_tasks(self, count: int, fn: Callable[[], str]) -> Callable[[], list[str]]:
        def task(_batches: Any) -> Any:
            import pyarrow as pa

            yield pa.RecordBatch.from_pydict({"r": [fn()]})

        frame = self.spark.range(count, numPartitions=count).mapInArrow(task, "r string", barrier=True)
        return lambda: [row.r for row in frame.collect()]

    def gpu_request(self, gpus: int) -> GpuRequest:
        return GpuRequest(stage_gpus(gpus))

    def conf(self, key: str, default: str | None = None) -> str | None:
        try:
            value = self.spark.conf.get(key, None)
        except Exception:  # noqa: BLE001 - a key the server will not show
            return default
        return default if value is None else str(value)

    def settings(self) -> dict[str, str]:
        # Only what makes the session again: the server's own settings are its business.
        return {"spark.api.mode": "connect"} if self.started_here else {}

    def ship_py_file(self, path: str) -> None:
        self.spark.addArtifacts(path, pyfile=True)

    def ship_archive(self, uri: str, alias: str) -> None:
        if "://" in uri and not uri.startswith("file://"):
            raise TfosError(f"On a Spark Connect session an --env archive travels through the session's artifacts, "
                            f"which take a file of this machine, not {uri}. Copy it here and pass its path, or pass "
                            "the prefix of an environment that exists on every node.")
        self.spark.addArtifacts(f"{uri.removeprefix('file://')}#{alias}", archive=True)

    def ui_url(self) -> str | None:
        return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _route_to(host: str) -> str:
    """This host's address on the route to `host` (a UDP socket's connect sends nothing)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())
