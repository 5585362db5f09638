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
process (the sidebar, a batch tool) never sees half a file. The store holds cell sources,
tracebacks and metrics, so its directories are 0700 and its files 0600 whatever the umask,
and it opens only regular files, never through a symlink: a file planted in a job's
directory cannot make a writer write elsewhere, nor a reader (the Jupyter server) block on
a FIFO or read a device. metrics.jsonl is read in bounded chunks (EventReader), so no file,
however long or malformed, costs a reader more than a few MiB.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

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
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # whole name only: fullmatch, so no trailing newline
PRIVATE_DIR = 0o700  # TFOS_HOME, jobs/, each job's directory and its errors/
PRIVATE_FILE = 0o600  # every file the store writes
CHUNK_BYTES = 1 << 20  # metrics.jsonl is read this much at a time
# A longer line of metrics.jsonl is no event the kernel writes (the channel takes lines of up to
# 1 MiB, and the kernel adds a few keys): skipped.
LINE_MAX_BYTES = 2 << 20
JSON_MAX_BYTES = 16 << 20  # a larger spec.json or state.json is refused, not read
ERROR_FILE_CHARS = 1 << 20  # error_details reads at most this much of an errors/ file
EVENT_MAX_DEPTH = 32  # a more deeply nested line is no event (the kernel's nest 3 deep)


def default_home() -> Path:
    """TFOS_HOME, else a folder in the user's Jupyter data dir (shared with the server extension)."""
    env = os.environ.get("TFOS_HOME")
    if env:
        return Path(env).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "tfos"


def check_name(name: str) -> str:
    """Refuse names that could escape the store or confuse a shell."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise TfosError(
            f"Invalid job name {name!r}. A job name is 1-100 characters of letters, digits, "
            "'_', '-' or '.', starting with a letter or digit, and without '..'; "
            "for example: %%spark_etl ratings_v2"
        )
    return name


def private_dir(path: Path) -> None:
    """Create `path` and its missing parents with mode 0700, set explicitly (a umask of 022
    would leave them world-readable): a job's directory holds its cell sources, tracebacks
    and metrics, which other users of the host must not read. Existing folders are left as
    they are."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR)
        except FileExistsError:  # made meanwhile by another writer
            continue
        os.chmod(folder, PRIVATE_DIR)


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at `path`, created 0600 when `flags` ask for it.

    Never through a symlink (O_NOFOLLOW), and never a FIFO, a device or a directory: lstat
    refuses those before the open, and fstat after it, with O_NONBLOCK so that a FIFO swapped
    in between cannot block the open. A file planted in a job's directory can then neither
    redirect a write nor freeze a reader (the Jupyter server serves this store)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise _not_regular(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, PRIVATE_FILE)
    except OSError as exc:
        raise _not_regular(path) if exc.errno == errno.ELOOP else exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_regular(path)
    return fd


def _not_regular(path: Path) -> OSError:
    return OSError(errno.EINVAL, "not a regular file (a symlink, FIFO, device or directory), left alone", str(path))


def read_bounded(path: Path, most: int) -> bytes:
    """At most `most` bytes of the regular file at `path` (open_regular), and an OSError
    (EFBIG) for a longer one: a reader must not load a file of any size it is given."""
    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(most + 1)
    if len(data) > most:
        raise OSError(errno.EFBIG, f"larger than {most} bytes, left unread", str(path))
    return data


