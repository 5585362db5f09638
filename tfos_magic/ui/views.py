"""Which views a job gets: the live widget in a notebook, text in a terminal."""

from __future__ import annotations

import os
from typing import Any

from ..driver.observers import JobObserver, Observers
from ..job import JobSpec


def observers_for(shell: Any, spec: JobSpec, spark: Any = None, has_validation: bool = False) -> Observers:
    """The dashboard where a notebook front end can show it (TFOS_DASHBOARD=0 turns it off),
    else plain text with a progress line every 10 s."""
    opts = spec.options
    ps = opts.ps if opts.strategy == "ps" else 0
    views: list[JobObserver] = []
    from .widget import frontend_available

    if os.environ.get("TFOS_DASHBOARD", "1") != "0" and frontend_available(shell):
        from .widget import DashboardObserver

        ui = None
        if spark is not None:
            ui = spark.sparkContext.uiWebUrl
        views.append(DashboardObserver(spec.name, epochs=opts.epochs, workers=opts.workers, ps=ps,
                                       has_validation=has_validation, spark_ui=ui))
    else:
        from .text import TextObserver

        views.append(TextObserver(spec.name, epochs=opts.epochs, workers=opts.workers, ps=ps))
    return Observers(views)
