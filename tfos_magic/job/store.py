"""The job store: one directory per job under TFOS_HOME.

Layout (format documented in docs/job-store.md)::

    $TFOS_HOME/jobs/<name>/spec.json      JobSpec, "format": "tfos-job/1"
    $TFOS_HOME/jobs/<name>/state.json     lifecycle, "format": "tfos-state/1"
    $TFOS_HOME/jobs/<name>/metrics.jsonl  metric events, one JSON object a line ("v": 1)
    $TFOS_HOME/jobs/<name>/checkpoints/   default checkpoint dir
    $TFOS_HOME/jobs/<name>/errors/        each failed task's traceback and log tail
    $TFOS_HOME/jobs/<name>/logs/          TensorBoard event files (chief only)
    $TFOS_HOME/jobs/<name>/stop-request   present while a stop is asked for (%tfos_stop)

JSON files are replaced atomically (temp file + os.replace) so a reader in another
process (the sidebar, a batch tool) never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import TfosError
from ..protocol.paths import join_uri
from .spec import JobSpec

STATE_FORMAT = "tfos-state/1"
# `interrupted` is never written: it is how a `running` job whose kernel died reads.
STATES = ("registered", "running", "succeeded", "failed", "stopped", "interrupted")
# The running kernel refreshes state.json's heartbeat this often; a reader on another
# host takes a heartbeat older than HEARTBEAT_STALE_S for a dead kernel.
HEARTBEAT_S = 5.0
HEARTBEAT_STALE_S = 30.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def default_home() -> Path:
    """TFOS_HOME, else a folder in the user's Jupyter data dir (shared with the server extension)."""
    env = os.environ.get("TFOS_HOME")
    if env:
        return Path(env).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "tfos"


