"""Checkpoints in the job's checkpoint dir, any path tf.io.gfile handles.

Under MultiWorkerMirroredStrategy every worker must take part in a save, but only the
chief's copy is kept: the others write to a private temp dir that is thrown away.
Checkpoints are numbered by global step, and the number of finished epochs is saved
with them, so a restart resumes at the saved step and epoch.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Callable

import tensorflow as tf

from ..errors import TfosError
from ..protocol.paths import CHECKPOINT_PREFIX, H5_MODEL_FILE, MODEL_FILE, join_uri, local_path, unshared_checkpoint_dir

Notify = Callable[[str, int, int, str], None]  # path, step, epoch, reason


def clear(directory: str) -> None:
    """Remove this project's checkpoint files (for --restart), leaving anything else alone."""
    if not tf.io.gfile.isdir(directory):
        return
    for name in tf.io.gfile.listdir(directory):
        if name.startswith(f"{CHECKPOINT_PREFIX}-") or name in ("checkpoint", MODEL_FILE, H5_MODEL_FILE):
            path = join_uri(directory, name)
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            else:
                tf.io.gfile.remove(path)


def ensure_writable(directory: str) -> None:
    """Checked by the chief before training: the driver cannot check an hdfs:// or s3:// dir."""
    probe = join_uri(directory, ".tfos-write-test")
    try:
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as exc:
        raise TfosError(
            f"The checkpoint dir {directory!r} is not writable from the workers "
            f"({getattr(exc, 'message', exc)}). Pass a --checkpoint-dir every executor can write to."
        ) from None


def check_shared(directory: str, marker: str | None, who: str) -> None:
    """On a cluster, the kernel's marker in an hdfs://, s3a:// or gs:// checkpoint dir
    must be visible here too (the Spark task checked a local path already)."""
    if not marker or local_path(marker) is not None:
        return
    try:
        seen = tf.io.gfile.exists(marker)
    except (tf.errors.OpError, OSError) as exc:
        raise TfosError(unshared_checkpoint_dir(directory, f"{who} ({getattr(exc, 'message', exc)})")) from None
    if not seen:
        raise TfosError(unshared_checkpoint_dir(directory, who))


def incomplete(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be restored (missing or truncated files, a bad
    checksum), or None when every tensor in it reads back."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 - a truncated file raises IndexError, a bad one DataLossError...
        return f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
    return None


def latest_complete(directory: str, say: Callable[[str], None] | None = print) -> str | None:
    """The newest checkpoint of `directory` that reads back whole. One that was half
    written or truncated (a full disk, a crash during a save) is skipped for the one
    before it, with a warning naming both."""
    state = tf.train.get_checkpoint_state(directory)
    candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
    if state and state.model_checkpoint_path and state.model_checkpoint_path not in candidates:
        candidates.insert(0, state.model_checkpoint_path)
    skipped: list[str] = []
    for path in candidates:
        reason = incomplete(path)
        if reason is None:
            if skipped and say is not None:
                say(f"tfos: warning: checkpoint {skipped[0]} is incomplete or corrupt ({skipped[1]}); "
                    f"resuming from the previous one, {path}")
            return path
        if not skipped:
            skipped = [path, reason.splitlines()[0][:300]]
    if skipped and say is not None:
        say(f"tfos: warning: no usable checkpoint in {directory}: {skipped[0]} is incomplete or corrupt "
            f"({skipped[1]}) and there is no complete one before it; training starts from the beginning")
    return None


def unnamed_weights(objects: Any) -> list[str]:
    """The layers among `objects` (models, optimizers) holding a weight made by add_weight()
    without a name: TensorFlow's checkpoints cannot name it, and fail with an AttributeError
    that says nothing of the layer."""
    found = []
    for obj in objects:
        for layer in getattr(obj, "_flatten_layers", lambda: [])():
            if any(ref.name is None for ref in getattr(layer, "_self_unconditional_checkpoint_dependencies", [])):
                found.append(f"{layer.name!r} ({type(layer).__name__})")
    return found


def _check_named(objects: Any) -> None:
    unnamed = unnamed_weights(objects)
    if unnamed:
        raise TfosError(f"The layer {', '.join(unnamed)} makes a weight with add_weight() and no name, and TensorFlow "
                        "cannot checkpoint a weight without one. Name it: self.add_weight(name=\"kernel\", "
                        "shape=...).")


class Checkpointer:
    def __init__(self, directory: str, is_chief: bool, notify: Notify | None = None,
                 max_to_keep: int = 3, failpoint: Any = None, **objects: Any) -> None:
        self._failpoint = failpoint
        self.directory = directory
        self.is_chief = is_chief
        self._notify = notify
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfos_epoch")
        # The global step at which the current epoch began (-1: not known, e.g. an older
        # checkpoint): a resume mid-epoch skips the steps the epoch had already taken.
        self.epoch_start = tf.Variable(-1, dtype=tf.int64, trainable=False, name="tfos_epoch_start")
        _check_named(objects.values())  # a built model is checked before it trains
        self._objects = list(objects.values())
        self.checkpoint = tf.train.Checkpoint(tfos_epoch=self.epoch, tfos_epoch_start=self.epoch_start, **objects)
        self._tmp = None if is_chief else tempfile.mkdtemp(prefix="tfos-ckpt-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory if is_chief else self._tmp,
            max_to_keep=max_to_keep, checkpoint_name=CHECKPOINT_PREFIX)

    def restore(self) -> str | None:
        """Load the latest complete checkpoint of the shared dir, if any; return its path."""
        latest = latest_complete(self.directory, print if self.is_chief else None)
        if latest:
            self.checkpoint.restore(latest).expect_partial()
        return latest

    def save(self, step: int, epoch: int | None = None, reason: str = "schedule") -> str:
        """Every worker calls this at the same step (MWMS saves run collectives). `reason` is
        "schedule" (--checkpoint-every-steps), "epoch" or "stop"."""
        if epoch is not None:  # an epoch boundary: the next epoch begins at this step
            self.epoch.assign(epoch)
            self.epoch_start.assign(step)
        if self._failpoint is not None:
            self._failpoint.hit("checkpoint")
        try:
            path = self.manager.save(checkpoint_number=step)
        except AttributeError:
            _check_named(self._objects)  # a model built in fit() is only checked here
            raise
        if self.is_chief and self._notify is not None:
            self._notify(path, int(step), int(self.epoch.numpy()), reason)
        return path

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
