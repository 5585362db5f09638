"""The live dashboard: an anywidget whose front end (widget/src/dashboard.js, with uPlot)
is bundled into the package at build time, so it needs neither a lab extension nor a
network connection, and works in JupyterLab 4, Notebook 7 and VS Code.

Updates are cheap: at most one tick a second sends the small `status` trait and the
points added since the last tick, as a custom message with float64 binary buffers.
Every SNAPSHOT_S seconds, and at the end, the decimated series are synced as a trait
so that a reloaded page redraws the chart. When the job ends, the cell's output is
replaced in place (same display_id) by the static summary of `summary.py`.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import traitlets

from ..driver.observers import JobObserver
from . import summary
from .model import DashboardModel

STATIC = Path(__file__).parent / "static"
TICK_S = 1.0
SNAPSHOT_S = 30.0
# The output's own HTML/PNG fallback (for a kernel that dies mid-run) is refreshed more
# rarely: drawing the PNG costs a few hundred ms, and the front end rebuilds the view.
FALLBACK_S = 300.0
VIEW_MIME = "application/vnd.jupyter.widget-view+json"


class Dashboard(anywidget.AnyWidget):
    _esm = STATIC / "dashboard.js"
    status = traitlets.Dict().tag(sync=True)
    snapshot = traitlets.Dict().tag(sync=True)
    log_lines = traitlets.List(traitlets.Unicode()).tag(sync=True)


def frontend_available(shell: Any) -> bool:
    """Whether a notebook front end can show widgets: a kernel, not a terminal IPython."""
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell" and (STATIC / "dashboard.js").exists()


def checkpoint_size(path: str) -> int | None:
    """Bytes of a checkpoint's files (`ckpt-N.index`, `.data-*`, `.meta`) on a local path;
    None for a URI, which the kernel does not list."""
    if "://" in path:
        return None
    files = glob.glob(glob.escape(path) + ".*")
    return sum(os.path.getsize(f) for f in files) if files else None


class DashboardObserver(JobObserver):
    """Shows one run of a job as a live widget, then as its static summary."""

    def __init__(self, job: str, epochs: int, workers: int, ps: int = 0, has_validation: bool = False,
                 spark_ui: str | None = None) -> None:
        self.model = DashboardModel(job, workers=workers, ps=ps, epochs=epochs, has_validation=has_validation,
                                    spark_ui=spark_ui)
        self.widget = Dashboard()
        self._handle: Any = None
        self._last_tick = 0.0
        self._last_snapshot = 0.0
        self._last_fallback = time.monotonic()
        self.sent_points = 0  # how many points went out as appends (for tests and the CPU note)

    # --- display ------------------------------------------------------------
    def _bundle(self, with_png: bool) -> dict[str, Any]:
        """The widget view, plus an HTML/PNG/text fallback for a page without the kernel."""
        view = {VIEW_MIME: {"version_major": 2, "version_minor": 0, "model_id": self.widget.model_id}}
        return {**summary.bundle(self.model, with_png=with_png), **view}

    def show(self) -> None:
        from IPython.display import display

        self._push(force=True)
        self._handle = display(self._bundle(with_png=False), raw=True, display_id=True)

    # --- observer hooks ------------------------------------------------------
    def on_start(self, state: dict[str, Any]) -> None:
        self.model.job_group = state.get("job_group")
        self.model.attempt = int(state.get("attempt", 1))
        if self._handle is None:
            self.show()

    def on_event(self, event: dict[str, Any]) -> None:
        self.model.feed(event)
        if event.get("kind") == "checkpoint" and self.model.checkpoints:
            self.model.checkpoints[0].size = checkpoint_size(str(event.get("path")))
        if event.get("kind") == "attempt":
            self.model.job_group = event.get("job_group", self.model.job_group)
        if event.get("kind") in ("checkpoint", "error", "attempt", "epoch"):
            self._push(force=True)

    def on_log(self, line: str) -> None:
        self.model.add_log(line)

    def on_attempt_failed(self, attempt: int, message: str) -> None:
        self.model.attempt_failed(attempt, message)
        self._push(force=True)

    def on_poll(self) -> None:
        self._push()

    def on_end(self, state: dict[str, Any]) -> None:
        self.model.end(state.get("state", "failed"), state.get("error"), state.get("ended"))
        self.model.error_file = state.get("error_file") or self.model.error_file
        self._push(force=True)
        self._sync_snapshot()
        final = summary.bundle(self.model)
        if self._handle is not None:
            self._handle.update(final, raw=True)
        else:
            from IPython.display import display

            display(final, raw=True)

    # --- updates -------------------------------------------------------------
    def _push(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_tick < TICK_S:
            return
        self._last_tick = now
        self.widget.status = self.model.status()
        delta = self.model.take_delta()
        if delta["series"] or delta["logs"]:
            names, buffers = [], []
            for name, (xs, ys) in delta["series"].items():
                names.append([name, len(xs)])
                buffers += [np.asarray(xs, np.float64).tobytes(), np.asarray(ys, np.float64).tobytes()]
                self.sent_points += len(xs)
            self.widget.send({"type": "append", "series": names, "logs": delta["logs"]}, buffers)
        if now - self._last_snapshot >= SNAPSHOT_S:
            self._sync_snapshot()

    def _sync_snapshot(self) -> None:
        """The decimated series and the log tail, as traits: what a reloaded page redraws.
        Every FALLBACK_S the output's fallback is refreshed too, right after the snapshot,
        so that the view the front end rebuilds starts from it."""
        now = self._last_snapshot = time.monotonic()
        self.widget.snapshot = {k: [xs, ys] for k, (xs, ys) in self.model.snapshot().items()}
        self.widget.log_lines = self.model.logs[-200:]
        if self._handle is not None and self.model.ended is None and now - self._last_fallback >= FALLBACK_S:
            self._last_fallback = now
            self._handle.update(self._bundle(with_png=True), raw=True)
