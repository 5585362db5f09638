"""What every framework's `ctx` shares: the job's identity, its metric reports, the
agreed stop, and its checkpoint dir. Imports no framework: the PyTorch process never
loads TensorFlow, nor the TF process PyTorch (context.py and torch_context.py add
each framework's own)."""

from __future__ import annotations

import time
from typing import Any

from ..protocol.channel import ChannelClient
from ..protocol.events import make_event
from ..protocol.options import TrainOptions
from ..protocol.paths import join_uri
from .arrow_feed import ArrowFeed
from .failpoints import Failpoint
from .stopping import StopRequested, StopSignal


class JobContext:
    """One worker's view of the job, whatever trains it: its data, its place among the
    workers, the stop the workers agree on, and metric reporting."""

    def __init__(self, *, job: str, feed: ArrowFeed, worker_index: int, num_workers: int, checkpoint_dir: str,
                 options: TrainOptions, channel: ChannelClient, log_dir: str = "", stop: StopSignal | None = None,
                 failpoint: Failpoint | None = None, sample: str = "") -> None:
        self.job = job
        self._sample = sample  # build_model(sample)'s rows (protocol/sample.py), "" for none
        self.feed = feed
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.checkpoint_dir = checkpoint_dir
        self.log_dir = log_dir  # TensorBoard event files, written by the chief
        self.options = options
        self.epochs: int = options.epochs
        self.batch_size: int = options.batch_size
        self._channel = channel
        self._stop = stop or StopSignal(worker_index == 0, lambda step: None)
        self.failpoint = failpoint or Failpoint(None, worker_index, 0)
        self._checkpointers: list[Any] = []

    def sample(self) -> Any:
        """build_model(sample)'s rows as numpy, (features, label) as the feed gives them: the
        same random training rows on every worker (driver/sample.py)."""
        from ..protocol.arrays import BatchArrays
        from ..protocol.sample import decode

        batch = decode(self._sample) if self._sample else None
        if batch is None:
            return None
        return BatchArrays(self.feed.spec).to_numpy(batch.drop_columns(
            [n for n in batch.schema.names if n not in self.feed.spec.columns]))

    def build(self, build_model: Any) -> Any:
        """The cell's build_model(), or build_model(sample) when it takes one."""
        import inspect

        if not inspect.signature(build_model).parameters:
            return build_model()
        return build_model(self.model_sample())

    def model_sample(self) -> Any:
        """`sample()` as the framework's model takes it (numpy here; tensors for TF)."""
        return self.sample()

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    def checkpoint_path(self, name: str) -> str:
        """A file in the checkpoint dir, which may be a URI (no os.path)."""
        return join_uri(self.checkpoint_dir, name)

    def _checkpoint_saved(self, path: str, step: int, epoch: int, reason: str) -> None:
        self.send("checkpoint", path=path, step=step, epoch=epoch, reason=reason)

    def should_stop(self, step: int) -> bool:
        """Whether to stop now, after global step `step`: the notebook asked this job to
        stop, and every worker returns True at the same step. Call it after each step of a
        custom loop; when it is True, save a checkpoint (every worker, as for any save) and
        return, or call `stop_here(ckpt, step)`, which does both."""
        return self._stop.should_stop(int(step))

    def stop_here(self, ckpt: Any, step: int) -> None:
        """Save the stop's checkpoint and end training (raises StopRequested)."""
        ckpt.save(int(step), reason="stop")
        raise StopRequested(f"stopped at step {int(step)} on request")

    def report(self, step: int | None = None, epoch: int | None = None, **metrics: Any) -> None:
        """Send metrics to the notebook: with `epoch` they form one row of Job.history."""
        if epoch is not None:
            self.send("epoch", epoch=int(epoch), step=step, metrics=metrics)
        else:
            self.send("step", step=step, metrics=metrics, rows=self.feed.rows_delivered)

    def send(self, kind: str, **fields: Any) -> None:
        self._channel.send(make_event(kind, self.worker_index, **fields))

    def close(self) -> None:
        for ckpt in self._checkpointers:
            ckpt.close()


def check_finite(loss: Any, step: int, worker: int, checkpoint_dir: str) -> None:
    """A NaN or infinite loss ends the job: training on would only overwrite good
    checkpoints with bad weights, and a restart would diverge again (not retried)."""
    import math

    try:
        value = float(loss)
    except (TypeError, ValueError):
        return
    if not math.isfinite(value):
        from ..errors import TfosError

        raise TfosError(
            f"The loss is {value} at step {step} on worker {worker}. Training stopped; the last good checkpoint "
            f"in {checkpoint_dir} is kept. Lower the learning rate, clip gradients (e.g. the optimizer's "
            "clipnorm=1.0), or look for NaN/inf or huge values in the data; then run the cell again.")


class Throttle:
    """True at most once per `interval` seconds: keeps step metrics cheap."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            return True
        return False


class IntervalMean:
    """The mean loss of the steps since it was last taken: one point of the loss curve, for
    loops that see each step's loss (ps mode, PyTorch). Each report takes it, and so does
    the epoch's end, so that every step lies under exactly one point of the curve."""

    def __init__(self) -> None:
        self.total, self.steps = 0.0, 0

    def add(self, loss: float) -> None:
        self.total, self.steps = self.total + loss, self.steps + 1

    def take(self) -> float | None:
        """The mean since the last take (None: no step since), starting afresh."""
        mean = self.total / self.steps if self.steps else None
        self.total, self.steps = 0.0, 0
        return mean
