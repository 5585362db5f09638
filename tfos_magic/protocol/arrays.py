"""Arrow record batches to the numpy arrays a model takes, the same way everywhere.

The TF process feeds training with it (`training/arrow_feed.py`) and the Spark task
predicts with it (`task/predictor.py`), so a column is encoded for inference exactly
as it was for training: one float32 matrix of the features in column order, or a dict
of named arrays (int64 ids stay int64). No per-row Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .feed_spec import MATRIX, ColumnSpec, FeedSpec, array_lengths


class BatchArrays:
    """Converts the batches of one FeedSpec; array widths come from the spec, else from
    the batch itself (checked to be fixed)."""

    def __init__(self, spec: FeedSpec) -> None:
        self.spec = spec

    def _lengths(self, batch: pa.RecordBatch) -> dict[str, int]:
        known = self.spec.array_lengths
        wanted = [c for c in self.spec.features + ([self.spec.label] if self.spec.label else []) if c.is_array]
        return known if all(c.name in known for c in wanted) else {**array_lengths(batch, self.spec), **known}

    def _values(self, batch: pa.RecordBatch, c: ColumnSpec, lengths: dict[str, int]) -> np.ndarray:
        """A column as numpy: a zero-copy, read-only view of Arrow's buffer where possible."""
        col = batch.column(c.name)
        if c.is_array:
            return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, lengths.get(c.name, 0))
        return col.to_numpy(zero_copy_only=False)

    def column(self, batch: pa.RecordBatch, c: ColumnSpec, lengths: dict[str, int] | None = None) -> np.ndarray:
        # Copy, always. TF wraps an aligned numpy array's memory without copying and may then
        # write into it in place (buffer forwarding). Arrow's buffers are read-only: a later
        # epoch's are pages of the memory-mapped spill file, so such a write was a SIGSEGV.
        lengths = self._lengths(batch) if lengths is None else lengths
        return np.array(self._values(batch, c, lengths), dtype=c.dtype, copy=True)

    def features(self, batch: pa.RecordBatch) -> Any:
        """The model's input: one float32 matrix (MATRIX), or a dict name -> array."""
        lengths = self._lengths(batch)
        if self.spec.inputs != MATRIX:
            return {c.name: self.column(batch, c, lengths) for c in self.spec.features}
        widths = [self.spec.width(c) or lengths.get(c.name, 0) for c in self.spec.features]
        out = np.empty((batch.num_rows, sum(widths)), np.float32)  # one new array, one copy
        at = 0
        for c, w in zip(self.spec.features, widths):
            out[:, at:at + w] = self._values(batch, c, lengths).reshape(batch.num_rows, w)
            at += w
        return out

    def to_numpy(self, batch: pa.RecordBatch) -> Any:
        """Features, or (features, label) when the spec has a label, and (features, label,
        weight) with a weight column: what tf.data yields, as Keras' fit takes it."""
        x = self.features(batch)
        if self.spec.label is None:
            return x
        y = self.column(batch, self.spec.label)
        return (x, y) if self.spec.weight is None else (x, y, self.column(batch, self.spec.weight))
