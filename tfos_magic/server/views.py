"""The REST API's answers, from the job store alone (docs/server-api.md).

Runs in the Jupyter server's process, which is not the kernel that runs a job: every
answer is read from the store, with the store's own reconcile (a job whose kernel died
reads `interrupted`). A stop is asked for through the job's stop-request file, which the
running kernel polls about once a second. Nothing here knows tornado: the handlers turn
`ApiError` into an HTTP status.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ..errors import TfosError
from ..job.digest import JobDigest, decimate
from ..job.spec import JobSpec
from ..job.store import JobStore, check_name

log = logging.getLogger(__name__)
LOSS_POINTS = 500  # the most points of `loss_history` in a detail answer
EVENTS_MAX_BYTES = 4 << 20  # the most of metrics.jsonl one events answer reads
ERROR_LINE_CHARS = 1000  # a longer error message is cut in a summary (the detail has the file)


class ApiError(Exception):
    """An answer that is not a success: its HTTP status and the message the user reads."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink resolved, is `root` or below it."""
    try:
        return path.resolve().is_relative_to(root)
    except OSError:  # a symlink loop
        return False


class JobViews:
    """The API over one store. Keeps a digest of each job's metrics.jsonl and feeds it only
    what was appended since the last request, so polling a long job stays cheap."""

    def __init__(self, store: JobStore, root_dir: str | None = None) -> None:
        self.store = store
        self.root_dir = Path(root_dir) if root_dir else None  # the Jupyter server's root
        self._digests: dict[str, JobDigest] = {}

    # --- names and paths ------------------------------------------------------------
    def _checked(self, name: str) -> str:
        """The job's name once it is known to be a job of this store: a bad name is a 400,
        and a name whose directory or files lead out of the store (a symlink) reads as
        unknown, a 404, like a job that is not there."""
        try:
            check_name(name)
        except TfosError as exc:
            raise ApiError(400, str(exc)) from None
        if not self._contained(name):
            raise _unknown(name)
        return name

    def _contained(self, name: str) -> bool:
        """Whether the job exists and its directory and files all resolve inside the store."""
        root = self.store.jobs_dir.resolve()
        try:
            job_dir = self.store.job_dir(name)
        except TfosError:  # a stray directory whose name is no job name
            return False
        if not (job_dir / "spec.json").is_file() or not _inside(job_dir, root):
            return False
        inner = job_dir.resolve()
        files = (job_dir / "spec.json", job_dir / "state.json", self.store.metrics_path(name))
        return all(_inside(f, inner) for f in files if os.path.lexists(f))

    def _digest(self, name: str) -> JobDigest:
        """The job's digest, with what was appended since the last request folded in."""
        self._digests[name] = self._digests.get(name, JobDigest()).refresh(self.store, name)
        return self._digests[name]

    # --- answers ----------------------------------------------------------------------
    def jobs(self) -> dict[str, Any]:
        """Every job, newest first (by when its last run started; a job never run, by when
        it was registered)."""
        names = [n for n in self.store.names() if self._contained(n)]
        for gone in self._digests.keys() - set(names):
            del self._digests[gone]
        rows = []
        for n in names:
            try:
                rows.append(self._summary(n))
            except TfosError:  # removed since it was listed
                continue
            except (OSError, ValueError, KeyError) as exc:  # a file edited by hand: list the others
                log.warning("tfos: job %s left out of the list: %s", n, exc)
        rows.sort(key=lambda r: (r["started"] or r["updated"] or 0.0, r["name"]), reverse=True)
        return {"jobs": rows}

    def job(self, name: str) -> dict[str, Any]:
        name = self._checked(name)
        try:
            spec = self.store.load_spec(name)
        except TfosError:  # removed since it was checked
            raise _unknown(name) from None
        state = self.store.read_state(name) or {}
        digest = self._digest(name)
        return dict(
            self._summary(name, spec, state, digest),
            options=spec.options.to_dict(secrets=False),
            error_details=self._error_details(name, state),
            checkpoints=list(digest.checkpoints),
            loss_history=[{"step": s, "loss": v} for s, v in decimate(digest.loss_points, LOSS_POINTS)],
            history=digest.history,
        )

    def events(self, name: str, offset: str | None) -> dict[str, Any]:
        """metrics.jsonl's lines from byte `offset` on (at most EVENTS_MAX_BYTES a call) and the
        offset to ask from next. An offset past the end of the file (a `--restart` replaced
        it) reads from its start."""
        name = self._checked(name)
        try:
            start = int(offset) if offset not in (None, "") else 0
        except ValueError:
            start = -1
        if start < 0:
            raise ApiError(400, f"offset must be a byte offset (an integer >= 0), not {offset!r}.")
        read = self.store.read_events(name, start, max_bytes=EVENTS_MAX_BYTES)
        return {"events": read.events, "offset": read.offset}

    def stop(self, name: str) -> dict[str, Any]:
        """Write the stop request that the kernel running the job polls about once a second;
        it checkpoints and ends the job as `stopped` within seconds."""
        name = self._checked(name)
        state = (self.store.read_state(name) or {}).get("state", "registered")
        if state != "running":
            hint = (f" Its kernel is gone; %tfos_resume {name} continues it." if state == "interrupted" else "")
            raise ApiError(409, f"Job {name!r} is not running (state: {state}).{hint}")
        self.store.request_stop(name)
        after = (self.store.read_state(name) or {}).get("state", "registered")
        if after != "running":  # it ended meanwhile: leave no request for its next run to find
            self.store.clear_stop_request(name)
            raise ApiError(409, f"Job {name!r} is not running (state: {after}).")
        return {"state": after}

    # --- parts ------------------------------------------------------------------------
    def _summary(self, name: str, spec: JobSpec | None = None, state: dict[str, Any] | None = None,
                 digest: JobDigest | None = None) -> dict[str, Any]:
        spec = spec or self.store.load_spec(name)
        state = (self.store.read_state(name) or {}) if state is None else state
        digest = digest or self._digest(name)
        opts = spec.options
        workers = state.get("workers") or opts.workers
        history = digest.history
        return {
            "name": name,
            "state": state.get("state", "registered"),
            "run": state.get("run", 0),
            "attempt": state.get("attempt", 0),
            "notebook_path": self._notebook_path(state.get("notebook_path")),
            "cell_id": state.get("cell_id"),
            "workers": workers,
            "ps": state.get("ps", opts.ps if opts.strategy == "ps" else 0),
            "epoch": history[-1]["epoch"] if history else 0,
            "epochs": state.get("epochs") or opts.epochs,
            "step": digest.step,
            "loss": digest.loss,
            # The job's rate, as the dashboard shows it: the chief's rows a second times the
            # workers (every worker takes the same steps).
            "rows_per_s": None if digest.rows_per_s is None else float(digest.rows_per_s) * workers,
            "gpu_util": digest.gpu_util,
            "latest_checkpoint": digest.latest_checkpoint,
            "started": state.get("started"),
            "updated": state.get("updated"),
            "error": _one_line(state.get("error")),
        }

    def _notebook_path(self, recorded: str | None) -> str | None:
        """The notebook as the server's contents API names it (relative to the server's root,
        with '/'), which the front end can open. The kernel records what the server told it
        (JPY_SESSION_NAME), an absolute path in Jupyter Server 2; one outside the root stays
        as recorded."""
        if not recorded:
            return None
        path = Path(recorded)
        if not path.is_absolute() or self.root_dir is None or not path.is_relative_to(self.root_dir):
            return recorded
        return path.relative_to(self.root_dir).as_posix()

    def _error_details(self, name: str, state: dict[str, Any]) -> str | None:
        """The failed task's traceback and log tail: the file state.json names, looked up in
        the job's own errors/ directory (never a path outside the job)."""
        recorded = state.get("error_file")
        if not recorded:
            return None
        path = self.store.errors_dir(name) / Path(recorded).name
        if not _inside(path, self.store.job_dir(name).resolve()):
            return None
        try:
            return path.read_text(errors="replace")
        except OSError:
            return None


def _unknown(name: str) -> ApiError:
    return ApiError(404, f"Unknown job {name!r}: no such job in the job store.")


def _one_line(text: str | None) -> str | None:
    """The error message on one line, for a list row: its lines joined, and a very long one cut."""
    if not text:
        return None
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= ERROR_LINE_CHARS else line[: ERROR_LINE_CHARS - 1] + "…"