def check_name(name: str) -> str:
    """Refuse names that could escape the store or confuse a shell."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise TfosError(
            f"Invalid job name {name!r}. A job name is 1-100 characters of letters, digits, "
            "'_', '-' or '.', starting with a letter or digit, and without '..'; "
            "for example: %%spark_etl ratings_v2"
        )
    return name


def atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


@dataclass
class EventsRead:
    """One offset read of metrics.jsonl (JobStore.read_events)."""

    events: list[dict[str, Any]]
    inode: int  # the file read, 0 when there is none
    offset: int  # where the next read starts
    restarted: bool  # the read started over at byte 0: what was read before is gone


class JobStore:
    """Directory-per-job store; the single source of truth after a kernel restart."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def job_dir(self, name: str) -> Path:
        return self.jobs_dir / check_name(name)

    def default_checkpoint_dir(self, name: str) -> str:
        return str(self.job_dir(name) / "checkpoints")

    def log_dir(self, name: str, checkpoint_dir: str) -> str:
        """TensorBoard's dir: the job's logs/ with the default checkpoint dir, else beside the
        checkpoints (a dir every executor can write to, which the job dir may not be)."""
        if checkpoint_dir == self.default_checkpoint_dir(name):
            return str(self.job_dir(name) / "logs")
        return join_uri(checkpoint_dir, "logs")

    def exists(self, name: str) -> bool:
        return (self.job_dir(name) / "spec.json").exists()

    def names(self) -> list[str]:
        if not self.jobs_dir.is_dir():
            return []
        return sorted(p.name for p in self.jobs_dir.iterdir() if (p / "spec.json").exists())

    # spec -------------------------------------------------------------
    def save_spec(self, spec: JobSpec) -> None:
        atomic_write_json(self.job_dir(spec.name) / "spec.json", spec.to_dict())
        if self.read_state(spec.name) is None:
            self.write_state(spec.name, state="registered", run=0)

    def load_spec(self, name: str) -> JobSpec:
        data = read_json(self.job_dir(name) / "spec.json")
        if data is None:
            raise TfosError(
                f"Unknown job {name!r}. Known jobs: {', '.join(self.names()) or 'none'}. "
                f"Register it first with a `%%spark_etl {name}` cell."
            )
        return JobSpec.from_dict(data)

    # state ------------------------------------------------------------
    _write_lock = threading.Lock()  # the run's thread and its heartbeat both merge into state.json

    def read_state(self, name: str, reconcile: bool = True) -> dict[str, Any] | None:
        """state.json; a `running` job whose kernel is gone reads as `interrupted` (with
        `interrupted_at`, its last heartbeat), for every reader in every process."""
        state = read_json(self.job_dir(name) / "state.json")
        if reconcile and state is not None and state.get("state") == "running" and not driver_alive(state):
            beat = state.get("heartbeat")
            state = dict(state, state="interrupted", interrupted_at=state.get("updated") if beat is None else beat)
        return state

    def write_state(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge fields into state.json; the driver is the only writer."""
        if "state" in fields and fields["state"] not in STATES[:-1]:
            raise ValueError(f"unknown job state {fields['state']!r}")
        with self._write_lock:
            state = self.read_state(name, reconcile=False) or {"format": STATE_FORMAT}
            state.update(fields, updated=time.time())
            atomic_write_json(self.job_dir(name) / "state.json", state)
        return state

    def heartbeat(self, name: str) -> "Heartbeat":
        """Refresh the running job's heartbeat until the returned thread is closed."""
        return Heartbeat(self, name)

    # metrics ----------------------------------------------------------
    def metrics_path(self, name: str) -> Path:
        return self.job_dir(name) / "metrics.jsonl"

    def append_events(self, name: str, events: list[dict[str, Any]]) -> None:
        path = self.metrics_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in events))

    def events(self, name: str) -> Iterator[dict[str, Any]]:
        """Metric events in arrival order; a torn last line (writer mid-append) is skipped."""
        try:
            f = open(self.metrics_path(name))
        except FileNotFoundError:
            return
        with f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    def read_events(self, name: str, offset: int = 0, inode: int | None = None,
                    max_bytes: int | None = None) -> EventsRead:
        """The events from byte `offset` of metrics.jsonl on: the one offset read that every
        follower of a job builds on, so none re-reads the whole file to see what is new.

        The read starts over at byte 0 when the file is shorter than `offset`, or is not the
        file `inode` names (a `--restart` drops the old one). A line still being written
        waits for the next call. `max_bytes` bounds one read (whole lines; a longer single
        line is still returned whole)."""
        try:
            f = open(self.metrics_path(name), "rb")
        except FileNotFoundError:
            return EventsRead([], 0, 0, restarted=offset > 0)
        with f:
            found = os.fstat(f.fileno()).st_ino
            start = offset
            if (inode is not None and found != inode) or f.seek(0, os.SEEK_END) < offset:
                start = 0
            f.seek(start)
            data = f.read() if max_bytes is None else f.read(max_bytes)
            if max_bytes is not None and data and not data.endswith(b"\n"):
                data += f.readline()  # finish the line the bound cut
        end = data.rfind(b"\n") + 1
        events = []
        for line in data[:end].splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return EventsRead(events, found, start + end, restarted=start != offset)

    def events_after(self, name: str, cursor: tuple[int, int] = (0, 0)
                     ) -> tuple[list[dict[str, Any]], tuple[int, int]]:
        """The events appended since `cursor`, and the cursor to pass next time: for a reader
        that follows a running job from another process. The cursor is (file id, byte
        offset): a file replaced since is read from its start."""
        read = self.read_events(name, cursor[1], cursor[0] if cursor[1] else None)
        return read.events, (read.inode, read.offset)

    # stop requests ------------------------------------------------------
    def stop_request_path(self, name: str) -> Path:
        return self.job_dir(name) / "stop-request"

    def request_stop(self, name: str) -> None:
        """Ask the kernel running the job to stop it (honoured within a second or so)."""
        self.stop_request_path(name).write_text(str(time.time()))

    def stop_requested(self, name: str) -> bool:
        return self.stop_request_path(name).exists()

    def clear_stop_request(self, name: str) -> None:
        self.stop_request_path(name).unlink(missing_ok=True)

    # errors -----------------------------------------------------------
    def errors_dir(self, name: str) -> Path:
        return self.job_dir(name) / "errors"

    def write_error_details(self, name: str, filename: str, text: str) -> Path:
        """Keep a failed task's full traceback and log tail; the error message points here."""
        if "/" in filename or filename.startswith("."):
            raise ValueError(f"bad error file name {filename!r}")
        path = self.errors_dir(name) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{filename}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def forget_metrics(self, name: str) -> None:
        """Drop the metric history for `--restart` (the chief worker clears the checkpoints)."""
        self.metrics_path(name).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def driver_alive(state: dict[str, Any], now: float | None = None) -> bool:
    """Whether the kernel that runs a `running` job still does: on this host its process
    must exist; anywhere, its heartbeat must be fresh. Old states without a heartbeat
    count their last update."""
    pid, host = state.get("driver_pid"), state.get("driver_host")
    if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
        return False
    beat = state.get("heartbeat")
    if beat is None:
        beat = state.get("updated") or 0
    return (now or time.time()) - float(beat) < HEARTBEAT_STALE_S


class Heartbeat:
    """A daemon thread that writes state.json's `heartbeat` every HEARTBEAT_S while a job runs."""

    def __init__(self, store: JobStore, name: str, interval: float = HEARTBEAT_S) -> None:
        self._store, self._name, self._interval = store, name, interval
        self._stop = threading.Event()
        store.write_state(name, heartbeat=time.time())
        self._thread = threading.Thread(target=self._run, name=f"tfos-heartbeat-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._store.write_state(self._name, heartbeat=time.time())
            except OSError:  # a full or gone disk must not kill the run; readers then see it stale
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self._interval + 1)
