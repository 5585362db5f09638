"""Executor side of an all-reduce job: one barrier task = one TF worker.

The task peeks at its first Arrow batch (array lengths, emptiness), agrees the TF
cluster with its peers through `BarrierTaskContext.allGather`, starts a fresh TF
child process and streams its partition into the child's stdin as Arrow IPC. The
child dies with the task: PR_SET_PDEATHSIG kills it if the Spark worker is killed.
"""

from __future__ import annotations

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

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported  # already sent to the driver as an error event


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


def _agree_cluster(task: Any, host: str, first: pa.RecordBatch | None, feed: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
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
    # Bind TF where this executor is reachable: its own address unless the plan fixes one.
    host = plan["host"] or task.getTaskInfos()[index].address.rsplit(":", 1)[0]
    addrs, lengths = _agree_cluster(task, host, first, plan["feed"])
    workdir = tempfile.mkdtemp(prefix=f"tfos-{plan['job']}-w{index}-")
    try:
        cfg = dict(plan, worker_index=index, num_workers=len(addrs), spill_dir=workdir,
                   result_path=os.path.join(workdir, "result.json"))
        cfg["feed"] = dict(plan["feed"], array_lengths=lengths)
        cfg_path = os.path.join(workdir, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": {"worker": addrs}, "task": {"type": "worker", "index": index}}))
        log_path = os.path.join(workdir, "worker.log")
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
        return _result(index, code, cfg["result_path"], log_path)
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


def _result(index: int, code: int, result_path: str, log_path: str) -> pa.RecordBatch:
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        result = {"status": "error", "unreported": True,
                  "error": f"TF worker {index} exited with code {code} before reporting a result. "
                           f"Last lines of its log:\n{_tail(log_path)}"}
    if result["status"] != "ok":
        raise WorkerFailed(f"TF worker {index} failed: {result['error']}", reported=not result.get("unreported"))
    return pa.RecordBatch.from_pydict({"worker": [index], "result": [json.dumps(result)]}, schema=RESULT_SCHEMA)


def make_task(plan: dict[str, Any]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for `mapInArrow(..., barrier=True)`; `plan` is plain JSON data."""

    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        try:
            yield run_worker(plan, batches)
        except WorkerFailed as exc:
            if not exc.reported:  # tell the driver now, so it cancels the job instead of Spark retrying it
                _report_error(plan, str(exc))
            raise

    return task


def _report_error(plan: dict[str, Any], message: str) -> None:
    from pyspark import BarrierTaskContext

    from ..monitor import ChannelClient, make_event

    channel = ChannelClient(plan["channel_address"], plan["job"], plan["token"], timeout=5)
    channel.send(make_event("error", BarrierTaskContext.get().partitionId(), message=message))
    channel.close()
