"""Executor side of an all-reduce job: one barrier task = one TF worker.

The task peeks at its first Arrow batch (array lengths, emptiness), agrees the TF
cluster with its peers through `BarrierTaskContext.allGather`, starts a fresh TF
child process and streams its partition into the child's stdin as Arrow IPC. The
child dies with the task: PR_SET_PDEATHSIG kills it if the Spark worker is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator

import pyarrow as pa

RESULT_SCHEMA = pa.schema([("worker", pa.int64()), ("result", pa.string())])
RESULT_DDL = "worker long, result string"
LOG_TAIL = 30


class WorkerFailed(RuntimeError):
    """Raised in the Spark task so that Spark ends the whole barrier stage."""

    def __init__(self, message: str, reported: bool = False, retryable: bool = False) -> None:
        super().__init__(message)
        self.reported = reported  # already sent to the driver as an error event
        self.retryable = retryable


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _peek(batches: Iterator[pa.RecordBatch]) -> tuple[pa.RecordBatch | None, Iterator[pa.RecordBatch]]:
    for batch in batches:
        if batch.num_rows:
            return batch, batches
    return None, batches


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-LOG_TAIL:])
    except OSError:
        return ""


def _agree_cluster(task: Any, host: str, first: pa.RecordBatch | None,
                   feed: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """Each task's TF address and array column lengths, shared with all; empty and ragged data fail here."""
    from ..feed.arrow_feed import array_lengths
    from ..feed.columns import FeedSpec

    spec = FeedSpec.from_dict(feed)
    mine = {"addr": f"{host}:{_free_port(host)}", "rows": first is not None, "lengths": {}, "error": None}
    try:
        if first is not None:
            mine["lengths"] = array_lengths(first, spec)
    except ValueError as exc:
        mine["error"] = str(exc)
    peers = [json.loads(m) for m in task.allGather(json.dumps(mine))]
    errors = [p["error"] for p in peers if p["error"]]
    if errors:
        raise WorkerFailed(errors[0])
    if not any(p["rows"] for p in peers):
        raise WorkerFailed("The job's DataFrame is empty: no worker received any rows. Check the %%spark_etl cell.")
    lengths: dict[str, int] = {}
    for p in peers:
        for name, n in p["lengths"].items():
            if lengths.setdefault(name, n) != n:
                raise WorkerFailed(f"Array column {name!r} has length {n} on one worker and {lengths[name]} "
                                   "on another; only fixed-length arrays can be fed.")
    return [p["addr"] for p in peers], lengths


def run_worker(plan: dict[str, Any], batches: Iterator[pa.RecordBatch]) -> pa.RecordBatch:
    from pyspark import BarrierTaskContext

    task = BarrierTaskContext.get()
    index = task.partitionId()
    first, rest = _peek(batches)
    host = _host(plan, task, index)
    addrs, lengths = _agree_cluster(task, host, first, plan["feed"])
    env = {}
    if plan["options"]["strategy"] == "allreduce":
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addrs}, "task": {"type": "worker", "index": index}})
    cfg = dict(plan, role="worker", index=index, num_workers=len(addrs), bind_host=host,
               feed=dict(plan["feed"], array_lengths=lengths))
    return _run_child(cfg, env, first, rest)


def run_ps(plan: dict[str, Any], index: int) -> pa.RecordBatch:
    """A parameter-server task: its TF process serves variables until the driver ends the job."""
    host = plan["host"] or os.environ.get("SPARK_LOCAL_IP") or socket.gethostbyname(socket.gethostname())
    cfg = dict(plan, role="ps", index=index, num_workers=plan["options"]["workers"], bind_host=host)
    return _run_child(cfg, {}, None, iter(()))


def _host(plan: dict[str, Any], task: Any, index: int) -> str:
    """Bind TF where this executor is reachable: its own address unless the plan fixes one."""
    return plan["host"] or task.getTaskInfos()[index].address.rsplit(":", 1)[0]


