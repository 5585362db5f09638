"""tfos-magic: `%%spark_etl` + `%%tf_train` train TensorFlow on the notebook's Spark cluster.

Load it with `%load_ext tfos_magic`.

Where code runs shows in the layout: `magics`, `session`, `driver/` and `job/` run in
the notebook's kernel; `task/` runs in Spark tasks on the executors; `training/` runs
in the TF process each task starts; `protocol/` holds the formats they share. This
module imports nothing heavy, so a TF process that imports the package loads neither
Spark nor Jupyter.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from .errors import JobFailed, TfosError

# `tf.keras` is legacy Keras 2 in the workers (a legacy model trains with `fit`, which
# Keras 3 cannot run under MultiWorkerMirroredStrategy), and `keras` is Keras 3 there, as
# everywhere. A process that imports this package before TensorFlow (a kernel, a script
# calling get_job(...).load_model()) gets the same `tf.keras`, so a cell means the same
# in both places and a legacy model loads as trained (README: Keras 3 and legacy tf.keras).
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

if TYPE_CHECKING:
    from .job import Job

__version__ = "0.1.0"
__all__ = ["Job", "JobFailed", "TfosError", "get_job", "list_jobs", "load_ipython_extension"]


def __getattr__(name: str) -> Any:
    if name in ("Job", "JobStore"):
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module 'tfos_magic' has no attribute {name!r}")


def get_job(name: str, home: str | None = None) -> "Job":
    """The stored job `name`, readable from any process."""
    from .job import Job, JobStore

    return Job(name, JobStore(home))


def list_jobs(home: str | None = None) -> list[str]:
    from .job import JobStore

    return JobStore(home).names()


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The Jupyter server extension (the sidebar's REST API), named as a string so that
    importing the package never imports the server side."""
    return [{"module": "tfos_magic.server"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built JupyterLab extension is, for `jupyter-builder develop` in a source
    checkout (a wheel installs it as shared data instead)."""
    return [{"src": "labextension", "dest": "tfos-magic"}]


def _show_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> Any:
    """A TfosError is a message for the user, not a crash: show it without the stack."""
    return shell.showtraceback((etype, value, tb), exception_only=True)


def load_ipython_extension(ipython: Any) -> None:
    from .magics import TfosMagics

    ipython.register_magics(TfosMagics(ipython))
    ipython.set_custom_exc((TfosError,), _show_error)
