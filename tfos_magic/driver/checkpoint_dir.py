"""Runs in the notebook's kernel: where a job's checkpoints and model go, and whether
every executor sees that place, checked before the job starts.

On a cluster each TF worker writes and restores checkpoints in the checkpoint dir, and
the kernel loads the trained model from it. A folder on the kernel's own disk is, on
every other host, another folder: the job would "succeed" with a model the kernel
cannot load, and after a restart the workers would restore different steps. So on a
non-local master the kernel writes a marker file there and a small barrier job looks
for it on every task slot; each training task looks again before it starts (an
hdfs://, s3a:// or gs:// dir is checked by the TF processes, through tf.io.gfile).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile

from ..errors import TfosError
from ..job import JobStore
from ..protocol.logs import native_stderr_held
from ..protocol.paths import join_uri, local_path, unshared_checkpoint_dir
from ..task.visibility import probe
from .observers import JobObserver
from .spark_backend import SparkBackend, SparkJob

# A site's default for every job's checkpoint dir: each job gets `$TFOS_CHECKPOINT_ROOT/<job>`.
ROOT_ENV = "TFOS_CHECKPOINT_ROOT"
MARKER_PREFIX = ".tfos-visible-"
# The visibility check needs every task slot at once; a cluster busy with other jobs
# may not give them: then the training tasks' own check has to do.
PROBE_WAIT_S = 60.0


def checkpoint_dir_for(given: str | None, store: JobStore, name: str) -> str:
    """--checkpoint-dir, else the site's root with the job's name, else the job's folder in the store."""
    if given:
        return given
    root = os.environ.get(ROOT_ENV, "").strip()
    if root:
        return join_uri(root, name)
    return store.default_checkpoint_dir(name)


def check_writable(path: str) -> None:
    """A local path (or file:// URI) is checked here; other URIs by the chief worker."""
    local = local_path(path)
    if local is None:
        return
    try:
        os.makedirs(local, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local, prefix=".tfos-write-test-"):
            pass
    except OSError as exc:
        raise TfosError(
            f"The checkpoint dir {path!r} is not writable ({exc.strerror or exc}). Pass a writable "
            "--checkpoint-dir (any path tf.io.gfile handles), or leave it out to use the job's directory."
        ) from None


class VisibilityMarker:
    """A file the kernel writes into the checkpoint dir for the executors to look for;
    removed when the run ends."""

    def __init__(self, checkpoint_dir: str) -> None:
        self.path = join_uri(checkpoint_dir, MARKER_PREFIX + secrets.token_hex(8))
        local = local_path(self.path)
        if local is not None:
            with open(local, "w") as f:
                f.write("tfos-magic: every executor must see this file\n")
        else:
            with native_stderr_held():
                import tensorflow as tf
            try:
                tf.io.gfile.makedirs(checkpoint_dir)
                with tf.io.gfile.GFile(self.path, "w") as f:
                    f.write("tfos-magic: every executor must see this file\n")
            except (tf.errors.OpError, OSError) as exc:
                raise TfosError(f"The kernel cannot write to the checkpoint dir {checkpoint_dir!r} "
                                f"({getattr(exc, 'message', exc)}). Pass a --checkpoint-dir the kernel and every "
                                "executor can write to.") from None

    def remove(self) -> None:
        local = local_path(self.path)
        try:
            if local is not None:
                os.unlink(local)
            else:
                import tensorflow as tf

                tf.io.gfile.remove(self.path)
        except Exception:  # noqa: BLE001 - a leftover marker is harmless
            pass


def check_visible(backend: SparkBackend, checkpoint_dir: str, marker: VisibilityMarker, group: str,
                  observers: JobObserver) -> None:
    """On a cluster, refuse a checkpoint dir that an executor does not see, naming it."""
    local = local_path(marker.path)
    if local is None:  # an hdfs://, s3a:// or gs:// dir: the TF processes look with tf.io.gfile
        return
    slots = backend.task_slots()
    if slots is None:
        observers.on_log("tfos: note: this session does not tell how many task slots the cluster has, so the "
                         "checkpoint dir is not checked on every executor beforehand; each training task checks it "
                         "as it starts.")
        return
    job = SparkJob(backend, group, "tfos: does every executor see the checkpoint dir?",
                   backend.barrier_tasks(slots, probe(local)))
    if not job.wait(PROBE_WAIT_S) or job.error is not None:
        why = "the cluster's task slots are busy" if job.running else str(job.error).strip().splitlines()[0][:300]
        job.cancel()
        observers.on_log(f"tfos: note: could not check that every executor sees the checkpoint dir ({why}); each "
                         "training task checks it as it starts.")
        return
    reports = [json.loads(row) for row in job.result or []]
    blind = sorted({f"{r['executor']} ({r['host']})" for r in reports if not r["sees"]})
    if blind:
        raise TfosError(unshared_checkpoint_dir(checkpoint_dir, "the executors on " + ", ".join(blind)))
