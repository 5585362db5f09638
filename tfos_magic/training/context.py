"""`ctx`, what a low-level TensorFlow `train(ctx)` gets, and what the Keras path uses underneath."""

from __future__ import annotations

from typing import Any

from .checkpoints import Checkpointer
from .job_context import JobContext, Throttle, check_finite  # noqa: F401 - the TF loops' helpers, from here too


class TrainContext(JobContext):
    """One TF worker's view of the job: its data, strategy, checkpoints and metric reporting."""

    def __init__(self, *, strategy: Any, **common: Any) -> None:
        super().__init__(**common)
        self.strategy = strategy

    def model_sample(self) -> Any:
        """build_model(sample)'s rows as tensors (a ragged column as a tf.RaggedTensor)."""
        from ..protocol.tensors import to_tf

        sample = self.sample()
        return None if sample is None else to_tf(sample)

    @property
    def rows_per_step(self) -> int:
        """Rows this worker takes in one step: a batch for each of its local replicas."""
        return self.batch_size * max(1, self.strategy.num_replicas_in_sync // max(1, self.num_workers))

    def dataset(self, batch_size: int | None = None):
        """This worker's rows as a tf.data.Dataset, streamed from its Spark partitions."""
        return self.feed.dataset(batch_size or self.batch_size)

    def validation_dataset(self, batch_size: int | None = None):
        """This worker's share of --validation-df, or None without one."""
        if not self.feed.spec.has_validation:
            return None
        return self.feed.dataset(batch_size or self.batch_size, split="validation")

    def distributed_dataset(self, batch_size: int | None = None, split: str = "train"):
        """The dataset distributed over this worker's replicas (per-replica batch = batch_size)."""
        return self.strategy.distribute_datasets_from_function(
            lambda _ctx: self.feed.dataset(batch_size or self.batch_size, split=split))

    def checkpoint(self, **objects: Any) -> Checkpointer:
        """A Checkpointer for `objects` in the job's checkpoint dir; call .restore() then .save(step)."""
        ckpt = Checkpointer(self.checkpoint_dir, self.is_chief, notify=self._checkpoint_saved,
                            failpoint=self.failpoint, **objects)
        self._checkpointers.append(ckpt)
        return ckpt
