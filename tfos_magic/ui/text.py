"""Plain-text output of a job: for a terminal IPython and for tests without a notebook
front end. Worker output is printed as it comes; a compact progress line at most
every PROGRESS_S seconds; the summary at the end."""

from __future__ import annotations

import time
from typing import Any

from ..driver.observers import JobObserver
from . import summary
from .model import DashboardModel

PROGRESS_S = 10.0


class TextObserver(JobObserver):
    def __init__(self, job: str, epochs: int, workers: int, ps: int = 0, progress_s: float = PROGRESS_S) -> None:
        self.model = DashboardModel(job, workers=workers, ps=ps, epochs=epochs)
        self.progress_s = progress_s
        self._last = time.monotonic()

    def on_event(self, event: dict[str, Any]) -> None:
        self.model.feed(event)

    def on_log(self, line: str) -> None:
        print(line)

    def on_attempt_failed(self, attempt: int, message: str) -> None:
        self.model.attempt_failed(attempt, message)
        print(f"tfos: job {self.model.job!r} attempt {attempt} failed ({message}); "
              "restarting from the latest checkpoint")

    def on_poll(self) -> None:
        now = time.monotonic()
        if now - self._last < self.progress_s:
            return
        self._last = now
        print(progress_line(self.model), flush=True)

    def on_end(self, state: dict[str, Any]) -> None:
        self.model.end(state.get("state", "failed"), state.get("error"), state.get("ended"))
        if self.model.state != "failed":  # a failure is raised, and shown, by the cell itself
            print(summary.text(self.model))


def progress_line(model: DashboardModel) -> str:
    if model.first_step_at is None:
        return f"tfos {model.job}: {model.phase}"
    total = model.total_steps
    loss = model.loss.get(0)
    parts = [f"epoch {model.epoch}/{model.epochs}", f"step {model.step}" + (f"/{total}" if total else ""),
             f"loss {loss.y[-1]:.4g}" if loss and loss.y else "",
             f"{model.rows_per_s:,.0f} rows/s" if model.rows_per_s else "",
             f"ETA {summary.duration(model.eta())}" if model.eta() is not None else ""]
    return f"tfos {model.job}: " + ", ".join(p for p in parts if p)