def _atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` at once: a temp file in the same directory (0600, O_EXCL),
    fsynced, then renamed over it, so a reader never sees half a file and a link planted
    at `path` is replaced, never written through."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    _atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no file. A file that is not a regular
    one, is over JSON_MAX_BYTES or holds no JSON object raises (OSError, ValueError)."""
    try:
        data = json.loads(read_bounded(path, JSON_MAX_BYTES))
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object")
    return data


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink resolved, is `root` (itself resolved) or below it."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:  # a symlink loop
        return False


# NaN and Infinity, which Python's json reads by default, are read as None (a value that
# overflows a float, 1e999, still reads as inf: answers turn it into null as they go out).
_DECODER = json.JSONDecoder(parse_constant=lambda _: None)


def parse_event(line: bytes) -> dict[str, Any] | None:
    """The event a line of metrics.jsonl holds, or None for a line that is not one: not
    UTF-8, not JSON, nested too deep, or JSON that is no object. NaN and Infinity read as
    None, as the kernel writes them (docs/metrics.md), so no reader passes them on to a
    browser, whose JSON.parse refuses them."""
    try:
        value = _DECODER.decode(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(value, dict):
        return None
    if line.count(b"[") + line.count(b"{") > EVENT_MAX_DEPTH and not _nested_at_most(value, EVENT_MAX_DEPTH):
        return None  # one that could not be written back as JSON (json.dumps recurses too)
    return value


def _nested_at_most(value: Any, most: int) -> bool:
    """Whether `value` nests lists and objects at most `most` deep (walked without recursion)."""
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth >= most:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


@dataclass
class EventsRead:
    """One offset read of metrics.jsonl (JobStore.read_events)."""

    events: list[dict[str, Any]]
    inode: int  # the file read, 0 when there is none
    offset: int  # where the next read starts
    restarted: bool  # the read started over at byte 0: what was read before is gone


class EventReader:
    """The events of metrics.jsonl from a byte offset on, one at a time (JobStore.reading_events).

    The file is read CHUNK_BYTES at a time and each event is handed on as soon as its line is
    whole, so a reader holds at most a chunk and a line, however long the file. A line over
    LINE_MAX_BYTES is skipped (the kernel writes none), without being held: `offset` then moves
    past what was scanned of it, even to inside it, and a read that starts inside a line
    skips to the next one. A read stops at `max_bytes` of whole lines, at the end of the file,
    or at a last line still being written, which waits for the next read. `offset` is where
    the next read starts, kept current as events are handed on."""

    def __init__(self, f: BinaryIO | None, offset: int, inode: int | None, max_bytes: int | None) -> None:
        self._f, self._max = f, max_bytes
        info = os.fstat(f.fileno()) if f is not None else None
        self.inode = info.st_ino if info else 0
        replaced = info is None or (inode is not None and info.st_ino != inode) or info.st_size < offset
        self.offset = 0 if replaced else offset
        self.restarted = self.offset != offset  # what was read before is gone (a --restart replaced the file)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for line in self._lines():
            event = parse_event(line)
            if event is not None:
                yield event

    def _lines(self) -> Iterator[bytes]:
        if self._f is None:
            return
        start = at = self.offset  # `at`: where the next chunk begins in the file
        skipping = start > 0 and self._inside_a_line(start)
        self._f.seek(start)
        pending = b""  # the start of a line that the next chunk continues
        while self._max is None or self.offset - start < self._max:
            chunk = self._f.read(CHUNK_BYTES)
            if not chunk:
                return
            pos = 0
            while (end := chunk.find(b"\n", pos)) >= 0:
                line, pending, pos = pending + chunk[pos:end], b"", end + 1
                self.offset = at + pos
                if not skipping and len(line) <= LINE_MAX_BYTES:
                    yield line
                skipping = False
                if self._max is not None and self.offset - start >= self._max:
                    return
            at += len(chunk)
            pending += chunk[pos:]
            if skipping or len(pending) > LINE_MAX_BYTES:  # an over-long line: drop what we have of it
                skipping, pending, self.offset = True, b"", at

    def _inside_a_line(self, offset: int) -> bool:
        """Whether `offset` is not where a line starts (a client's offset into a line, or
        into a UTF-8 character; or a skipped over-long line): its rest is no event."""
        self._f.seek(offset - 1)
        return self._f.read(1) != b"\n"


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
        """Append events as lines of metrics.jsonl (created 0600, never through a link)."""
        path = self.metrics_path(name)
        private_dir(path.parent)
        with os.fdopen(open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as f:
            f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in events).encode())

    @contextmanager
    def reading_events(self, name: str, offset: int = 0, inode: int | None = None,
                       max_bytes: int | None = None) -> Iterator[EventReader]:
        """An EventReader of metrics.jsonl from byte `offset` on: the one offset read that every
        follower of a job builds on, so none re-reads the whole file to see what is new, and
        none holds more of it than a chunk.

        The read starts over at byte 0 when the file is shorter than `offset`, or is not the
        file `inode` names (a `--restart` drops the old one). A missing file reads as empty;
        one that is not a regular file (a FIFO, a device, a link) raises OSError."""
        try:
            fd = open_regular(self.metrics_path(name))
        except FileNotFoundError:
            yield EventReader(None, offset, inode, max_bytes)
            return
        with os.fdopen(fd, "rb") as f:
            yield EventReader(f, offset, inode, max_bytes)

    def events(self, name: str) -> Iterator[dict[str, Any]]:
        """Metric events in arrival order; a line that is no event (a torn last line, a
        writer mid-append, a line edited by hand) is skipped."""
        with self.reading_events(name) as read:
            yield from read

    def read_events(self, name: str, offset: int = 0, inode: int | None = None,
                    max_bytes: int | None = None) -> EventsRead:
        """The events from byte `offset` of metrics.jsonl on, as a list (reading_events);
        `max_bytes` bounds one read (whole lines)."""
        with self.reading_events(name, offset, inode, max_bytes) as read:
            events = list(read)
        return EventsRead(events, read.inode, read.offset, read.restarted)

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
        """Ask the kernel running the job to stop it (honoured within a second or so). The
        file is made anew (O_EXCL, 0600, never through a link) after removing an old one, so
        a link planted in the job's directory cannot turn the request into a write elsewhere."""
        path = self.stop_request_path(name)
        path.unlink(missing_ok=True)
        try:
            fd = open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:  # another stop was asked for meanwhile: that request stands
            return
        with os.fdopen(fd, "w") as f:
            f.write(str(time.time()))

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
        _atomic_write(path, text)
        return path

    def read_error_details(self, name: str, recorded: Any) -> str | None:
        """The text (at most ERROR_FILE_CHARS characters) of the errors/ file that state.json's
        `error_file` names, or None. Only its file name counts, looked up in the job's own
        errors/ (which must resolve inside the job's directory), and the file is opened as
        a regular file, never through a link: state.json is data, and a path in it must not
        make a reader (the Jupyter server, for any user with its token) open another file."""
        filename = Path(recorded).name if isinstance(recorded, str) and recorded else ""
        folder = self.errors_dir(name)
        if not filename or filename.startswith(".") or not inside(folder, self.job_dir(name)):
            return None
        try:
            with os.fdopen(open_regular(folder / filename), errors="replace") as f:
                return f.read(ERROR_FILE_CHARS)
        except OSError:
            return None

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
