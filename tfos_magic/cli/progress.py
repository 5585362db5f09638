"""Progress of a job in a terminal: the same observer for `tfos submit` (the job runs in
this process) and `tfos run` (it runs in the notebook's kernel, and this process follows
it through the job store).

Without a terminal (a CI log, a pipe) it prints the text view's plain lines (step, loss,
rows/s, ETA) at most every 10 s; on a terminal a tqdm bar takes their place. Either way
the summary is printed at the end, as in a terminal IPython.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, TextIO

from ..driver.observers import JobObserver
from ..job import JobSpec, JobStore
from ..protocol.events import log_line
from ..ui.text import PROGRESS_S, TextObserver

FOLLOW_S = 0.5


class ProgressObserver(TextObserver):
    """The text view, with a tqdm bar instead of the progress lines when `bar` (default:
    stderr is a terminal, where tqdm draws)."""

    def __init__(self, job: str, epochs: int, workers: int, ps: int = 0, bar: bool | None = None,
                 progress_s: float = PROGRESS_S) -> None:
        super().__init__(job, epochs, workers, ps, progress_s)
        self.use_bar = sys.stderr.isatty() if bar is None else bar
        self._bar: Any = None

    @classmethod
    def for_spec(cls, spec: JobSpec, bar: bool | None = None) -> "ProgressObserver":
        opts = spec.options
        return cls(spec.name, opts.epochs, opts.workers, opts.ps if opts.strategy == "ps" else 0, bar)

    def on_start(self, state: dict[str, Any]) -> None:
        self.model.started = float(state.get("started") or self.model.started)
        print(f"tfos {self.model.job}: run {state.get('run')} started: {state.get('workers')} worker(s), "
              f"{state.get('epochs')} epoch(s)", flush=True)

    def on_log(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)  # above the bar, which redraws below it
        else:
            print(line, flush=True)

    def on_poll(self) -> None:
        if not self.use_bar:
            super().on_poll()
            return
        model = self.model
        if model.first_step_at is None:
            return  # no steps yet: nothing a bar can count
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=model.total_steps, initial=model.initial_step, unit="step",
                             desc=f"tfos {model.job}", dynamic_ncols=True, file=sys.stderr)
        bar = self._bar
        if model.total_steps is not None and bar.total != model.total_steps:
            bar.total = model.total_steps  # known once the first epoch ends
        loss = model.loss.get(0)
        parts = [f"epoch {model.epoch}/{model.epochs}", f"loss {loss.y[-1]:.4g}" if loss and loss.y else "",
                 f"{model.rows_per_s:,.0f} rows/s" if model.rows_per_s else ""]
        bar.set_postfix_str(", ".join(p for p in parts if p), refresh=False)
        bar.update(max(0, model.step - bar.n))

    def on_end(self, state: dict[str, Any]) -> None:
        if self._bar is not None:
            self.on_poll()  # the last steps, then the bar stays as it ended
            self._bar.close()
            self._bar = None
        super().on_end(state)


class StoreFollower:
    """Shows the jobs that another process (the notebook's kernel) runs, read from the job
    store: each run that starts after `since` in the process `driver_pid()` names (when it
    names one: other kernels may share the store) gets a view from `make_view`, fed the
    run's events from metrics.jsonl as they are appended, and ended when state.json says so.

    Runs in a daemon thread, polling every FOLLOW_S seconds; `close()` reads what is left
    and ends the views of runs that ended."""

    def __init__(self, store: JobStore, since: float, make_view: Callable[[JobSpec], JobObserver],
                 driver_pid: Callable[[], int | None] = lambda: None, interval: float = FOLLOW_S) -> None:
        self.store, self.since, self.make_view, self.interval = store, since, make_view, interval
        self.driver_pid = driver_pid
        self._runs: dict[str, _Followed] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tfos-follow", daemon=True)

    def start(self) -> "StoreFollower":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.poll()

    def followed(self) -> list[str]:
        """The jobs that ran while this follower watched, in the order they started."""
        return list(self._runs)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - progress must never stop the run it shows
                print(f"tfos: cannot follow the job store ({exc})", file=sys.stderr)

    def poll(self) -> None:
        for name in self.store.names():
            state = self.store.read_state(name) or {}
            if (state.get("started") or 0) < self.since or state.get("state") == "registered":
                continue
            pid = self.driver_pid()
            if pid is not None and state.get("driver_pid") != pid:
                continue
            run = self._runs.get(name)
            if run is None or run.number != state.get("run"):
                run = self._runs[name] = _Followed(state.get("run"), self.make_view(self.store.load_spec(name)))
                run.view.on_start(dict(state, job=name))
            run.read(self.store, name)
            if state.get("state") == "running":
                run.view.on_poll()
            elif not run.ended:
                run.ended = True
                run.view.on_end(state)


class _Followed:
    """One run being followed: its view and where its metrics.jsonl was read to."""

    def __init__(self, number: int | None, view: JobObserver) -> None:
        self.number, self.view, self.ended = number, view, False
        self.cursor = (0, 0)

    def read(self, store: JobStore, name: str) -> None:
        events, self.cursor = store.events_after(name, self.cursor)
        for event in events:
            if event.get("run") != self.number:
                continue
            if event.get("kind") == "log":
                self.view.on_log(log_line(event))
            else:
                self.view.on_event(event)

