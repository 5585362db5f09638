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
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import TfosError
from ..protocol.paths import join_uri
from .spec import JobSpec

STATE_FORMAT = "tfos-state/1"
STATES = ("registered", "running", "succeeded", "failed", "stopped")
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
    def read_state(self, name: str) -> dict[str, Any] | None:
        return read_json(self.job_dir(name) / "state.json")

    def write_state(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge fields into state.json; the driver is the only writer."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown job state {fields['state']!r}")
        state = self.read_state(name) or {"format": STATE_FORMAT}
        state.update(fields, updated=time.time())
        atomic_write_json(self.job_dir(name) / "state.json", state)
        return state

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
