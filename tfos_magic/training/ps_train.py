"""Parameter-server training: between-graph replication with variables on the PS tasks.

Each worker builds its own TF1-style graph under `replica_device_setter`: variables
live on the PS tasks, while the compute and the input pipeline, fed by this worker's
own Arrow stream, stay on the worker. Workers update the shared variables
asynchronously. TF2's ClusterCoordinator was not used: its per-worker datasets are
functions traced in the coordinator, and a Python (py_func) feed there runs
in the coordinator's process, so every batch would pass through it
(docs/architecture.md).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable

import tensorflow as tf

from ..errors import TfosError
from ..protocol.keras_kinds import LEGACY
from ..protocol.paths import CHECKPOINT_PREFIX
from ..protocol.paths import H5_MODEL_FILE as MODEL_FILE
from . import checkpoints, model_check, model_inputs
from .context import Throttle, TrainContext, check_finite
from .job_context import IntervalMean
from .stopping import StopRequested
from .keras_fit import NO_WEIGHTS, tensorboard_installed

SESSION_WAIT_S = 120.0


def graph_mode() -> None:
    """TF1 graphs, and the legacy optimizers that can build graph updates (`get_updates`).

    Called before the user's cell runs, so `tf.keras.optimizers.Adam(...)` in it gives the
    legacy class; Keras 2's new optimizers cannot run with eager execution disabled.
    """
    tf.compat.v1.disable_eager_execution()
    for name in dir(tf.keras.optimizers.legacy):
        cls = getattr(tf.keras.optimizers.legacy, name)
        if isinstance(cls, type):
            setattr(tf.keras.optimizers, name, cls)


def start_server(cluster: dict[str, list[str]], index: int) -> Any:
    """A PS task's server, listening: it hosts the variables (`join()`) until the driver
    ends the Spark job, which kills this process."""
    return tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name="ps", task_index=index)


class PSStrategy:
    """`ctx.strategy` in ps mode: `with ctx.strategy.scope():` puts variables on the PS tasks."""

    def __init__(self, cluster: dict[str, list[str]], index: int) -> None:
        self.cluster_spec = tf.train.ClusterSpec(cluster)
        self.worker_index = index
        self.server = tf.distribute.Server(self.cluster_spec, job_name="worker", task_index=index)
        self.num_replicas_in_sync = 1

    def scope(self):
        return tf.compat.v1.device(tf.compat.v1.train.replica_device_setter(
            cluster=self.cluster_spec, worker_device=f"/job:worker/task:{self.worker_index}"))


class PSContext(TrainContext):
    """`ctx` in ps mode: TF1 graph code builds under `ctx.strategy.scope()`, then runs in
    `ctx.session()`; `ctx.save(sess)` checkpoints (chief only)."""

    _saver: Any = None
    restored_from: str | None = None  # the checkpoint the chief's session restored

    def model_sample(self) -> Any:
        """build_model(sample)'s rows as numpy: a TF1 graph has no eager tensors, and Keras'
        adapt() runs eagerly only, so a vocabulary is computed from these in Python."""
        return self.sample()

    @property
    def global_step(self):
        with self.strategy.scope():
            return tf.compat.v1.train.get_or_create_global_step()

    def session(self, saver: Any = None):
        """The chief restores the latest checkpoint or initialises; the others wait for it."""
        self._saver = saver or self._saver or tf.compat.v1.train.Saver(max_to_keep=3)
        # Each worker fills its own lookup tables (a TextVectorization's vocabulary): tables
        # are no variables, so neither the chief's init nor a restore reaches them.
        manager = tf.compat.v1.train.SessionManager(
            ready_op=tf.compat.v1.report_uninitialized_variables(), recovery_wait_secs=0.5,
            local_init_op=tf.compat.v1.tables_initializer())
        target = self.strategy.server.target
        config = tf.compat.v1.ConfigProto(device_filters=["/job:ps", f"/job:worker/task:{self.worker_index}"])
        if self.is_chief:
            self.restored_from = checkpoints.latest_complete(self.checkpoint_dir)
            return manager.prepare_session(target, init_op=tf.compat.v1.global_variables_initializer(),
                                           saver=self._saver, checkpoint_filename_with_path=self.restored_from,
                                           config=config)
        return manager.wait_for_session(target, config=config, max_wait_secs=SESSION_WAIT_S)

    def save(self, sess: Any, step: int | None = None, epoch: int | None = None,
             reason: str = "schedule") -> str | None:
        if not self.is_chief:
            return None
        self.failpoint.hit("checkpoint")
        step = int(sess.run(self.global_step)) if step is None else step
        path = self._saver.save(sess, self.checkpoint_path(CHECKPOINT_PREFIX), global_step=step)
        self.send("checkpoint", path=path, step=step, epoch=epoch, reason=reason)
        return path

    def stop_here(self, sess: Any, step: int, epoch: int | None = None) -> None:  # type: ignore[override]
        """The chief saves the stop's checkpoint (the others need not: their variables
        live on the parameter servers); every worker then ends (raises StopRequested)."""
        self.save(sess, int(step), epoch=epoch, reason="stop")
        raise StopRequested(f"stopped at step {int(step)} on request")

    def checkpoint(self, **objects: Any):
        raise TfosError("In --strategy ps, checkpoint with ctx.save(sess): ctx.session() restores the latest "
                        "checkpoint for you.")

    def distributed_dataset(self, batch_size: int | None = None, split: str = "train"):
        return self.dataset(batch_size) if split == "train" else self.validation_dataset(batch_size)


def _build_legacy(build_model: Callable[[], Any]) -> Any:
    """The cell's compiled legacy tf.keras model; a Keras 3 one is refused at once, naming
    the fixes (keras3_loop.no_parameter_servers), however it failed in a TF1 graph."""
    from .keras3_loop import check_model, no_parameter_servers, raised_by_keras3

    try:
        model = build_model()
    except Exception as exc:
        if raised_by_keras3(exc):
            raise no_parameter_servers(exc) from exc
        raise
    if check_model(model) != LEGACY:
        raise no_parameter_servers()
    if getattr(model, "optimizer", None) is None:
        raise TfosError("build_model() must return a compiled tf.keras model (call model.compile first).")
    return model


def fit(build_model: Callable[[], Any], ctx: PSContext, restart: bool) -> Any:
    every = ctx.options.checkpoint_every_steps
    with ctx.strategy.scope():
        step_var = tf.compat.v1.train.get_or_create_global_step()
        epoch_var = tf.compat.v1.Variable(0, dtype=tf.int64, trainable=False, name="tfos_epoch")
        # Each worker's [epoch, batches taken in it, batches taken in all], kept on the PS
        # and in checkpoints: workers are asynchronous, so only this says where each one
        # resumes. One variable, read whole, so a checkpoint holds one consistent picture;
        # the job's step is the sum of the last column (not the racing global step).
        progress = tf.compat.v1.Variable(tf.zeros([ctx.num_workers, 3], tf.int64), trainable=False,
                                         name="tfos_worker_progress")
        job_step = tf.reduce_sum(progress[:, 2])
        me = ctx.worker_index
        model = _build_legacy(lambda: ctx.build(build_model))
        model_inputs.check(model, ctx.feed.spec)
        data = tf.compat.v1.data.make_initializable_iterator(ctx.dataset())
        x, y = data.get_next()
        try:
            pred = model(x, training=True)
        except (ValueError, TypeError) as exc:
            explained = model_inputs.explain(exc, model, ctx.feed.spec)
            if explained is None:
                raise
            raise explained from exc
        loss = _loss(model, y, pred)
        if model.losses:  # regularizers, as Keras' fit adds them (and reports them in the loss)
            loss = loss + tf.add_n(model.losses)
        weights = model.trainable_weights
        if not weights:
            raise TfosError(NO_WEIGHTS)
        if all(g is None for g in tf.compat.v1.gradients(loss, weights)):
            raise TfosError("The loss does not depend on any trainable weight of the model, so training would "
                            "change nothing. Check that the model's output feeds the loss.")
        updates = [*model.optimizer.get_updates(loss, weights), *model.get_updates_for(None)]
        # Counted only once the step's updates ran: the counters do not read the batch, so
        # without this the step that finds the data exhausted (OutOfRange) could still
        # count itself, and a resumed worker would then skip a batch it never took.
        with tf.control_dependencies(updates):
            count = tf.group(step_var.assign_add(1), tf.compat.v1.scatter_nd_add(
                progress, [[me, 1], [me, 2]], tf.constant([1, 1], tf.int64)))
        train_op = tf.group(*updates, count)
        with tf.control_dependencies([train_op]):  # the job's step once this one is taken
            step_after = tf.reduce_sum(progress.read_value()[:, 2])
        epoch_now = tf.compat.v1.placeholder(tf.int64, ())
        begin_epoch = tf.compat.v1.scatter_nd_update(progress, [[me, 0], [me, 1]],
                                                     tf.stack([epoch_now, tf.constant(0, tf.int64)]))
        val = ctx.validation_dataset()
        if val is not None:
            val_it = tf.compat.v1.data.make_initializable_iterator(val)
            vx, vy = val_it.get_next()
            val_loss = _loss(model, vy, model(vx, training=False))
            val_rows = tf.shape(vy)[0]
        finished_epochs = tf.compat.v1.placeholder(tf.int64, ())
        next_epoch = epoch_var.assign(finished_epochs)
        # A worker past its last epoch marks itself so (its epoch column = --epochs): the
        # chief waits for those marks before its final validation and save, or the model
        # would miss the last updates of workers still training (they are asynchronous).
        mark_finished = tf.compat.v1.scatter_nd_update(progress, [[me, 0], [me, 1]],
                                                       tf.constant([ctx.epochs, 0], tf.int64))
    sess = ctx.session(tf.compat.v1.train.Saver(max_to_keep=3))
    tf.compat.v1.keras.backend.set_session(sess)
    step, initial_epoch, mine = sess.run([job_step, epoch_var, progress[me]])
    step, initial_epoch = int(step), int(initial_epoch)
    # Resumed: this worker goes on in its own epoch, after the batches it had taken there.
    first_epoch, done_in_epoch = (int(mine[0]), int(mine[1])) if step else (0, 0)
    if done_in_epoch:
        ctx.feed.skip_next_pass(done_in_epoch * ctx.batch_size)
    ctx.send("training", initial_step=step, initial_epoch=initial_epoch,
             restored_from=ctx.restored_from if step else None, skipped_steps=done_in_epoch)
    throttle = Throttle(1.0)
    last_saved = step
    # TensorBoard event files for `%tensorboard --logdir`, written by the chief.
    board = (tf.compat.v1.summary.FileWriter(ctx.log_dir)
             if ctx.is_chief and ctx.log_dir and tensorboard_installed() else None)
    for epoch in range(first_epoch, ctx.epochs):
        if not (epoch == first_epoch and done_in_epoch):
            sess.run(begin_epoch, feed_dict={epoch_now: epoch})
        ctx.feed.epoch = epoch  # which shuffled order this pass takes
        sess.run(data.initializer)
        total, steps, rows0, t0 = 0.0, 0, ctx.feed.rows_delivered, time.monotonic()
        since_report = IntervalMean()
        while True:
            try:
                _, value, step = sess.run([train_op, loss, step_after])
            except tf.errors.OutOfRangeError:
                break
            check_finite(value, int(step), ctx.worker_index, ctx.checkpoint_dir)
            if epoch == 0:
                ctx.failpoint.hit("streaming")
            total, steps = total + float(value), steps + 1
            since_report.add(float(value))
            if ctx.should_stop(int(step)):
                ctx.stop_here(sess, int(step), epoch=epoch)
            if throttle():
                interval = since_report.take()
                ctx.report(step=int(step), loss=interval, loss_epoch_mean=total / steps,
                           rows_per_s=(ctx.feed.rows_delivered - rows0) / (time.monotonic() - t0))
                _scalars(board, int(step), loss=interval)
            if every and ctx.is_chief and step - last_saved >= every:
                ctx.save(sess, int(step), epoch=epoch)
                last_saved = step
        tail = since_report.take()  # the epoch's last steps, as its last point of the curve
        if tail is not None:
            ctx.report(step=int(step), loss=tail, loss_epoch_mean=total / steps)
        if epoch == ctx.epochs - 1:
            # Every worker validates its last epoch with the final weights: once all are done
            # training (each marks itself finished; the chief marks itself last, after its
            # wait, so that a chief that dies before its final save trains its epoch again).
            if ctx.is_chief:
                step = _wait_for_workers(sess, ctx, progress, job_step, epoch)
            sess.run(mark_finished)
            if not ctx.is_chief and val is not None:
                step = _wait_for_workers(sess, ctx, progress, job_step, epoch)
        metrics = {"loss": total / steps if steps else None,  # None: all its steps came before a restart
                   "rows_per_s": (ctx.feed.rows_delivered - rows0) / (time.monotonic() - t0)}
        if val is not None:
            # Each worker scores its own share of the rows; the notebook weighs the shares by
            # their rows into the job's one validation loss of the epoch (job/digest.py).
            metrics["val_loss"], metrics["val_rows"] = _evaluate(sess, val_it, val_loss, val_rows,
                                                                 lambda: ctx.failpoint.hit("validation"))
        ctx.report(step=int(step), epoch=epoch + 1, **metrics)
        _scalars(board, int(step), **{f"epoch_{k}": v for k, v in metrics.items()})
        if ctx.is_chief:
            sess.run(next_epoch, feed_dict={finished_epochs: epoch + 1})
            ctx.save(sess, int(step), epoch=epoch + 1, reason="epoch")
            last_saved = step
    if board is not None:
        board.close()
    ctx.feed.drain()
    return model


def _wait_for_workers(sess: Any, ctx: PSContext, progress: Any, job_step: Any, epoch: int) -> int:
    """A worker at the end of its last epoch (the chief before its final validation and
    save, the others before their final validation): wait until every other worker has
    marked its last epoch done; returns the job's step then. A worker that dies ends this
    attempt (the notebook halts it); one that makes no step for --start-timeout seconds is
    an error; a stop request is honoured here as during training."""
    others = [w for w in range(ctx.num_workers) if w != ctx.worker_index]
    last_step, last_change = -1, time.monotonic()
    while True:
        marks, step = sess.run([progress[:, 0], job_step])
        step = int(step)
        if all(int(marks[w]) >= ctx.epochs for w in others):
            return step
        if step != last_step:
            last_step, last_change = step, time.monotonic()
        elif time.monotonic() - last_change > ctx.options.start_timeout:
            waiting = [w for w in others if int(marks[w]) < ctx.epochs]
            who = "The chief" if ctx.is_chief else f"Worker {ctx.worker_index}"
            raise TfosError(f"{who} finished its last epoch, but worker(s) {waiting} took no step for "
                            f"{ctx.options.start_timeout:.0f} s (see their logs in the job's directory).")
        if ctx.should_stop(step):
            ctx.stop_here(sess, step, epoch=epoch)
        time.sleep(0.1)


def _scalars(writer: Any, step: int, **values: float | None) -> None:
    if writer is None:
        return
    writer.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag=k, simple_value=float(v))
                                                   for k, v in values.items() if v is not None]), step)


def _loss(model: Any, y: Any, pred: Any) -> Any:
    """The compiled loss as a scalar graph tensor.

    A model compiled before it is built (no Input layer) has no `loss_functions` yet in
    graph mode, and a plain loss function broadcasts a (batch,) label against a
    (batch, 1) output into a (batch, batch) matrix: the loss then sits at the label's
    variance and nothing is learnt. Keras' own fit reconciles the two shapes; so does this.
    """
    losses = getattr(model, "loss_functions", None)
    if losses:
        return losses[0](y, pred)
    loss = model.loss
    if isinstance(loss, dict):
        loss = list(loss.values())
    if isinstance(loss, (list, tuple)):
        if len(loss) != 1:
            raise TfosError("build_model() in --strategy ps supports one output with one loss; write a "
                            "train(ctx) loop for a model with several.")
        loss = loss[0]
    fn = tf.keras.losses.get(loss)
    return tf.reduce_mean(fn(*_match_ranks(y, pred)))


def _match_ranks(y: Any, pred: Any) -> tuple[Any, Any]:
    """A (batch,) label against a (batch, 1) output, or the reverse: give both the same rank."""
    y_rank, p_rank = y.shape.rank, pred.shape.rank
    if y_rank is not None and p_rank is not None:
        if p_rank == y_rank + 1 and pred.shape[-1] == 1:
            y = tf.expand_dims(y, -1)
        elif y_rank == p_rank + 1 and y.shape[-1] == 1:
            y = tf.squeeze(y, -1)
    return tf.cast(y, pred.dtype) if y.dtype != pred.dtype and y.dtype.is_floating else y, pred


def _evaluate(sess: Any, iterator: Any, loss: Any, rows: Any, each: Callable[[], None] = lambda: None) -> tuple[float, int]:
    """The mean loss over this worker's validation rows (each batch weighed by its rows), and their number."""
    sess.run(iterator.initializer)
    total, n = 0.0, 0
    while True:
        try:
            value, count = sess.run([loss, rows])
            total, n = total + float(value) * int(count), n + int(count)
            each()
        except tf.errors.OutOfRangeError:
            return total / max(n, 1), n


def save_model(model: Any, ctx: PSContext, source: str | None) -> None:
    """The chief writes the trained model (HDF5: graph-mode Keras cannot write .keras) and
    checks that it loads back as the model it trained (`model_check`)."""
    ctx.failpoint.hit("final_save")
    if not ctx.is_chief:
        return
    path = ctx.checkpoint_path(MODEL_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, MODEL_FILE)
        model_check.saved(path, lambda: model.save(local))
        tf.io.gfile.copy(local, path, overwrite=True)
    outputs = model_check.check_loads(model, path, ctx.feed.sample(model_check.SAMPLE_ROWS), source, ctx.job,
                                      graph_mode=True)
    ctx.send("model", path=path, outputs=outputs)
