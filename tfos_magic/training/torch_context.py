"""`ctx` of a `%%torch_train` cell's `train(ctx)`, and what the runner's own loop uses."""

from __future__ import annotations

from typing import Any

import torch

from .job_context import JobContext
from .torch_checkpoints import TorchCheckpointer
from .torch_feed import dataloader


class TorchContext(JobContext):
    """One PyTorch worker's view of the job: its rank among the workers, its device, its
    rows as DataLoaders, checkpoints and metric reporting.

    In a custom loop: wrap the module with `ctx.wrap(module)` (DistributedDataParallel on
    `ctx.device`), iterate `ctx.dataloader()` each epoch, `ctx.report(...)` metrics, and
    call `ctx.should_stop(step)` after each step. The workers' partitions differ in size:
    a loop of its own ends each epoch together on every worker
    (`torch.distributed.algorithms.Join`, or a step count agreed with an all-reduce), as
    the build_model() loop does (torch_runner.py)."""

    def __init__(self, *, connection: Any, **common: Any) -> None:
        super().__init__(**common)
        self.device: torch.device = connection.device
        self.rank = self.worker_index
        self.world_size = self.num_workers

    @property
    def rows_per_step(self) -> int:
        return self.batch_size

    def dataloader(self, batch_size: int | None = None):
        """This worker's training rows, `batch_size` a batch (default --batch-size): x, or
        (x, y) with a label; x is one float32 matrix or a dict of tensors by column name.
        Iterate it once per epoch: the first pass streams from Spark, later ones read the
        local spill or memory, in a new order each epoch (--shuffle). Tensors are on the
        CPU, sharing the feed's memory; move them with `.to(ctx.device)`."""
        return dataloader(self.feed, batch_size or self.batch_size, pin_memory=self.device.type == "cuda")

    def validation_dataloader(self, batch_size: int | None = None):
        """This worker's share of --validation-df, or None without one."""
        if not self.feed.spec.has_validation:
            return None
        return dataloader(self.feed, batch_size or self.batch_size, split="validation")

    def wrap(self, module: Any) -> Any:
        """`module` on this worker's device, in DistributedDataParallel: its gradients are
        averaged over the workers at each backward, and rank 0's weights are copied to
        every worker first."""
        from torch.nn.parallel import DistributedDataParallel

        module = module.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def checkpoint(self, **objects: Any) -> TorchCheckpointer:
        """A checkpointer of `objects` (the module, optimizer, ...) in the job's checkpoint
        dir: `.restore()` loads the latest complete one (its path, or None) and sets `.step`
        and `.epoch`; `.save(step, epoch=None)` writes one (the chief's file; every worker
        calls it at the same step)."""
        ckpt = TorchCheckpointer(self.checkpoint_dir, self.is_chief, notify=self._checkpoint_saved,
                                 failpoint=self.failpoint, **objects)
        self._checkpointers.append(ckpt)
        return ckpt