def _run_child(cfg: dict[str, Any], env: dict[str, str], first: pa.RecordBatch | None,
               rest: Iterator[pa.RecordBatch]) -> pa.RecordBatch:
    """Start the TF process for this task, feed it, wait for it and return its result row."""
    role, index = cfg["role"], cfg["index"]
    workdir = tempfile.mkdtemp(prefix=f"tfos-{cfg['job']}-{role}{index}-")
    try:
        cfg = dict(cfg, spill_dir=workdir, result_path=os.path.join(workdir, "result.json"))
        cfg_path = os.path.join(workdir, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", **env)
        log_path = os.path.join(workdir, "tf.log")
        with open(log_path, "wb") as log:
            child = subprocess.Popen([sys.executable, "-m", "tfos_magic.runtime.child", cfg_path],
                                     stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, preexec_fn=_die_with_parent)
        try:
            _stream(child, first, rest)
            code = child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        return _result(role, index, code, cfg["result_path"], log_path)
    finally:
        if not os.environ.get("TFOS_KEEP_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)


def _stream(child: subprocess.Popen, first: pa.RecordBatch | None, rest: Iterator[pa.RecordBatch]) -> None:
    """Write the partition as an Arrow IPC stream; a child that stops reading ends it early."""
    assert child.stdin is not None
    try:
        if first is not None:
            with pa.ipc.new_stream(child.stdin, first.schema) as writer:
                writer.write_batch(first)
                for batch in rest:
                    writer.write_batch(batch)
        child.stdin.close()
    except (BrokenPipeError, ConnectionResetError, OSError):
        pass  # the child exited early; its result file says why


def _result(role: str, index: int, code: int, result_path: str, log_path: str) -> pa.RecordBatch:
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        result = {"status": "error", "unreported": True,
                  "error": f"TF {role} {index} exited with code {code} before reporting a result. "
                           f"Last lines of its log:\n{_tail(log_path)}"}
    if result["status"] != "ok":
        # A process that died without a word (killed, crashed) may succeed on a restart.
        raise WorkerFailed(f"TF {role} {index} failed: {result['error']}", reported=not result.get("unreported"),
                           retryable=bool(result.get("unreported")))
    return pa.RecordBatch.from_pydict({"worker": [index], "result": [json.dumps(result)]}, schema=RESULT_SCHEMA)


def make_task(plan: dict[str, Any]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for `mapInArrow(..., barrier=True)`; `plan` is plain JSON data."""

    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with _reporting(plan, "worker", lambda: _partition(barrier=True)):
            yield run_worker(plan, batches)

    return task


def make_ps_task(plan: dict[str, Any]) -> Callable[[int, Iterator[Any]], Iterator[str]]:
    """The function for `rdd.mapPartitionsWithIndex`: one PS task per partition."""

    def task(index: int, _rows: Iterator[Any]) -> Iterator[str]:
        with _reporting(plan, "ps", lambda: index):
            yield run_ps(plan, index).column("result")[0].as_py()

    return task


def _partition(barrier: bool) -> int:
    from pyspark import BarrierTaskContext, TaskContext

    return (BarrierTaskContext if barrier else TaskContext).get().partitionId()


@contextlib.contextmanager
def _reporting(plan: dict[str, Any], role: str, index: Callable[[], int]):
    """Tell the driver about a failure at once, so it can act (cancel, restart) instead of Spark retrying."""
    try:
        yield
    except WorkerFailed as exc:
        if not exc.reported:
            _report_error(plan, role, index(), str(exc), exc.retryable)
        raise


def _report_error(plan: dict[str, Any], role: str, index: int, message: str, retryable: bool) -> None:
    from ..monitor import ChannelClient, make_event

    channel = ChannelClient(plan["channel_address"], plan["job"], plan["token"], timeout=5)
    channel.send(make_event("error", index, role=role, message=message, retryable=retryable))
    channel.close()
