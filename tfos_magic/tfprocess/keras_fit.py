"""The high-level path: build the user's model in the strategy scope and run `fit`."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable

import tensorflow as tf

from ..errors import TfosError
from ..protocol.paths import MODEL_FILE
from . import model_inputs
from .context import Throttle, TrainContext, check_finite

UNBOUNDED_STEPS = 2**31 - 1
TENSORBOARD_EVERY_STEPS = 50
NO_WEIGHTS = ("The model has no trainable weights, so training would change nothing. Check that "
              "build_model() returns the model it built, with layers that have weights (e.g. Dense), "
              "and that they are not frozen (trainable=False).")


class TfosCallback(tf.keras.callbacks.Callback):
    """Reports step and epoch metrics to the driver and checkpoints on schedule."""

    def __init__(self, ctx: TrainContext, ckpt, every_steps: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.ckpt = ckpt
        self.every_steps = every_steps
        self.throttle = Throttle(1.0)
        self._rows0 = 0
        self._t0 = time.monotonic()
        self._epoch = 0

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._rows0, self._t0 = self.ctx.feed.rows_delivered, time.monotonic()
        self._epoch = epoch

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.ctx.failpoint.hit("validation")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self.model.trainable_weights:
            raise TfosError(NO_WEIGHTS)
        step = self._step()
        check_finite((logs or {}).get("loss"), step, self.ctx.worker_index, self.ctx.checkpoint_dir)
        if self._epoch == 0:
            self.ctx.failpoint.hit("streaming")
        if self.ctx.should_stop(step):
            self.ctx.stop_here(self.ckpt, step)
        if self.every_steps and step % self.every_steps == 0:
            self.ckpt.save(step)
        if self.throttle():
            elapsed = max(time.monotonic() - self._t0, 1e-9)
            rate = (self.ctx.feed.rows_delivered - self._rows0) / elapsed
            self.ctx.report(step=step, rows_per_s=rate, **(logs or {}))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        step = self._step()
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        metrics = dict(logs or {})
        metrics["rows_per_s"] = (self.ctx.feed.rows_delivered - self._rows0) / elapsed
        self.ctx.report(step=step, epoch=epoch + 1, **metrics)
        self.ckpt.save(step, epoch=epoch + 1, reason="epoch")


def tensorboard_installed() -> bool:
    """TF's summaries need the tensorboard package; without it, training goes on without logs."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        print("tfos: tensorboard is not installed: no TensorBoard logs for this job", flush=True)
        return False
    return True


def fit(build_model: Callable[[], Any], ctx: TrainContext, restart: bool) -> Any:
    with ctx.strategy.scope():
        model = build_model()
        if not isinstance(model, tf.keras.Model):
            raise TfosError(f"build_model() must return a tf.keras model, not {type(model).__name__}.")
        if getattr(model, "optimizer", None) is None:
            raise TfosError("build_model() must return a compiled model: call model.compile(optimizer=..., "
                            "loss=...) before returning it.")
        model_inputs.check(model, ctx.feed.spec)
        ckpt = ctx.checkpoint(model=model, optimizer=model.optimizer)
        restored = None if restart else ckpt.restore()
        initial_step = int(model.optimizer.iterations.numpy())
    initial_epoch = int(ckpt.epoch.numpy())
    epoch_start = int(ckpt.epoch_start.numpy())
    done_in_epoch = initial_step - epoch_start if restored and 0 <= epoch_start <= initial_step else 0
    if done_in_epoch:
        # Go on where the epoch was: each step took batch_size rows on each local replica.
        replicas = max(1, ctx.strategy.num_replicas_in_sync // max(1, ctx.num_workers))
        ctx.feed.skip_next_pass(done_in_epoch * ctx.batch_size * replicas)
    ctx.send("training", initial_step=initial_step, initial_epoch=initial_epoch, restored_from=restored,
             skipped_steps=done_in_epoch)
    data = ctx.distributed_dataset()
    val = ctx.distributed_dataset(split="validation") if ctx.feed.spec.has_validation else None
    callbacks: list[Any] = [TfosCallback(ctx, ckpt, ctx.options.checkpoint_every_steps)]
    if ctx.is_chief and ctx.log_dir and tensorboard_installed():
        # For `%tensorboard --logdir`; the chief only, and no profiling.
        callbacks.append(tf.keras.callbacks.TensorBoard(ctx.log_dir, update_freq=TENSORBOARD_EVERY_STEPS,
                                                        profile_batch=0, write_graph=False))
    for epoch in range(initial_epoch, ctx.epochs):
        if not (epoch == initial_epoch and done_in_epoch):
            ckpt.epoch_start.assign(int(model.optimizer.iterations.numpy()))
        # One fit call per epoch, each a full pass that ends when every worker's data is
        # exhausted: TF's distributed iterator agrees the end across workers each step, so
        # uneven or empty partitions cannot hang a collective. The step bound is never reached.
        try:
            model.fit(data, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=UNBOUNDED_STEPS,
                      validation_data=val, validation_steps=UNBOUNDED_STEPS if val else None,
                      callbacks=callbacks, verbose=0)
        except (ValueError, TypeError) as exc:  # raised while tracing the first step
            if epoch == initial_epoch and done_in_epoch and ctx.feed.last_pass_rows == 0:
                # The checkpoint was the epoch's last step: only its end is left to do.
                _finish_epoch(model, ctx, ckpt, val, epoch)
                continue
            explained = model_inputs.explain(exc, model, ctx.feed.spec) if epoch == initial_epoch else None
            if explained is None:
                raise
            raise explained from exc
    ctx.feed.drain()  # e.g. already trained to --epochs: let the Spark task finish its partition
    return model


def _finish_epoch(model: Any, ctx: TrainContext, ckpt: Any, val: Any, epoch: int) -> None:
    """Validation, the epoch's row of history and its checkpoint, for an epoch whose steps
    were all taken before a restart (its training loss went with the failed attempt)."""
    metrics: dict[str, Any] = {}
    if val is not None:
        metrics["val_loss"] = model.evaluate(val, steps=UNBOUNDED_STEPS, verbose=0, return_dict=True)["loss"]
    step = int(model.optimizer.iterations.numpy())
    ctx.report(step=step, epoch=epoch + 1, **metrics)
    ckpt.save(step, epoch=epoch + 1, reason="epoch")


def save_model(model: Any, ctx: TrainContext) -> None:
    """Every worker saves (saving may run collectives); only the chief's file is kept."""
    ctx.failpoint.hit("final_save")
    if ctx.is_chief:
        path = ctx.checkpoint_path(MODEL_FILE)
        model.save(path)
        ctx.send("model", path=path, outputs=model_inputs.output_width(model))
        return
    with tempfile.TemporaryDirectory(prefix="tfos-model-") as tmp:
        model.save(os.path.join(tmp, MODEL_FILE))
