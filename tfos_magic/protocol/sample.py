"""The sample of training rows a `build_model(sample)` gets, as it travels in the plan:
an Arrow IPC stream as base64 text (the plan is JSON). Drawn by driver/sample.py, read
by each training process."""

from __future__ import annotations

import base64

import pyarrow as pa


def encode(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def decode(text: str) -> pa.RecordBatch | None:
    """The rows as one record batch; None for none."""
    with pa.ipc.open_stream(base64.b64decode(text)) as reader:
        table = reader.read_all().combine_chunks()
    return table.to_batches(max_chunksize=table.num_rows)[0] if table.num_rows else None
