"""The seam between the job and the framework that trains it.

Everything around a training process is framework-neutral: the Arrow feed and its spill
(arrow_feed.py), the channel and its events, the stop the workers agree on
(stopping.py), fault injection, failure reports, GPU sampling and the checkpoint
dir's rules. What differs between frameworks is how a process joins its peers, builds
and trains the model, checkpoints, and saves the result: a `Runner`. child.py drives
one through a job's life; each is imported only when chosen, so a PyTorch process never
loads TensorFlow and a TF process never loads PyTorch.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..protocol.plan import TaskConfig


class Runner(Protocol):
    """One framework's part of a training process, in the order child.py calls it."""

    def join(self, config: TaskConfig, channel: Any, cleanup: list[Any]) -> bool:
        """Before the cell runs: register with the cluster where the framework needs a
        registry (ps mode). True when this process only served the others (a parameter
        server) and has nothing left to do."""

    def check_checkpoint_dir(self, directory: str, marker: str | None, who: str) -> None:
        """Refuse a checkpoint dir this process cannot use or does not share with the kernel."""

    def connect(self, config: TaskConfig, channel: Any) -> Any:
        """After the cell ran: join the peers this process trains with (a strategy, a process group)."""

    def context(self, connection: Any, **common: Any) -> Any:
        """The `ctx` a `train(ctx)` cell gets (job_context.JobContext and the framework's own)."""

    def prepare_checkpoints(self, directory: str, restart: bool) -> None:
        """The chief, before training: check the dir is writable; clear it for --restart."""

    def train(self, namespace: dict[str, Any], ctx: Any, restart: bool) -> Any:
        """Train the cell's model (its build_model() or train(ctx)); the model, or None."""

    def save(self, model: Any, ctx: Any, source: str) -> None:
        """Save the trained model where the kernel loads it, and check that it loads back."""


def runner_for(config: TaskConfig) -> Runner:
    """The runner of this job's framework and strategy."""
    options = config.plan.options
    if options.framework == "torch":
        from .torch_runner import TorchDDP

        return TorchDDP()
    from .tf_runners import TfAllReduce, TfParameterServer

    return TfParameterServer() if options.strategy == "ps" else TfAllReduce()
