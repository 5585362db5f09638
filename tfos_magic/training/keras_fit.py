"""The high-level path: build the user's model in the strategy scope and run `fit`."""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any, Callable

import tensorflow as tf

from ..errors import TfosError
from ..protocol.paths import MODEL_FILE
from ..protocol.keras_kinds import LEGACY
from . import keras3_loop, model_check, model_inputs, user_callbacks
from .context import Throttle, TrainContext, check_finite

UNBOUNDED_STEPS = 2**31 - 1
CALL_S = 0.05  # seconds of training one call aims at when tfos sizes the steps a call
MAX_STEPS_PER_CALL = 100
MIN_TIMED_STEPS = 20  # an epoch shorter than this does not size the steps a call
TENSORBOARD_EVERY_STEPS = 50
NO_WEIGHTS = ("The model has no trainable weights, so training would change nothing. Check that "
              "build_model() returns the model it built, with layers that have weights (e.g. Dense), "
              "and that they are not frozen (trainable=False).")


class TfosCallback(tf.keras.callbacks.Callback):
    """Reports step and epoch metrics to the driver and checkpoints on schedule.

    It costs the step loop no host sync: the step is counted here from the epoch's first
    step (read once an epoch) and Keras' batch index, and the logs stay tensors
    (`_supports_tf_logs`) until a report is due, about once a second; the loss's
    finiteness is checked then and at each epoch's end. With `steps_per_execution=k`
    Keras calls this every k steps, so checkpoints fall on the first call at or past
    each multiple of --checkpoint-every-steps (the same step on every worker).
    """

    def __init__(self, ctx: TrainContext, ckpt, every_steps: int, report_lr: bool = False) -> None:
        super().__init__()
        self.report_lr = report_lr  # the cell's callbacks may change it: each epoch's row says what it was
        self._supports_tf_logs = True
        self.ctx = ctx
        self.ckpt = ckpt
        self.every_steps = every_steps
        self.throttle = Throttle(1.0)
        self._rows0 = 0
        self._t0 = time.monotonic()
        self._epoch = 0
        self._epoch_step0 = 0
        self._last_step = 0
        self._weights_checked = False
        self._reported = (0, 0.0)  # steps into the epoch and the running mean at the last report
        self._rows_per_step = ctx.rows_per_step
        self.step_seconds: float | None = None  # a step's wall time in the first timed epoch

    def _read_step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._rows0, self._t0 = self.ctx.feed.rows_delivered, time.monotonic()
        self._epoch = epoch
        self._epoch_step0 = self._last_step = self._read_step()
        self._reported = (0, 0.0)

    def _interval_loss(self, step: int, running: float) -> float:
        """The mean loss of the steps since this epoch's last report. Keras logs the running
        mean since the epoch began, which drops at every epoch's start as it forgets the
        early, larger losses: plotted, a cliff at each boundary. The interval's own mean
        follows the loss as it is (steps weigh alike: Keras' batches are full but the last)."""
        done = step - self._epoch_step0
        before, mean_before = self._reported
        self._reported = (done, running)
        if done <= before:
            return running
        return (running * done - mean_before * before) / (done - before)

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.ctx.failpoint.hit("validation")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self._weights_checked:  # after a first step: a model without an Input is built by it
            self._weights_checked = True
            if not self.model.trainable_weights:
                raise TfosError(NO_WEIGHTS)
        step = self._epoch_step0 + batch + 1
        last, self._last_step = self._last_step, step
        self.ctx.feed.trained((batch + 1) * self._rows_per_step)
        if self._epoch == 0:
            self.ctx.failpoint.hit("streaming")
        if self.ctx.should_stop(step):
            self.ctx.stop_here(self.ckpt, step)
        if self.every_steps and step // self.every_steps > last // self.every_steps:
            self.ckpt.save(step)
        if self.throttle():
            values = {k: _python(v) for k, v in (logs or {}).items()}
            check_finite(values.get("loss"), step, self.ctx.worker_index, self.ctx.checkpoint_dir)
            if isinstance(values.get("loss"), (int, float)):
                values["loss_epoch_mean"] = values["loss"]
                values["loss"] = self._interval_loss(step, float(values["loss"]))
            elapsed = max(time.monotonic() - self._t0, 1e-9)
            rate = (self.ctx.feed.rows_delivered - self._rows0) / elapsed
            self.ctx.report(step=step, rows_per_s=rate, **values)

    def _report_tail(self, step: int, running: Any) -> None:
        """The steps since the epoch's last report, as the curve's last point of the epoch:
        without it the curve skips each epoch's tail (the last second or so, or a whole short
        epoch), and the next epoch's first point, a step or two in, stands for it."""
        if not isinstance(running, (int, float)) or step - self._epoch_step0 <= self._reported[0]:
            return
        self.ctx.report(step=step, loss=self._interval_loss(step, float(running)), loss_epoch_mean=running)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # The tail at the batches' own count, as the epoch's step events were.
        self._report_tail(self._last_step, _python((logs or {}).get("loss")))
        step = self._read_step()
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        if self.step_seconds is None and step - self._epoch_step0 >= MIN_TIMED_STEPS:
            self.step_seconds = elapsed / (step - self._epoch_step0)
        metrics = {k: _python(v) for k, v in (logs or {}).items()}
        check_finite(metrics.get("loss"), step, self.ctx.worker_index, self.ctx.checkpoint_dir)
        metrics["rows_per_s"] = (self.ctx.feed.rows_delivered - self._rows0) / elapsed
        if self.report_lr:
            metrics["lr"] = _learning_rate(self.model.optimizer)
        self.ctx.report(step=step, epoch=epoch + 1, **metrics)
        self.ckpt.save(step, epoch=epoch + 1, reason="epoch")


