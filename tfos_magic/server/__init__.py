"""Runs in the Jupyter server: the REST API the JupyterLab sidebar reads (docs/server-api.md).

It reads the job store that kernels write, and asks a running job to stop through the
store's stop-request file; it imports only `job/` and the shared formats, never Spark or
TensorFlow, so the server stays light and a job never runs in its process. The package
names this module as its server extension (`tfos_magic._jupyter_server_extension_points`);
the wheel enables it in `etc/jupyter/jupyter_server_config.d/tfos_magic.json`.
"""

from __future__ import annotations

from typing import Any

from ..job.store import JobStore
from .handlers import API, setup_handlers
from .views import JobViews


def _load_jupyter_server_extension(server_app: Any) -> None:
    """Add the API's routes to the running server, over the store in TFOS_HOME (as read
    when the server starts: the kernels it starts inherit the same environment)."""
    store = JobStore()
    setup_handlers(server_app.web_app, JobViews(store, server_app.root_dir))
    server_app.log.info("tfos_magic: job API at %s%s over %s", server_app.web_app.settings["base_url"], API,
                        store.jobs_dir)
