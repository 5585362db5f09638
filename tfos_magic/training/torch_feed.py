"""Runs in a PyTorch training process: this worker's Arrow feed as torch tensors.

The feed (arrow_feed.py) hands numpy chunks of whatever size Spark's Arrow batches
have: the live stream on the first pass, then the local spill or memory. Here they are
cut into batches of exactly `batch_size` rows (the last of a pass may be short) by
slicing, which copies nothing; only a batch that straddles two chunks is joined. Each
array becomes a tensor with `torch.from_numpy`, which shares its memory (the feed's
arrays are its own, writable copies). The process reads its stream on one thread, so
the DataLoader runs no worker processes of its own: the decoding is columnar and
vectorised already, and the stream could not be shared across processes anyway.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..protocol.feed_spec import MATRIX, ColumnSpec, FeedSpec
from ..protocol.arrays import map_arrays
from .arrow_feed import ArrowFeed, rebatch


def as_tensors(batch: Any) -> Any:
    """numpy to torch, sharing memory (no copy)."""
    return map_arrays(batch, torch.from_numpy)


class ArrowBatches(IterableDataset):
    """This worker's rows as batches of tensors: x (one float32 matrix, or a dict of
    tensors by column name) and, with a label, (x, y). Each iteration is one pass of the
    feed: the first streams from Spark, later ones read the spill or memory, shuffled
    with --shuffle."""

    def __init__(self, feed: ArrowFeed, batch_size: int, split: str = "train") -> None:
        self.feed, self.batch_size, self.split = feed, int(batch_size), split

    def __iter__(self) -> Iterator[Any]:
        for batch in rebatch(self.feed.numpy_pass(self.split), self.batch_size):
            yield as_tensors(batch)


def dataloader(feed: ArrowFeed, batch_size: int, split: str = "train", pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `ArrowBatches`: batches come whole from the feed (batch_size=None)."""
    return DataLoader(ArrowBatches(feed, batch_size, split), batch_size=None, num_workers=0, pin_memory=pin_memory)


def _zeros(spec: FeedSpec, c: ColumnSpec, rows: int) -> np.ndarray:
    width = spec.array_lengths.get(c.name, 1) if c.is_array else None
    return np.zeros((rows, width) if width is not None else (rows,), dtype=c.dtype)


def zero_batch(spec: FeedSpec, rows: int = 1) -> Any:
    """A batch of zeros shaped as the feed's (x, y): what a worker whose rows ran out
    steps on, with its loss times zero, while its peers still train (DDP's all-reduce
    needs every rank at every step)."""
    if spec.inputs == MATRIX:
        width = sum(spec.width(c) or 0 for c in spec.features)
        x: Any = np.zeros((rows, width), np.float32)
    else:
        x = {c.name: _zeros(spec, c, rows) for c in spec.features}
    if spec.label is None:
        return as_tensors(x)
    return as_tensors((x, _zeros(spec, spec.label, rows)))
