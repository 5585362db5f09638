"""Keras 3 models: trained by a step loop of our own, not by `fit`.

Keras 3's `fit` fails under MultiWorkerMirroredStrategy (it converts the strategy's
per-replica values as plain tensors). Its parts work there: a model and optimizer built
in the strategy's scope hold mirrored variables, `model.train_step` run by
`strategy.run` computes the compiled loss scaled for the replicas, the optimizer sums
the gradients across every worker before it applies them, and the compiled metrics are
on-read variables that read as this replica's values inside a step and as the job's
(summed over every worker) in the strategy's cross-replica context. So this loop owns
only what `fit` would have added: calls of `steps_per_execution` steps, the epoch's
end, validation and the callbacks. Everything around it (the Arrow feed and its agreed
step counts, checkpoints, resume, stops, reports) is the epoch loop of keras_fit.py,
shared with the legacy path.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from ..errors import TfosError
from ..protocol.keras_kinds import ACCEPTED, KERAS3, describe, kind_of
from .user_callbacks import acts_per_step


def check_model(model: Any, where: str = "build_model()") -> str:
    """The Keras `model` belongs to (KERAS3 or LEGACY), or a TfosError that names what it
    is and what is accepted."""
    kind = kind_of(model)
    if kind is None or not _is_model(model, kind):
        raise TfosError(f"{where} must return a Keras model; it returned {describe(model)}. Accepted: {ACCEPTED}.")
    if kind == KERAS3:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise TfosError(
                f"{where} returned a Keras 3 model on the {keras.backend.backend()} backend; tfos trains it with "
                "TensorFlow's distribution strategies, which hold TensorFlow variables only. Build it on the "
                "tensorflow backend: leave KERAS_BACKEND unset (or set it to tensorflow) in the executors' "
                "environment and in the cell, before keras is first imported.")
    return kind


def _is_model(model: Any, kind: str) -> bool:
    if kind == KERAS3:
        import keras

        return isinstance(model, keras.Model)
    return isinstance(model, tf.keras.Model)


def _first_local(strategy: Any, values: Any) -> Any:
    """This worker's first replica's values (a replica's metrics read in its own step)."""
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], values)


class StepLoop:
    """One Keras 3 model's training under `strategy`, an epoch at a time, as keras_fit's
    epoch loop asks: `run_epoch` for the steps, `evaluate` for validation."""

    def __init__(self, model: Any, strategy: Any) -> None:
        self.model = model
        self.strategy = strategy
        per_execution = getattr(model, "steps_per_execution", 1)
        self.user_steps_per_call = per_execution if isinstance(per_execution, int) and per_execution > 0 else 1
        self._train_fns: dict[int, Any] = {}
        self._test_fn: Any = None
        self.sizable = True  # tfos may size its steps a call
        self._training: list[Any] = []  # callbacks told that training began, in that order

    def finish(self) -> None:
        """Training is over: the callbacks hear it once (TensorBoard closes its writers),
        as after one `fit`. The model's compile settings were never changed."""
        for callback in self._training:
            callback.on_train_end()
        self._training = []

    def build(self, element_spec: Any) -> None:
        """Build the model, its compiled loss and metrics and the optimizer from the feed's
        element spec, in the strategy's scope, before a checkpoint restores them: a
        variable made later would miss the restore. (Keras' `fit` does this itself, with
        the same private call, from the first batch.)"""
        with self.strategy.scope():
            self.model._symbolic_build(data_batch=element_spec)

    @property
    def iterations(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _train_fn(self, k: int) -> Any:
        """A tf.function that runs `k` steps from a distributed iterator and returns the
        last step's logs (this worker's running means)."""
        if k not in self._train_fns:
            strategy, model = self.strategy, self.model

            def step(iterator: Any) -> Any:
                return _first_local(strategy, strategy.run(model.train_step, args=(next(iterator),)))

            @tf.function
            def train(iterator: Any) -> Any:
                logs = step(iterator)
                for _ in tf.range(k - 1):
                    logs = step(iterator)
                return logs

            self._train_fns[k] = train
        return self._train_fns[k]

    def run_epoch(self, data: Any, epoch: int, steps: int | None, steps_per_call: int, callbacks: list[Any],
                  validation: Any = None) -> dict[str, float]:
        """Train one epoch: `steps` steps (every worker the same; None: until every
        worker's data ends, TF's iterator agreeing the end), calls of `steps_per_call`.
        Returns the epoch's logs, the job's metrics, as `fit` would give its callbacks."""
        model = self.model
        model.stop_training = False
        with self.strategy.scope():
            model.reset_metrics()
        batch_hooks = [c for c in callbacks if acts_per_step(c)]
        for callback in callbacks:
            if not any(callback is c for c in self._training):  # once, as in one `fit`
                self._training.append(callback)
                callback.on_train_begin()
            callback.on_epoch_begin(epoch)
        iterator = iter(data)
        done = 0
        k = steps_per_call if steps is not None else 1
        while steps is None or done < steps:
            n = k if steps is None else min(k, steps - done)
            try:
                logs = self._train_fn(n)(iterator)
            except tf.errors.OutOfRangeError:
                break  # a streamed pass: every worker's rows are taken
            done += n
            for callback in batch_hooks:
                callback.on_train_batch_end(done - 1, logs)
        logs = self._job_metrics()
        if validation is not None:
            logs.update({f"val_{name}": value for name, value in self.evaluate(validation, callbacks).items()})
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        return logs

    def _job_metrics(self) -> dict[str, float]:
        """The compiled metrics over every worker's steps: read in the strategy's scope, each
        on-read variable is summed across the workers (a collective each worker joins here)."""
        with self.strategy.scope():
            return {name: float(value) for name, value in self.model.get_metrics_result().items()}

    def evaluate(self, data: Any, callbacks: list[Any] = ()) -> dict[str, float]:
        """The compiled loss and metrics over every worker's rows of `data`; each call is
        a step of the callbacks' test hooks."""
        if self._test_fn is None:
            strategy, model = self.strategy, self.model

            @tf.function
            def test(iterator: Any) -> Any:
                return strategy.run(model.test_step, args=(next(iterator),))

            self._test_fn = test
        with self.strategy.scope():
            self.model.reset_metrics()
        iterator = iter(data)
        batch = 0
        while True:
            try:
                self._test_fn(iterator)
            except tf.errors.OutOfRangeError:
                break
            for callback in callbacks:
                callback.on_test_batch_end(batch)
            batch += 1
        return self._job_metrics()


def no_parameter_servers(exc: BaseException | None = None) -> TfosError:
    """The refusal of a Keras 3 model in ps mode, with the fixes."""
    return TfosError(
        "A Keras 3 model (import keras) cannot train in ps mode: tfos' parameter-server workers run TensorFlow 1 "
        "graphs (asynchronous updates on the parameter servers), and Keras 3 builds and trains models eagerly "
        "only. Run it with --strategy allreduce, or keep ps mode and write the model with legacy Keras "
        "(tf.keras, or import tf_keras as keras)." + (f" ({type(exc).__name__}: {exc})" if exc else ""))


def raised_by_keras3(exc: BaseException) -> bool:
    """Whether `exc` came out of Keras 3's own code (e.g. building a layer in a TF1 graph)."""
    import traceback

    return any("/keras/src/" in frame.filename.replace("\\", "/") for frame in traceback.extract_tb(exc.__traceback__))
