"""Arrow record batches to the numpy arrays a model takes, the same way everywhere.

The TF process feeds training with it (`training/arrow_feed.py`) and the Spark task
predicts with it (`task/predictor.py`), so a column is encoded for inference exactly
as it was for training: one float32 matrix of the features in column order, or a dict
of named arrays (int64 ids stay int64). No per-row Python.

A text or binary column becomes an object array of `bytes` (Arrow builds them in C++;
TensorFlow takes such an array as a tf.string tensor). A variable-length array column
becomes a `RaggedArray` (its values and row splits, straight from Arrow's buffers), or
is padded with zeros to its stated length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .feed_spec import MATRIX, PADDED, RAGGED, STRING, ColumnSpec, FeedSpec, array_lengths


def numpy_dtype(c: ColumnSpec) -> Any:
    return object if c.dtype == STRING else np.dtype(c.dtype)


@dataclass
class RaggedArray:
    """Rows of different lengths, as Arrow and tf.RaggedTensor hold them: all values end to
    end, and `splits` (rows + 1 offsets from 0) where each row starts. Sliced, gathered and
    joined by rows like a numpy array, with no loop over rows."""

    values: np.ndarray
    splits: np.ndarray  # int64

    @classmethod
    def from_arrow(cls, col: pa.Array, dtype: Any) -> "RaggedArray":
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        return cls(np.array(values, dtype=dtype, copy=True), offsets - offsets[0])

    def __len__(self) -> int:
        return len(self.splits) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.splits)

    def __getitem__(self, rows: Any) -> "RaggedArray":
        """Rows by a slice (step 1) or an integer index array, as numpy indexes them."""
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(len(self))
            stop = max(start, stop)
            return RaggedArray(self.values[self.splits[start]:self.splits[stop]],
                               self.splits[start:stop + 1] - self.splits[start])
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # Each value's index in `values`: its row's start, plus its place within the row.
        take = np.repeat(self.splits[rows] - splits[:-1], lengths) + np.arange(splits[-1])
        return RaggedArray(self.values[take], splits)

    def copy(self) -> "RaggedArray":
        return RaggedArray(self.values.copy(), self.splits.copy())

    @staticmethod
    def concatenate(parts: list["RaggedArray"]) -> "RaggedArray":
        ends = np.cumsum([0] + [p.splits[-1] for p in parts[:-1]])
        splits = np.concatenate([parts[0].splits[:1]] + [p.splits[1:] + e for p, e in zip(parts, ends)])
        return RaggedArray(np.concatenate([p.values for p in parts]), splits.astype(np.int64))

    def padded(self, width: int) -> np.ndarray:
        """Rows of exactly `width` values: zeros after a short row, a long one cut."""
        lengths = np.minimum(self.lengths, width)
        out = np.zeros((len(self), width), self.values.dtype)
        rows = np.repeat(np.arange(len(self)), lengths)
        cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = self.values[self.splits[rows] + cols]
        return out


def leaves(element: Any) -> list[Any]:
    """The arrays of one element: x (an array or a dict of them), y, weight (a tuple, or
    the list a torch DataLoader makes of it)."""
    parts = element if isinstance(element, (tuple, list)) else (element,)
    return [a for p in parts for a in (p.values() if isinstance(p, dict) else (p,))]


def rows_of(element: Any) -> int:
    """Rows in one element (every array has them)."""
    return len(leaves(element)[0])


def map_arrays(element: Any, fn: Any) -> Any:
    """`fn` on every array of an element, keeping its structure."""
    if isinstance(element, (tuple, list)):
        return tuple(map_arrays(p, fn) for p in element)
    if isinstance(element, dict):
        return {k: fn(v) for k, v in element.items()}
    return fn(element)


def concatenate(parts: list[Any]) -> Any:
    """Arrays of the same column, end to end by rows."""
    if isinstance(parts[0], RaggedArray):
        return RaggedArray.concatenate(parts)
    return np.concatenate(parts)


class BatchArrays:
    """Converts the batches of one FeedSpec; array widths come from the spec, else from
    the batch itself (checked to be fixed)."""

    def __init__(self, spec: FeedSpec) -> None:
        self.spec = spec

    def _lengths(self, batch: pa.RecordBatch) -> dict[str, int]:
        known = self.spec.array_lengths
        wanted = [c for c in self.spec.features + ([self.spec.label] if self.spec.label else [])
                  if c.is_array and c.lengths not in (RAGGED, PADDED)]
        return known if all(c.name in known for c in wanted) else {**array_lengths(batch, self.spec), **known}

    def _values(self, batch: pa.RecordBatch, c: ColumnSpec, lengths: dict[str, int]) -> Any:
        """A column as numpy: a zero-copy, read-only view of Arrow's buffer where possible."""
        col = batch.column(c.name)
        if c.is_array and c.lengths in (RAGGED, PADDED):
            ragged = RaggedArray.from_arrow(col, numpy_dtype(c))
            return ragged if c.lengths == RAGGED else ragged.padded(self.spec.array_lengths[c.name])
        if c.is_array:
            return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, lengths.get(c.name, 0))
        if c.dtype == STRING and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            # Bytes, as TF keeps a tf.string: the cast reuses the buffers, and no row is decoded.
            col = pc.cast(col, pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
        return col.to_numpy(zero_copy_only=False)

    def column(self, batch: pa.RecordBatch, c: ColumnSpec, lengths: dict[str, int] | None = None) -> Any:
        # Copy, always. TF wraps an aligned numpy array's memory without copying and may then
        # write into it in place (buffer forwarding). Arrow's buffers are read-only: a later
        # epoch's are pages of the memory-mapped spill file, so such a write was a SIGSEGV.
        lengths = self._lengths(batch) if lengths is None else lengths
        values = self._values(batch, c, lengths)
        if isinstance(values, RaggedArray) or c.lengths == PADDED:
            return values  # new arrays already
        return np.array(values, dtype=numpy_dtype(c), copy=True)

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
