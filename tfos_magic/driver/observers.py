"""What the launcher reports to, instead of printing: one interface, several observers.

The text output, the live dashboard and the command-line tool's progress lines are
observers of the same stream. Every hook is called on the kernel's main thread (the
supervisor's watch loop drains the channel's events there), so output lands in the
running cell: JupyterLab sends output from a background thread to the last-run cell.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

log = logging.getLogger(__name__)


class JobObserver:
    """Override what you need; every hook is optional."""

    def on_start(self, state: dict[str, Any]) -> None:
        """The run begins: state.json's fields (job, run, workers, ps, epochs, job_group, ...)."""

    def on_event(self, event: dict[str, Any]) -> None:
        """A metric event (docs/metrics.md), or a driver-side `attempt` or `spark` event."""

    def on_log(self, line: str) -> None:
        """A line printed on a worker (`[worker 0] ...`) or a note from the launcher."""

    def on_attempt_failed(self, attempt: int, message: str) -> None:
        """An attempt failed and the next one starts from the latest checkpoint."""

    def on_poll(self) -> None:
        """Called a few times a second while the job runs: for clocks and throttled updates."""

    def on_end(self, state: dict[str, Any]) -> None:
        """The run is over: state.json as written (state, error, error_file, ...)."""


class Observers(JobObserver):
    """Fans each call out to several observers; one that raises is logged and dropped from
    that call, never allowed to stop the job."""

    def __init__(self, observers: Iterable[JobObserver] = ()) -> None:
        self.observers = list(observers)

    def _each(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:  # noqa: BLE001 - a broken view must not break training
                log.exception("tfos: observer %r failed in %s", observer, hook)

    def on_start(self, state: dict[str, Any]) -> None:
        self._each("on_start", state)

    def on_event(self, event: dict[str, Any]) -> None:
        self._each("on_event", event)

    def on_log(self, line: str) -> None:
        self._each("on_log", line)

    def on_attempt_failed(self, attempt: int, message: str) -> None:
        self._each("on_attempt_failed", attempt, message)

    def on_poll(self) -> None:
        self._each("on_poll")

    def on_end(self, state: dict[str, Any]) -> None:
        self._each("on_end", state)
