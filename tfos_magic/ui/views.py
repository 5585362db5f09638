"""Which views a job gets: the live widget in a notebook, text in a terminal."""

from __future__ import annotations

import os
from typing import Any

from ..driver.observers import JobObserver, Observers
from ..job import JobSpec


def observers_for(shell: Any, spec: JobSpec, spark: Any = None, has_validation: bool = False,
                  background: bool = False) -> Observers:
    """The dashboard where a notebook front end can show it (TFOS_DASHBOARD=0 turns it off),
    else plain text with a progress line every 10 s (not for a background run in a
    notebook: its prints would land in whatever cell runs then)."""
    opts = spec.options
    ps = opts.ps if opts.strategy == "ps" else 0
    views: list[JobObserver] = []
    from .widget import frontend_available

    if os.environ.get("TFOS_DASHBOARD", "1") != "0" and frontend_available(shell):
        from .widget import DashboardObserver

        ui = None
        if spark is not None:
            from ..driver.spark_backend import backend_for

            ui = backend_for(spark).ui_url()
        views.append(DashboardObserver(spec.name, epochs=opts.epochs, workers=opts.workers, ps=ps,
                                       has_validation=has_validation, spark_ui=ui))
    elif not (background and type(shell).__name__ == "ZMQInteractiveShell"):
        from .text import TextObserver

        views.append(TextObserver(spec.name, epochs=opts.epochs, workers=opts.workers, ps=ps))
    return Observers(views)


def replay(store: Any, name: str, shell: Any) -> JobObserver:
    """A view of a stored job built from its metrics.jsonl (the latest run), shown now."""
    spec = store.load_spec(name)
    state = store.read_state(name) or {}
    opts = spec.options
    view = observers_for(shell, spec, has_validation=bool(opts.validation_df)).observers[0]
    run = state.get("run")
    model = view.model
    model.attempt = int(state.get("attempt") or 1)
    model.job_group = state.get("job_group")
    if state.get("started"):
        model.started = float(state["started"])
    for event in store.events(name):
        if event.get("run") == run:
            model.feed(event)
    if hasattr(view, "show"):
        view.show()
    return view
