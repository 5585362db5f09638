"""Runs in the notebook's kernel: the rows a `build_model(sample)` gets.

Keras' preprocessing layers learn their state from data before training: a
`TextVectorization` its vocabulary, a `Normalization` its means, a `StringLookup` its
labels, each by `adapt()`. Every worker must build the same model, so each adapts on
the same rows: a random sample of the training rows, drawn once here (one more Spark
job over the ETL, a top-N by a seeded random key, so that a frame sorted by its label
still gives every class) and shipped in the plan. Its size is bounded in rows and in
bytes: it travels in every task's closure.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import DataFrame, functions as F

from ..protocol.feed_spec import SPLIT_COLUMN, FeedSpec
from ..protocol.sample import encode

SAMPLE_ROWS = 10_000
SAMPLE_BYTES = 8 * 2**20


def _to_arrow(frame: DataFrame) -> pa.Table:
    """The frame's rows as one Arrow table, on the driver (small by construction)."""
    if hasattr(frame, "toArrow"):  # Spark 4, classic and Connect
        return frame.toArrow()
    return pa.Table.from_batches(frame._collect_as_arrow(), schema=None)  # Spark 3.5


def collect_sample(frame: DataFrame, spec: FeedSpec, seed: int, rows: int = SAMPLE_ROWS) -> str:
    """Up to `rows` random training rows of the prepared `frame` (validation rows left out),
    cut to SAMPLE_BYTES, as base64 text of an Arrow IPC stream."""
    if spec.has_validation:
        frame = frame.where(F.col(SPLIT_COLUMN) == 0).drop(SPLIT_COLUMN)
    table = _to_arrow(frame.orderBy(F.rand(seed)).limit(rows)).combine_chunks()
    while table.nbytes > SAMPLE_BYTES and table.num_rows > 1:
        table = table.slice(0, table.num_rows // 2)
    return encode(table)
