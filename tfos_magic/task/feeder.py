"""Runs in a Spark task on an executor: one task = one TF process (a worker or a PS).

A task first tells the notebook it runs (a `task` event: the TF stage has begun, and
its start-up is timed from here). A worker task then starts a fresh TF child process
(which imports TensorFlow meanwhile), peeks at its first Arrow batch (array lengths,
emptiness), agrees the TF cluster with its peers through `BarrierTaskContext.allGather`,
hands the child its config and streams its partition into the child's stdin as Arrow
IPC. Every task binds TF to the address Spark reaches its executor at (a barrier
task's `getTaskInfos()`), never to what the host's own name resolves to (127.0.1.1 on
Debian). The child dies with the task: PR_SET_PDEATHSIG kills it if the Spark worker
is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
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

from ..protocol.channel import REACH_HINT, ChannelClient
from ..protocol.events import make_event
from ..protocol.feed_spec import FeedError, FeedSpec, array_lengths
from ..protocol.logs import log_tail
from ..protocol.net import TF_REUSE_PORT_ENV, ReservedPort
from ..protocol.paths import local_path, unshared_checkpoint_dir
from ..protocol.plan import FRAMEWORK_ENV, EnvPlan, TaskConfig, TaskPlan
from ..protocol.versions import mismatch, probe_source
from . import spares

RESULT_SCHEMA = pa.schema([("worker", pa.int64()), ("result", pa.string())])
RESULT_DDL = "worker long, result string"
CHILD_MODULE = spares.CHILD_MODULE
PROBE_TIMEOUT = 60.0
# Pythons this Spark worker has checked against a kernel's versions (Spark reuses its
# Python workers, so a job's later tasks and attempts skip the probe).
_CHECKED: set[tuple[str, str]] = set()


class WorkerFailed(RuntimeError):
    """Raised in the Spark task so that Spark ends the whole barrier stage: an error a
    restart cannot cure (the cell, the data, the environment). The notebook reads the
    class's name in Spark's error text when the task's own report did not reach it."""

    retryable = False

    def __init__(self, message: str, reported: bool = False, details: str | None = None) -> None:
        super().__init__(message)
        self.reported = reported  # already sent to the driver as an error event
        self.details = details  # the log's tail, kept in the job's errors/ dir


class WorkerCrashed(WorkerFailed):
    """A TF process that died without a word (a crash, the OOM killer): a restart may cure it."""

    retryable = True


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@contextlib.contextmanager
def _deaf_to_interrupts() -> Iterator[None]:
    """In local mode the Spark workers share the notebook kernel's process group, and
    Jupyter interrupts a kernel by sending SIGINT to the whole group: that would kill this
    task and its TF process before they could checkpoint. The notebook stops the job
    itself (over the channel, then by cancelling it), so the task and its child, which
    inherits the ignored signal, let SIGINT pass."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: no signal is delivered here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _peek(batches: Iterator[pa.RecordBatch]) -> tuple[pa.RecordBatch | None, Iterator[pa.RecordBatch]]:
    for batch in batches:
        if batch.num_rows:
            return batch, batches
    return None, batches


def exit_description(code: int) -> str:
    """'crashed with SIGSEGV' for a process killed by a signal, else 'exited with code N'."""
    if code < 0:
        try:
            return f"crashed with {signal.Signals(-code).name} (signal {-code})"
        except ValueError:
            return f"crashed with signal {-code}"
    return f"exited with code {code}"


def _agree_cluster(task: Any, address: str, first: pa.RecordBatch | None,
                   spec: FeedSpec) -> tuple[list[str], dict[str, int]]:
    """Each task's TF address and array column lengths, shared with all; empty and ragged data fail here."""
    mine = {"addr": address, "rows": first is not None, "lengths": {}, "error": None}
    try:
        if first is not None:
            mine["lengths"] = array_lengths(first, spec)
    except FeedError as exc:
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
                                   "on another: pass --pad {name}=N to pad every row to N values, or --ragged {name} "
                                   "for a tf.RaggedTensor.")
    return [p["addr"] for p in peers], lengths


