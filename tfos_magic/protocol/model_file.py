"""Loading a job's saved model in any process: the kernel, a Spark task, the chief's check.

The model loads with the train cell's definitions installed (`cell_definitions`), so
custom layers, subclassed models, losses and metrics resolve as they did in training.
`Lambda` layers hold Python code, which Keras' safe mode refuses to load; a job's own
model file is loaded with safe mode off only when it is trusted: a local file owned by
this user (or root) that neither group nor others may write, or a file on remote storage
the job's checkpoint dir names, whose permissions are the storage's (docs/security.md).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import stat
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import TfosError
from .cell_definitions import CellDefinitions
from .keras_kinds import LEGACY, saved_kind
from .logs import native_stderr_held
from .paths import TORCH_MODEL_FILE, local_path


@dataclass(frozen=True)
class ModelRef:
    """Which model to serve, as the kernel tells every task: the file, which save of it
    (`version`: a retrained job saves a new model at the same path), the train cell that
    defines its custom objects, and whether the kernel trusts the file with Python code
    (a `Lambda` layer); the executors may run as another user, so they cannot judge."""

    path: str
    version: str
    source: str | None
    job: str
    trusted: bool


class ModelNotLoadable(TfosError):
    """A saved model that does not load, or loads as a different model; the message says
    why and what to change in the cell."""


def trust_problem(path: str) -> str | None:
    """Why the model file at `path` may not run Python code when loaded, or None.

    Another user who could write the file could put any code in a `Lambda` layer."""
    local = local_path(path)
    if local is None:
        return None  # remote storage: its own permissions decide who writes there
    me = os.getuid()
    for where in (local, os.path.dirname(os.path.abspath(local))):
        try:
            info = os.stat(where)
        except OSError as exc:
            return f"{where} cannot be read ({exc.strerror})"
        if info.st_uid not in (me, 0):
            return f"{where} belongs to another user (uid {info.st_uid})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (info.st_mode & stat.S_ISVTX):
            return f"{where} may be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def load_model(path: str, source: str | None, job: str, compile: bool = True, trusted: bool | None = None) -> Any:
    """The Keras model saved at `path` by job `job` whose train cell is `source`, loaded
    with the Keras that wrote it: Keras 3 for a Keras 3 model, legacy tf.keras for the rest.

    `trusted` None checks the file here (`trust_problem`); a Spark task is told the
    kernel's answer, since it may run as another user. Failures raise ModelNotLoadable.
    A PyTorch job's `model.pt` loads as its module (torch_model.py), without TensorFlow."""
    if path.endswith(TORCH_MODEL_FILE):
        from . import torch_model

        return torch_model.load(path, source, job)
    if "tensorflow" not in sys.modules:  # a legacy cell's `tf.keras` must be the Keras its model was saved with
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    with native_stderr_held():
        import tensorflow as tf

        kind = saved_kind(path, tf.io.gfile.GFile)
        keras = importlib.import_module(kind)
    if kind == LEGACY and tf.keras.__name__.split(".")[0] != LEGACY:
        raise ModelNotLoadable(
            "This process imported TensorFlow with Keras 3 as tf.keras, but the job's model and its train cell are "
            "legacy tf.keras (tf_keras). Set TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported: load the "
            "extension (%load_ext tfos_magic) or import tfos_magic before tensorflow.")
    problem = trust_problem(path) if trusted is None else (None if trusted else "the kernel did not trust it")
    definitions = CellDefinitions(source, job) if source else None
    try:
        with definitions.installed() if definitions else contextlib.nullcontext(), keras.utils.custom_object_scope(
                definitions.custom_objects() if definitions else {}):
            return keras.models.load_model(path, compile=compile, safe_mode=problem is not None)
    except Exception as exc:  # noqa: BLE001 - every reason becomes one message with its fix
        raise ModelNotLoadable(why_not_loadable(path, exc, definitions, problem)) from exc


_MISSING = re.compile(r"Unknown (?:layer|loss function|metric function|object)[^']*'(\w+)'|"
                      r"Could not (?:locate|deserialize) (?:class|function) '(\w+)'")


def why_not_loadable(path: str, exc: BaseException, definitions: CellDefinitions | None,
                     trust: str | None = None) -> str:
    """One message: the file, Keras' own reason, and what to change."""
    text = " ".join(str(exc).split())[:400].rstrip(".") or type(exc).__name__  # Keras' reasons span lines
    reason = f"{type(exc).__name__}: {text}"
    if "Lambda" in str(exc) and trust:
        fix = (f"It holds a Lambda layer, whose Python code tfos runs only from a file that only you could have "
               f"written, and {trust}. Make the checkpoint dir yours and not writable by others "
               "(chmod go-w), or replace the Lambda with a custom layer.")
    elif (m := _MISSING.search(str(exc))):
        name = m.group(1) or m.group(2)
        fix = (f"{name!r} is not defined at the top level of the %%tf_train cell. Define it there (not inside "
               "build_model or train), so that it can be found wherever the model is loaded.")
    elif isinstance(exc, TypeError) and ("argument" in str(exc) or "not callable" in str(exc)):
        fix = ("A custom layer or model was rebuilt from its get_config() and that failed: give each custom "
               "class a get_config() that returns every argument of its __init__ (and takes them back in "
               "__init__ or from_config).")
    else:
        fix = ("Give each custom layer and model a get_config() that returns every argument of its __init__, "
               "and define custom classes and functions at the top level of the %%tf_train cell.")
    skipped = f" Definitions of the cell that failed to run here: {'; '.join(definitions.skipped)}." \
        if definitions and definitions.skipped else ""
    return f"The model saved at {path} cannot be loaded back: {reason}. {fix}{skipped}"