def _learning_rate(optimizer: Any) -> float | None:
    """The optimizer's learning rate now (None for a schedule, which has no one value)."""
    rate = getattr(optimizer, "learning_rate", None)
    try:
        return float(rate.numpy() if hasattr(rate, "numpy") else rate)  # a variable of either Keras
    except (TypeError, ValueError, AttributeError):
        return None


def _python(value: Any) -> Any:
    """A log value as a Python number (Keras hands tensors to callbacks that take them)."""
    return value.numpy().item() if hasattr(value, "numpy") else value


def tensorboard_installed() -> bool:
    """TF's summaries need the tensorboard package; without it, training goes on without logs."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        print("tfos: tensorboard is not installed: no TensorBoard logs for this job", flush=True)
        return False
    return True


def fit(build_model: Callable[[], Any], ctx: TrainContext, restart: bool,
        make_callbacks: Callable[[], Any] | None = None) -> Any:
    """Train the cell's model one epoch a call; `make_callbacks` is the cell's `callbacks()`.

    A legacy tf.keras model trains with Keras' `fit`; a Keras 3 model with the step loop
    of keras3_loop.py (its `fit` fails under MultiWorkerMirroredStrategy). Both run the
    same epochs: steps agreed across workers, the same callback reporting and saving."""
    with ctx.strategy.scope():
        model = ctx.build(build_model)
        kind = keras3_loop.check_model(model)
        if getattr(model, "optimizer", None) is None:
            raise TfosError("build_model() must return a compiled model: call model.compile(optimizer=..., "
                            "loss=...) before returning it.")
        model_inputs.check(model, ctx.feed.spec)
    trainer: Any = LegacyFit(model) if kind == LEGACY else keras3_loop.StepLoop(model, ctx.strategy)
    if kind != LEGACY:
        trainer.build(ctx.feed.batch_spec())
    with ctx.strategy.scope():
        ckpt = ctx.checkpoint(model=model, optimizer=model.optimizer)
        restored = None if restart else ckpt.restore()
        initial_step = trainer.iterations
    initial_epoch = int(ckpt.epoch.numpy())
    epoch_start = int(ckpt.epoch_start.numpy())
    done_in_epoch = initial_step - epoch_start if restored and 0 <= epoch_start <= initial_step else 0
    if done_in_epoch:
        ctx.feed.skip_next_pass(done_in_epoch * ctx.rows_per_step)  # go on where the epoch was
    # TensorBoard's event files: the chief's, for `%tensorboard --logdir` (the summary says the line).
    board_dir = ctx.log_dir if ctx.is_chief and ctx.log_dir and tensorboard_installed() else None
    ctx.send("training", initial_step=initial_step, initial_epoch=initial_epoch, restored_from=restored,
             skipped_steps=done_in_epoch, **({"tensorboard": board_dir} if board_dir else {}))
    data = ctx.distributed_dataset()
    padded = None  # later passes: a fixed number of steps, agreed once per epoch
    val = ctx.distributed_dataset(split="validation") if ctx.feed.spec.has_validation else None
    # The cell's callbacks come first, so that what they change at an epoch's end (the
    # learning rate, a stop) is in that epoch's row and checkpoint.
    mine = user_callbacks.build(make_callbacks, kind)
    tfos_callback = TfosCallback(ctx, ckpt, ctx.options.checkpoint_every_steps, report_lr=bool(mine))
    callbacks: list[Any] = [*mine, tfos_callback]
    if board_dir:  # the chief only, and no profiling
        board = tf.keras.callbacks.TensorBoard if kind == LEGACY else _keras3().callbacks.TensorBoard
        callbacks.append(board(board_dir, update_freq=TENSORBOARD_EVERY_STEPS, profile_batch=0, write_graph=False))
    for callback in callbacks:
        callback.set_model(model)
    user_k = trainer.user_steps_per_call
    size_calls = (ctx.options.steps_per_call == 0 and trainer.sizable and user_k == 1
                  and not any(c._implements_train_batch_hooks() for c in mine))
    sparse = any(type(layer).__name__ == "Embedding" for layer in _layers(model))
    told = False
    for epoch in range(initial_epoch, ctx.epochs):
        if not (epoch == initial_epoch and done_in_epoch):
            ckpt.epoch_start.assign(trainer.iterations)
        steps, full = agreed_steps(ctx)
        if steps == 0:  # every worker's rows of this epoch were trained on before a restart
            _finish_epoch(trainer, ctx, ckpt, val, epoch)
            continue
        ctx.feed.epoch = epoch  # which shuffled order this pass takes
        if steps is not None and (padded is None or ctx.feed.from_memory()):
            # From memory a new dataset each epoch, in that epoch's order (ArrowFeed.memory_pass).
            padded = ctx.strategy.distribute_datasets_from_function(
                lambda _ctx: ctx.feed.padded_dataset(ctx.batch_size))
        # Several steps a call break the all-gather of embedding gradients across workers
        # when batch sizes change within one call (a shape mismatch in CollectiveGatherV2,
        # also without tfos): a streamed pass runs one step a call, and so does a model with
        # embeddings unless every batch of the pass is full.
        several = ctx.num_workers == 1 or (steps is not None and (full or not sparse))
        k = ctx.options.steps_per_call or user_k
        if size_calls and several:
            # Each worker timed its own steps; every worker must run the same steps a call, or
            # their collectives (and an agreed stop step) no longer pair up.
            k = min(every_worker(ctx, steps_per_call(k, tfos_callback.step_seconds)))
            if k != user_k and not told:
                told = True
                print(f"tfos: a step took {tfos_callback.step_seconds * 1000:.1f} ms: later epochs run {k} steps "
                      "a call (--steps-per-call)", flush=True)
        try:
            trainer.run_epoch(data if steps is None else padded, epoch, steps, k if several else 1, callbacks,
                              validation=val)
        except (ValueError, TypeError) as exc:  # raised while tracing the first step
            if epoch == initial_epoch and done_in_epoch and ctx.feed.last_pass_rows == 0:
                # The checkpoint was the epoch's last step: only its end is left to do.
                _finish_epoch(trainer, ctx, ckpt, val, epoch)
                continue
            explained = model_inputs.explain(exc, model, ctx.feed.spec) if epoch == initial_epoch else None
            if explained is None:
                raise
            raise explained from exc
        # The callbacks saw the same job-level logs on every worker; the workers still agree
        # the stop, so that none goes on alone into a collective the others never join.
        if mine and epoch + 1 < ctx.epochs and max(every_worker(ctx, int(bool(model.stop_training)))):
            why = user_callbacks.stopped_by(mine) or "another worker's callback stopped training"
            ctx.send("stopped_early", epoch=epoch + 1, epochs=ctx.epochs, reason=why)
            break
    trainer.finish()  # the model's own steps a call, as it is saved; the Keras 3 callbacks' end of training
    for callback in mine:
        callback.finish()
    if any(callback.restores_weights for callback in mine):
        # EarlyStopping(restore_best_weights=True) put the best epoch's weights back at the
        # end: the latest checkpoint holds them too, as the saved model will.
        ckpt.save(trainer.iterations, reason="best")
    ctx.feed.drain()  # e.g. already trained to --epochs: let the Spark task finish its partition
    return model


class LegacyFit:
    """A legacy tf.keras model's epochs: Keras' own `fit`, one epoch a call, with the steps
    a call set through the variable its `compile(steps_per_execution=)` made."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._per_execution = _steps_per_execution(model)
        self.user_steps_per_call = 1 if self._per_execution is None else int(self._per_execution.numpy())
        self.sizable = self._per_execution is not None  # autotuned: left to Keras, never sized by tfos

    @property
    def iterations(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def run_epoch(self, data: Any, epoch: int, steps: int | None, steps_per_call: int, callbacks: list[Any],
                  validation: Any = None) -> None:
        _use_steps_per_execution(self.model, self._per_execution, steps_per_call)
        self.model.fit(data, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps or UNBOUNDED_STEPS,
                       validation_data=validation, validation_steps=UNBOUNDED_STEPS if validation else None,
                       callbacks=callbacks, verbose=0)

    def evaluate(self, data: Any) -> dict[str, float]:
        return self.model.evaluate(data, steps=UNBOUNDED_STEPS, verbose=0, return_dict=True)

    def finish(self) -> None:
        _use_steps_per_execution(self.model, self._per_execution, self.user_steps_per_call)


def _keras3() -> Any:
    import keras

    return keras


def _layers(model: Any) -> list[Any]:
    """Every layer of `model`, nested ones included, in either Keras."""
    flatten = getattr(model, "_flatten_layers", None)
    return list(flatten()) if flatten else []


def steps_per_call(k: int, step_seconds: float | None) -> int:
    """Steps a call: `k`, or, given a step's time, as many as make about CALL_S seconds. A
    small model's step takes well under a millisecond in TensorFlow, and Keras' loop and the
    callbacks cost about as much again in Python each call: several steps a call (one
    tf.function running them in a loop) bring a later epoch to TensorFlow's own speed."""
    if step_seconds is None or step_seconds <= 0:
        return k
    return max(1, min(MAX_STEPS_PER_CALL, int(CALL_S / step_seconds)))


def _steps_per_execution(model: Any) -> Any:
    """The variable the user's compile() set (None when autotuned: then left to Keras)."""
    if getattr(model, "_autotune_steps_per_execution", False):
        return None
    return getattr(model, "_steps_per_execution", None)


def _use_steps_per_execution(model: Any, var: Any, n: int) -> None:
    if var is not None and int(var.numpy()) != n:
        var.assign(n)
        model.train_function = None  # rebuilt by the next fit: one step a call, or several


def every_worker(ctx: TrainContext, mine: int) -> list[int]:
    """Each worker's (and local replica's) `mine`, on every worker: one small all-gather."""
    if ctx.num_workers > 1 or ctx.strategy.num_replicas_in_sync > 1:
        return [int(v) for v in ctx.strategy.gather(ctx.strategy.run(lambda: tf.constant([mine], tf.int64)),
                                                     axis=0).numpy()]
    return [mine]


def agreed_steps(ctx: TrainContext) -> tuple[int | None, bool]:
    """The steps of this epoch, agreed by all workers in one all-gather (None while any
    worker still streams its partition from Spark: its row count is not known yet), and
    whether every batch of the pass is full on every worker (all batches one size).

    With None, the epoch is one unbounded `fit` pass that ends when every worker's data
    is exhausted: TF's distributed iterator agrees the end across workers at every step,
    so uneven or empty partitions cannot hang a collective, but each step pays for that
    agreement. Once every worker has its rows in its local spill, each knows how many
    batches its next pass holds; the epoch then takes the largest count, and a worker
    with fewer takes empty batches meanwhile (ArrowFeed.padded_dataset), as TF's own
    end-of-data handling feeds it, with no per-step agreement. (A streamed pass may take
    one step more: TF's agreement can end it with a step that is empty on every worker.)
    """
    rows = ctx.feed.next_pass_rows()
    every = every_worker(ctx, -1 if rows is None else rows)
    if min(every) < 0:
        return None, False
    steps = math.ceil(int(max(every)) / ctx.rows_per_step)
    return steps, min(every) == max(every) == steps * ctx.rows_per_step


def _finish_epoch(trainer: Any, ctx: TrainContext, ckpt: Any, val: Any, epoch: int) -> None:
    """Validation, the epoch's row of history and its checkpoint, for an epoch whose steps
    were all taken before a restart (its training loss went with the failed attempt)."""
    metrics: dict[str, Any] = {}
    if val is not None:
        metrics["val_loss"] = trainer.evaluate(val)["loss"]
    step = trainer.iterations
    ctx.report(step=step, epoch=epoch + 1, **metrics)
    ckpt.save(step, epoch=epoch + 1, reason="epoch")


def save_model(model: Any, ctx: TrainContext, source: str | None) -> None:
    """Every worker saves (saving may run collectives); only the chief's file is kept, and
    the chief checks that it loads back as the model it trained (`model_check`)."""
    ctx.failpoint.hit("final_save")
    if ctx.is_chief:
        path = ctx.checkpoint_path(MODEL_FILE)
        model_check.saved(path, lambda: model.save(path))
        outputs = model_check.check_loads(model, path, ctx.feed.sample(model_check.SAMPLE_ROWS), source, ctx.job)
        ctx.send("model", path=path, outputs=outputs)
        return
    with tempfile.TemporaryDirectory(prefix="tfos-model-") as tmp:
        # The same words as the chief's when Keras cannot save: any worker may report first.
        model_check.saved(ctx.checkpoint_path(MODEL_FILE), lambda: model.save(os.path.join(tmp, MODEL_FILE)))
