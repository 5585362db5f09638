"""The REST API's answers, from the job store alone (docs/server-api.md).

Runs in the Jupyter server's process, which is not the kernel that runs a job: every
answer is read from the store, with the store's own reconcile (a job whose kernel died
reads `interrupted`). A stop is asked for through the job's stop-request file, which the
running kernel polls about once a second. Nothing here knows tornado: the handlers turn
`ApiError` into an HTTP status, and call these views on threads of their own, so a slow
read never holds up the server's event loop; a lock per job keeps two requests from
folding the same digest at once.

What the views trust: nothing in a job's files. A file that cannot be read (a FIFO or a
link where a file should be, a spec.json edited by hand) makes its job an `unknown` row
with an `error` saying why, and never a failed list.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import TfosError
from ..job.digest import JobDigest, finite_number, integer, short_text
from ..job.spec import JobSpec
from ..job.store import JobStore, check_name, inside

log = logging.getLogger(__name__)
LOSS_POINTS = 500  # the most points of `loss_history` in a detail answer
EVENTS_MAX_BYTES = 4 << 20  # the most of metrics.jsonl one events answer reads
DIGEST_MAX_BYTES = 32 << 20  # the most of metrics.jsonl one request folds into a job's digest
ERROR_LINE_CHARS = 1000  # a longer error message is cut in a summary (the detail has the file)
_OFFSET = re.compile(r"[0-9]{1,18}")  # ASCII digits only: int() would also take "+5", " 5" and "٥"


class ApiError(Exception):
    """An answer that is not a success: its HTTP status and the message the user reads."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class JobViews:
    """The API over one store. Keeps a digest of each job's metrics.jsonl and feeds it only
    what was appended since the last request, so polling a long job stays cheap."""

    def __init__(self, store: JobStore, root_dir: str | None = None) -> None:
        self.store = store
        self.root_dir = Path(root_dir) if root_dir else None  # the Jupyter server's root
        self._digests: dict[str, JobDigest] = {}
        self._locks: dict[str, threading.Lock] = {}  # one per job: its digest is folded by one request at a time
        self._lock = threading.Lock()  # guards the two dicts

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
        root = self.store.jobs_dir
        try:
            job_dir = self.store.job_dir(name)
        except TfosError:  # a stray directory whose name is no job name
            return False
        if not (job_dir / "spec.json").is_file() or not inside(job_dir, root):
            return False
        files = (job_dir / "spec.json", job_dir / "state.json", self.store.metrics_path(name))
        return all(inside(f, job_dir) for f in files if os.path.lexists(f))

    def _locked(self, name: str, answer: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """`answer(name)`, with the job's lock held: its digest is read and folded by one
        request at a time (the handlers run requests on several threads)."""
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            return answer(name)

    def _digest(self, name: str) -> JobDigest:
        """The job's digest, with what was appended since the last request folded in (at most
        DIGEST_MAX_BYTES of it: a server's first look at a huge file catches up over a few
        requests, each of them short). Called with the job's lock held."""
        digest = self._digests.get(name, JobDigest()).refresh(self.store, name, DIGEST_MAX_BYTES)
        self._digests[name] = digest
        return digest

    # --- answers ----------------------------------------------------------------------
    def jobs(self) -> dict[str, Any]:
        """Every job, newest first (by when its last run started; a job never run, by when
        it was registered). A job whose files cannot be read is listed as `unknown`."""
        names = [n for n in self.store.names() if self._contained(n)]
        with self._lock:
            for gone in self._digests.keys() - set(names):
                del self._digests[gone]
                self._locks.pop(gone, None)
        rows = [row for n in names if (row := self._locked(n, self._row)) is not None]
        rows.sort(key=lambda r: (r["started"] or r["updated"] or 0.0, r["name"]), reverse=True)
        return {"jobs": rows}

    def job(self, name: str) -> dict[str, Any]:
        return self._locked(self._checked(name), self._detail)

    def _row(self, name: str) -> dict[str, Any] | None:
        """The job's summary for the list; None for a job removed since it was listed."""
        try:
            return self._summary(name)
        except TfosError:  # removed since it was listed
            return None
        except Exception as exc:  # noqa: BLE001 - one job's bad files must never fail the whole list
            return _unreadable(name, exc)

    def _detail(self, name: str) -> dict[str, Any]:
        """The job's summary and details; a job whose files cannot be read answers as its
        list row does, with empty details."""
        try:
            return self._details(name)
        except TfosError:  # removed since it was checked
            raise _unknown(name) from None
        except Exception as exc:  # noqa: BLE001 - answered as the list shows it, with the reason
            return dict(_unreadable(name, exc), options={}, error_details=None, checkpoints=[], loss_history=[],
                        history=[])

    def _details(self, name: str) -> dict[str, Any]:
        spec = self.store.load_spec(name)
        state = self.store.read_state(name) or {}
        digest = self._digest(name)
        return dict(
            self._summary(name, spec, state, digest),
            options=spec.options.to_dict(secrets=False),
            error_details=self.store.read_error_details(name, state.get("error_file")),
            checkpoints=list(digest.checkpoints),
            loss_history=digest.loss_curve(LOSS_POINTS),
            history=digest.history,
        )

    def events(self, name: str, offset: str | None) -> dict[str, Any]:
        """metrics.jsonl's lines from byte `offset` on (at most EVENTS_MAX_BYTES a call) and the
        offset to ask from next. An offset past the end of the file (a `--restart` replaced
        it) reads from its start."""
        name = self._checked(name)
        if offset not in (None, "") and not _OFFSET.fullmatch(offset):
            raise ApiError(400, f"offset must be a byte offset (ASCII digits, an integer >= 0), not {offset!r}.")
        try:
            read = self.store.read_events(name, int(offset or 0), max_bytes=EVENTS_MAX_BYTES)
        except OSError as exc:
            raise ApiError(500, _cannot_read(name, exc)) from None
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
        """The job's row. spec.json's and state.json's values are taken only with the type the
        format gives them (else their default), so a file edited by hand cannot break the
        list's sort nor its JSON."""
        spec = spec or self.store.load_spec(name)
        state = (self.store.read_state(name) or {}) if state is None else state
        digest = digest or self._digest(name)
        opts = spec.options
        workers = integer(state.get("workers")) or integer(opts.workers) or 0
        history = digest.history
        return {
            "name": name,
            "state": short_text(state.get("state", "registered")) or "unknown",
            "run": integer(state.get("run")) or 0,
            "attempt": integer(state.get("attempt")) or 0,
            "notebook_path": self._notebook_path(short_text(state.get("notebook_path"))),
            "cell_id": short_text(state.get("cell_id")),
            "workers": workers,
            "ps": integer(state.get("ps", opts.ps if opts.strategy == "ps" else 0)) or 0,
            "epoch": history[-1]["epoch"] if history else 0,
            "epochs": integer(state.get("epochs")) or integer(opts.epochs) or 0,
            "step": digest.step,
            "loss": digest.loss,
            # The job's rate, as the dashboard shows it: the chief's rows a second times the
            # workers (every worker takes the same steps).
            "rows_per_s": None if digest.rows_per_s is None else finite_number(float(digest.rows_per_s) * workers),
            "gpu_util": digest.gpu_util,
            "latest_checkpoint": digest.latest_checkpoint,
            "started": finite_number(state.get("started")),
            "updated": finite_number(state.get("updated")),
            "error": _one_line(state.get("error")),
            "stopped_early": digest.stopped_early,
            "mlflow_link": short_text(state.get("mlflow_link")),  # the MLflow run it logs to, if any
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

def _unknown(name: str) -> ApiError:
    return ApiError(404, f"Unknown job {name!r}: no such job in the job store.")


def _cannot_read(name: str, exc: BaseException) -> str:
    return f"tfos cannot read job {name!r}: {exc}"


def _unreadable(name: str, exc: BaseException) -> dict[str, Any]:
    """A summary for a job whose files cannot be read: listed as `unknown`, with nothing
    known of it but its name and, in `error`, why."""
    log.warning("tfos: cannot read job %s: %s", name, exc)
    return {"name": name, "state": "unknown", "run": 0, "attempt": 0, "notebook_path": None, "cell_id": None,
            "workers": 0, "ps": 0, "epoch": 0, "epochs": 0, "step": None, "loss": None, "rows_per_s": None,
            "gpu_util": None, "latest_checkpoint": None, "started": None, "updated": None,
            "error": _one_line(_cannot_read(name, exc)), "stopped_early": None, "mlflow_link": None}


def _one_line(text: Any) -> str | None:
    """The error message on one line, for a list row: its lines joined, and a very long one cut."""
    if not isinstance(text, str) or not text:
        return None
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= ERROR_LINE_CHARS else line[: ERROR_LINE_CHARS - 1] + "…"
