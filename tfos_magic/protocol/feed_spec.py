"""What the feed needs to turn Arrow batches into tensors: the columns, their dtypes and
the input layout (one matrix, or a dict of named tensors).

The notebook builds it from the DataFrame's schema (`driver/columns.py`); the Spark
task checks array lengths with it; the TF process feeds tf.data with it. It is plain
JSON on the wire and imports neither Spark nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

SPLIT_COLUMN = "__tfos_split"
MATRIX, DICT = "matrix", "dict"
STRING = "string"  # a text or binary column: one tf.string a row, its bytes (text as UTF-8)
# An array column's rows: all of one length (checked as they stream), of any length (a
# tf.RaggedTensor), or padded with zeros and cut to a stated length (--pad).
FIXED, RAGGED, PADDED = "fixed", "ragged", "padded"


class FeedError(ValueError):
    """Bad data found while streaming (nulls, ragged arrays); the message names the column."""


@dataclass
class ColumnSpec:
    name: str
    dtype: str  # "float32", "int64" or STRING
    is_array: bool = False
    lengths: str = FIXED  # an array's rows: FIXED, RAGGED or PADDED (to array_lengths[name])

    @property
    def ragged(self) -> bool:
        return self.is_array and self.lengths == RAGGED


@dataclass
class FeedSpec:
    """The columns a worker's feed turns into tensors, and how (JSON-able)."""

    features: list[ColumnSpec]
    label: ColumnSpec | None
    inputs: str  # MATRIX (one float32 tensor) or DICT (name -> tensor)
    has_validation: bool = False
    array_lengths: dict[str, int] = field(default_factory=dict)
    weight: ColumnSpec | None = None  # --sample-weight: a float32 weight per row for the loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeedSpec":
        return cls(
            features=[ColumnSpec(**c) for c in d["features"]],
            label=ColumnSpec(**d["label"]) if d.get("label") else None,
            inputs=d["inputs"],
            has_validation=d.get("has_validation", False),
            array_lengths=dict(d.get("array_lengths") or {}),
            weight=ColumnSpec(**d["weight"]) if d.get("weight") else None,
        )

    def inputs_only(self) -> "FeedSpec":
        """The same features without label, weight or validation: what a trained model takes."""
        return dataclasses.replace(self, label=None, weight=None, has_validation=False)

    @property
    def columns(self) -> list[str]:
        names = [c.name for c in self.features]
        return names + ([self.label.name] if self.label else []) + ([self.weight.name] if self.weight else [])

    def width(self, c: ColumnSpec) -> int | None:
        """Values per row of a column: 1 for a scalar, the array length (None while unknown,
        and always for a ragged one)."""
        return None if c.ragged else self.array_lengths.get(c.name) if c.is_array else 1

    @property
    def has_ragged(self) -> bool:
        return any(c.ragged for c in self.features + [c for c in (self.label, self.weight) if c])

    def describe(self) -> str:
        """What the feed gives the model, in words a user can match a model against."""
        def shape(c: ColumnSpec) -> str:
            w = self.width(c)
            if c.ragged:
                return "(batch, None) ragged"
            return "(batch,)" if not c.is_array else f"(batch, {w if w is not None else '?'})"

        if self.inputs == MATRIX:
            widths = [self.width(c) for c in self.features]
            total = "?" if None in widths else str(sum(w for w in widths if w is not None))
            names = ", ".join(c.name for c in self.features)
            x = f"one float32 matrix of shape (batch, {total}) from the columns {names}, in that order"
        else:
            x = "a dict of tensors: " + ", ".join(f"{c.name!r} {c.dtype} {shape(c)}" for c in self.features)
        y = f"; the label {self.label.name!r} is {self.label.dtype} {shape(self.label)}" if self.label else ""
        return f"--inputs {self.inputs}: {x}{y}"


def array_lengths(batch: pa.RecordBatch, spec: FeedSpec) -> dict[str, int]:
    """Length of each array column, checked to be the same on every row of `batch`."""
    out = {}
    for c in spec.features + ([spec.label] if spec.label else []):
        if not c.is_array or c.lengths != FIXED:
            continue
        lengths = pc.list_value_length(batch.column(c.name))
        lo, hi = pc.min_max(lengths).values()
        if lo.as_py() != hi.as_py():
            fix = ("pass --pad " + f"{c.name}={hi} to pad shorter rows with zeros (and cut longer ones)" +
                   (f", or --ragged {c.name} for a tf.RaggedTensor" if c in spec.features and spec.inputs != MATRIX
                    else ""))
            raise FeedError(
                f"Array column {c.name!r} has rows of different lengths ({lo} to {hi}): {fix} "
                "(docs: README, 'Text, images and sequences')."
            )
        if lo.as_py() is not None:
            out[c.name] = int(lo.as_py())
    return out