def run_worker(plan: TaskPlan, batches: Iterator[pa.RecordBatch]) -> pa.RecordBatch:
    from pyspark import BarrierTaskContext

    task = BarrierTaskContext.get()
    index = task.partitionId()
    host = _host(plan, task, index)
    _announce(plan, "worker", index, task.stageId(), host)
    _check_checkpoint_dir(plan, host)
    # Started first: TensorFlow's import (seconds) overlaps the first batch and the agreement.
    # The port is held until the TF process ends: its server binds it only after the import.
    with TFProcess(plan, "worker", index, host, gpu_env(task.resources())) as child, ReservedPort() as port:
        first, rest = _peek(batches)
        addrs, lengths = _agree_cluster(task, f"{host}:{port.port}", first, plan.feed)
        env = {}
        if plan.options.framework == "torch":
            env = torch_env(addrs, index)
        elif plan.strategy == "allreduce":
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addrs}, "task": {"type": "worker", "index": index}})
        return child.run(plan.with_array_lengths(lengths), len(addrs), env, first, rest)


def torch_env(addresses: list[str], index: int) -> dict[str, str]:
    """torch.distributed's environment for worker `index`: rank 0's agreed address is the
    rendezvous (its process listens on the port its task reserved: training/torch_runner.py),
    and LOCAL_RANK counts the tasks before it on the same host."""
    hosts = [a.rsplit(":", 1)[0] for a in addresses]
    master, port = addresses[0].rsplit(":", 1)
    return {"MASTER_ADDR": master, "MASTER_PORT": port, "RANK": str(index), "WORLD_SIZE": str(len(addresses)),
            "LOCAL_RANK": str(hosts[:index].count(hosts[index])),
            "LOCAL_WORLD_SIZE": str(hosts.count(hosts[index]))}


def run_ps(plan: TaskPlan) -> pa.RecordBatch:
    """A parameter-server task (one of a barrier stage of its own): its TF process serves
    variables until the driver ends the job."""
    from pyspark import BarrierTaskContext

    task = BarrierTaskContext.get()
    index = task.partitionId()
    host = _host(plan, task, index)
    _announce(plan, "ps", index, task.stageId(), host)
    with TFProcess(plan, "ps", index, host, gpu_env(task.resources())) as child:
        return child.run(plan, plan.options.workers, {}, None, iter(()))


def _announce(plan: TaskPlan, role: str, index: int, stage: int, host: str) -> None:
    """Tell the notebook this task of the TF stage runs: the start-up clock starts, and a
    notebook the executors cannot reach fails the task now, naming the address."""
    channel = ChannelClient(plan.channel_address, plan.job, plan.token, timeout=10,
                            connect_within=plan.options.start_timeout)
    if not channel.connected:
        raise WorkerFailed(f"{role} {index} on {host}: {channel.error}. {REACH_HINT}")
    channel.send(make_event("task", index, role=role, stage=stage, host=host, hostname=socket.gethostname(),
                            framework=plan.options.framework))
    channel.close()


def _check_checkpoint_dir(plan: TaskPlan, host: str) -> None:
    """On a cluster, a worker whose executor does not see the kernel's marker in the
    checkpoint dir would checkpoint where no other host can read: refused, with no retry.
    A URI (hdfs://, s3a://, ...) is looked at by the TF process, which has tf.io.gfile."""
    marker = plan.checkpoint_marker and local_path(plan.checkpoint_marker)
    if marker and not os.path.exists(marker):
        raise WorkerFailed(unshared_checkpoint_dir(plan.checkpoint_dir, f"the executor on {host} "
                                                   f"({socket.gethostname()})"))


