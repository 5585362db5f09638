"""The cell's own Keras callbacks (`callbacks()`), in a loop that calls `fit` once an epoch.

The epoch loop (keras_fit.py) runs `fit` one epoch at a time, so that every epoch can
agree its steps across workers. A Keras callback expects one `fit`: EarlyStopping and
ReduceLROnPlateau reset their counters in `on_train_begin`, so they would never wait
long enough to act. Each user callback is wrapped to see one training: its
`on_train_begin` once, its `on_train_end` when the loop ends. The logs they see are
the job's: under MultiWorkerMirroredStrategy Keras all-reduces the metrics it logs, so
every worker takes the same decision at the same epoch (stop, or a new learning rate).
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from ..errors import TfosError
from ..protocol.keras_kinds import LEGACY, describe, kind_of


class OneTraining(tf.keras.callbacks.Callback):
    """A user callback across the loop's `fit` calls; notes which one stopped training."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self._began = False
        self.stopped: str | None = None  # why this callback stopped training, when it did
        self._supports_tf_logs = getattr(inner, "_supports_tf_logs", False)

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params: Any) -> None:
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs: Any = None) -> None:
        if not self._began:
            self._began = True
            self.inner.on_train_begin(logs)

    def on_train_end(self, logs: Any = None) -> None:
        """Held back: `finish()` calls it once the loop is over."""

    def finish(self, logs: Any = None) -> None:
        if self._began:
            self.inner.on_train_end(logs)

    @property
    def restores_weights(self) -> bool:
        """Whether its end of training puts earlier weights back (restore_best_weights)."""
        return bool(getattr(self.inner, "restore_best_weights", False)) and \
            getattr(self.inner, "best_weights", None) is not None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.inner.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        before = bool(self.model.stop_training)
        self.inner.on_epoch_end(epoch, logs)
        if self.model.stop_training and not before:
            self.stopped = describe_stop(self.inner, epoch)

    # Batch hooks only where the callback has them: Keras skips the per-step calls
    # (and their host syncs) for callbacks that do not override them.
    def _implements_train_batch_hooks(self) -> bool:
        return acts_per_step(self.inner)

    def _implements_test_batch_hooks(self) -> bool:
        return acts_per_step(self.inner, "test")

    def _implements_predict_batch_hooks(self) -> bool:
        return False

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.inner.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.inner.on_train_batch_end(batch, logs)

    def on_test_begin(self, logs: Any = None) -> None:
        self.inner.on_test_begin(logs)

    def on_test_end(self, logs: Any = None) -> None:
        self.inner.on_test_end(logs)

    def on_test_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.inner.on_test_batch_begin(batch, logs)

    def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
        self.inner.on_test_batch_end(batch, logs)


def acts_per_step(callback: Any, mode: str = "train") -> bool:
    """Whether a callback has per-step hooks (Keras skips the calls, and their host syncs,
    for callbacks that have none). Legacy callbacks say so themselves; a Keras 3 one does
    when its class overrides a batch hook."""
    known = getattr(callback, f"_implements_{mode}_batch_hooks", None)
    if known is not None:
        return bool(known())
    import keras

    names = [f"on_{mode}_batch_begin", f"on_{mode}_batch_end"] + (["on_batch_begin", "on_batch_end"]
                                                                   if mode == "train" else [])
    return any(getattr(type(callback), n, None) is not getattr(keras.callbacks.Callback, n) for n in names)


def describe_stop(callback: Any, epoch: int) -> str:
    """Why `callback` stopped training after `epoch` (0-based), in words for the dashboard."""
    name = type(callback).__name__
    monitor = getattr(callback, "monitor", None)
    patience = getattr(callback, "patience", None)
    if monitor is not None and patience is not None:
        waited = getattr(callback, "wait", patience)  # epochs without improvement, as it counted them
        best = getattr(callback, "best", None)
        best_text = f", best {best:.4g}" if isinstance(best, float) else ""
        restored = " Its best weights were restored." if getattr(callback, "restore_best_weights", False) else ""
        return (f"{name}: {monitor} did not improve for {waited} epoch{'s' if waited != 1 else ''} "
                f"(patience {patience}{best_text}).{restored}")
    return f"{name} set model.stop_training after epoch {epoch + 1}."


def build(callbacks: Callable[[], Any] | None, kind: str = LEGACY) -> list[OneTraining]:
    """The cell's `callbacks()`, each wrapped; none when the cell defines no such function.
    They must come from the Keras of the model (`kind`): each Keras' callbacks read and set
    its own models' attributes."""
    if callbacks is None:
        return []
    made = callbacks()
    made = [] if made is None else list(made) if isinstance(made, (list, tuple)) else [made]
    wrong = [describe(c) for c in made if kind_of(c) != kind or not hasattr(c, "on_epoch_end")]
    if wrong:
        prefix = "tf.keras" if kind == LEGACY else "keras"
        raise TfosError(f"callbacks() must return a list of {prefix} callbacks for this model (a "
                        f"{'legacy tf.keras' if kind == LEGACY else 'Keras 3'} model); it returned {', '.join(wrong)}. "
                        f"Build them from {prefix}.callbacks (EarlyStopping, ReduceLROnPlateau, ...) or subclass "
                        f"{prefix}.callbacks.Callback.")
    return [OneTraining(c) for c in made]


def stopped_by(wrapped: list[OneTraining]) -> str | None:
    return next((w.stopped for w in wrapped if w.stopped), None)