def gpu_env(resources: dict[str, Any]) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for the TF process: exactly the GPUs Spark assigned to this task
    (--gpus-per-worker, or the cluster's spark.task.resource.gpu.amount), so that tasks
    sharing a host do not train on one another's GPUs, and the sampler watches those.
    Without an assignment (local mode, no GPU scheduling) the environment is left alone."""
    gpu = resources.get("gpu")
    addresses = list(getattr(gpu, "addresses", None) or [])
    return {"CUDA_VISIBLE_DEVICES": ",".join(addresses)} if addresses else {}


def _host(plan: TaskPlan, task: Any, index: int) -> str:
    """Bind TF where this executor is reachable: the address Spark itself reaches it at
    (the other executors reach it there too), unless the plan fixes one (local mode)."""
    return plan.host or task.getTaskInfos()[index].address.rsplit(":", 1)[0]


def _env_root(env: EnvPlan) -> str:
    """Where the job's environment is on this executor: an archive where Spark unpacked
    it; a relative directory in the SparkFiles folder (an archive the session ships
    itself), else in the task's working directory; an absolute one as it is."""
    if env.kind == "path" and os.path.isabs(env.where):
        return env.where
    from pyspark import SparkFiles

    shipped = SparkFiles.get(env.where)
    return shipped if env.kind == "archive" or os.path.exists(shipped) else os.path.abspath(env.where)


def tf_python(env: EnvPlan) -> str:
    """The Python this task's TF process runs: the executor's own, or that of the job's
    environment (an archive Spark unpacked here, or a directory on every node), once it
    has been checked to hold the kernel's Python, TensorFlow and tfos-magic versions.
    A wrong or incomplete environment fails the task before any TF process starts."""
    if env.kind == "executor":
        python, where = sys.executable, "The Spark executors' Python"
    else:
        python, where = os.path.join(_env_root(env), "bin", "python"), f"The --env environment {env.given!r}"
        if not os.path.exists(python):
            raise WorkerFailed(f"{where} has no bin/python on this executor (looked for {python}). Pass an "
                               "archive made by `tfos pack-env` (or venv-pack/conda-pack), or the prefix of an "
                               "environment that exists on every node.")
    key = (python, json.dumps(env.kernel, sort_keys=True))
    if key in _CHECKED:
        return python
    try:
        probe = subprocess.run([python, "-c", probe_source()], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT, check=True)
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise WorkerFailed(f"{where} ({python}) did not report its versions within {PROBE_TIMEOUT:.0f} s.") from None
    except (subprocess.CalledProcessError, ValueError, IndexError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise WorkerFailed(f"{where} ({python}) could not be run: {detail.strip()[-500:]}") from None
    problem = mismatch(env.kernel, found, where)
    if problem:
        raise WorkerFailed(problem)
    _CHECKED.add(key)
    return python


def tf_env() -> dict[str, str]:
    """Every TF process's environment before its task's own (secrets, GPUs, TF_CONFIG)."""
    return dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", **TF_REUSE_PORT_ENV)


class TFProcess:
    """This task's TF process, started before its config exists so that it imports
    TensorFlow while the task still peeks at its first batch and agrees the cluster; it
    then waits for the config (TaskConfig.wait). Leaving the `with` block kills it if it
    still runs (a failed agreement, an empty DataFrame, an interrupt) and removes its
    working directory."""

    def __init__(self, plan: TaskPlan, role: str, index: int, host: str, env: dict[str, str]) -> None:
        python = tf_python(plan.env)  # first: a refused environment leaves no work dir behind
        self.plan, self.python = plan, python
        self.workdir = tempfile.mkdtemp(prefix=f"tfos-{plan.job}-{role}{index}-")
        self.config = TaskConfig(plan, role, index, plan.options.workers, host, self.workdir)
        task_env = {**self.config.secret_env(), **env}
        self.gpus = "CUDA_VISIBLE_DEVICES" in env
        self.framework = plan.options.framework
        spare = spares.take(plan, python, gpus=self.gpus) if self.framework == "tensorflow" else None
        # TensorFlow already imported: the spare gets what a fresh process would.
        self.warm = spare is not None and spares.hand_over(
            spare, self.config.config_path, plan.options.start_timeout, self.config.log_path, task_env)
        if self.warm:
            self.process = spare
            return
        with open(self.config.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [python, "-m", CHILD_MODULE, self.config.config_path, str(plan.options.start_timeout)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                env=dict(tf_env(), **task_env, **{FRAMEWORK_ENV: self.framework}),
                preexec_fn=_die_with_parent)

    def __enter__(self) -> "TFProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not os.environ.get("TFOS_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        # Succeeded: a warm start for the next task here (not for GPU tasks: see spares.py).
        # Spares hold TensorFlow: a PyTorch task leaves none.
        if exc[0] is None and self.process.returncode == 0 and not self.gpus and self.framework == "tensorflow":
            spares.start(self.plan, self.python, tf_env(), _die_with_parent)

    def run(self, plan: TaskPlan, num_workers: int, env: dict[str, str], first: pa.RecordBatch | None,
            rest: Iterator[pa.RecordBatch]) -> pa.RecordBatch:
        """Hand the process its config, feed it the partition, wait for it; its result row."""
        self.config = dataclasses.replace(self.config, plan=plan, num_workers=num_workers, env=env)
        self.config.write()
        _stream(self.process, first, rest)
        return _result(self.config, self.process.wait())


def _stream(child: subprocess.Popen, first: pa.RecordBatch | None, rest: Iterator[pa.RecordBatch]) -> None:
    """Write the partition as an Arrow IPC stream; a child that stops reading ends it early.

    Only a complete partition ends with the stream's end marker. An error while reading
    the partition (an Arrow IO error from Spark's side is an OSError too) propagates
    before the marker is written: the TF process then sees a truncated stream, never a
    short partition that looks whole."""
    assert child.stdin is not None
    if first is not None:
        try:
            writer = pa.ipc.new_stream(child.stdin, first.schema)
        except OSError:
            return  # the child exited early; its result file says why
        for batch in itertools.chain([first], rest):  # errors reading the partition propagate
            try:
                writer.write_batch(batch)
            except OSError:
                return  # the child stopped reading (exited); no end marker
        try:
            writer.close()  # the end marker: the whole partition was written
        except OSError:
            return
    try:
        child.stdin.close()
    except OSError:
        pass


def _result(config: TaskConfig, code: int) -> pa.RecordBatch:
    role, index = config.role, config.index
    try:
        with open(config.result_path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        # A process that died without a word (a crash, the OOM killer) may succeed on a restart.
        raise WorkerCrashed(f"{_name(config)} {role} {index} {exit_description(code)} before reporting a result",
                            details=f"Last lines of its log:\n{log_tail(config.log_path)}") from None
    # "stopped": the notebook asked for it (and is cancelling the job). The task ends
    # normally: failing it would print Spark's task-failure stack trace into the cell.
    if result["status"] not in ("ok", "stopped"):
        raise WorkerFailed(f"{_name(config)} {role} {index} failed: {result['error']}",
                           reported=bool(result.get("sent", True)))
    return pa.RecordBatch.from_pydict({"worker": [index], "result": [json.dumps(result)]}, schema=RESULT_SCHEMA)


def _name(config: TaskConfig) -> str:
    """'TF' or 'PyTorch', for messages about this task's process."""
    return getattr(config.plan, "process_name", "TF")


def make_task(plan: TaskPlan) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for `mapInArrow(..., barrier=True)`."""

    def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        with _deaf_to_interrupts(), _reporting(plan, "worker", _partition):
            yield run_worker(plan, batches)

    return task


def make_ps_task(plan: TaskPlan) -> Callable[[], str]:
    """The function each task of the PS barrier stage runs (SparkBackend.barrier_tasks)."""

    def task() -> str:
        with _deaf_to_interrupts(), _reporting(plan, "ps", _partition):
            return run_ps(plan).column("result")[0].as_py()

    return task


def _partition() -> int:
    from pyspark import BarrierTaskContext

    return BarrierTaskContext.get().partitionId()


@contextlib.contextmanager
def _reporting(plan: TaskPlan, role: str, index: Callable[[], int]):
    """Tell the driver about a failure at once, so it can act (cancel, restart) instead of Spark retrying."""
    try:
        yield
    except WorkerFailed as exc:
        if not exc.reported:
            _report_error(plan, role, index(), exc)
        raise


def _report_error(plan: TaskPlan, role: str, index: int, exc: WorkerFailed) -> None:
    channel = ChannelClient(plan.channel_address, plan.job, plan.token, timeout=5, connect_within=10)
    channel.send(make_event("error", index, role=role, message=str(exc), retryable=exc.retryable,
                            details=exc.details))
    channel.close()
