"""Rows/s of the feed with and without shuffling, side by side in one run.

What shuffling changes is the TF process's side of the feed: the Arrow stream read into
tf.data (epoch 1) and the spill read back (later epochs). This runs that side alone, the
real `ArrowFeed` in one process, on an in-memory Arrow IPC stream of --rows rows x 16
float32 features + a float32 label (Spark's side, which shuffling does not touch, is
left out so that the difference is not lost in it), 512-row batches as the job's
`tf.data` pipeline takes them. Each setting (--shuffle 0, a quarter of the default, the
default and 4x it) runs --repeats times, interleaved; the table shows the medians, and
the median of each repeat's ratio to the no-shuffle run beside it (this machine's rate
drifts by a third between runs; a paired ratio does not).

Usage: .venv/bin/python bench/shuffle.py [--rows N] [--repeats R]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np
import pyarrow as pa

from tfos_magic.protocol.feed_spec import ColumnSpec, FeedSpec
from tfos_magic.protocol.options import TrainOptions
from tfos_magic.training.arrow_feed import ArrowFeed

FEATURES = [f"f{i}" for i in range(16)]
BATCH = 512
SPARK_BATCH = 10_000  # spark.sql.execution.arrow.maxRecordsPerBatch's default


def stream(rows: int) -> bytes:
    rng = np.random.default_rng(0)
    sink = io.BytesIO()
    schema = pa.schema([(f, pa.float32()) for f in FEATURES + ["y"]])
    with pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, rows, SPARK_BATCH):
            n = min(SPARK_BATCH, rows - start)
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.array(rng.random(n, dtype=np.float32)) for _ in FEATURES + ["y"]], schema=schema))
    return sink.getvalue()


def one_run(data: bytes, shuffle: int, rows: int) -> tuple[float, float]:
    """(epoch 1 rows/s, epoch 2 rows/s) of one feed."""
    spec = FeedSpec([ColumnSpec(f, "float32") for f in FEATURES], ColumnSpec("y", "float32"), "matrix")
    with tempfile.TemporaryDirectory() as spill:
        feed = ArrowFeed(io.BytesIO(data), spec, spill, shuffle_rows=shuffle, seed=("bench", 1, 0))
        ds = feed.dataset(BATCH)
        rates = []
        for epoch in range(2):
            feed.epoch = epoch
            seen, t0 = 0, time.perf_counter()
            for x, _ in ds:
                seen += int(x.shape[0])
            rates.append(seen / (time.perf_counter() - t0))
            assert seen == rows, (seen, rows)
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    default = TrainOptions().shuffle
    settings = [0, default // 4, default, 4 * default]
    data = stream(args.rows)
    one_run(data, 0, args.rows)  # warm-up: TF's first dataset pays for its start
    results: dict[int, list[tuple[float, float]]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            results[s].append(one_run(data, s, args.rows))
    print(f"{args.rows:,} rows x {len(FEATURES)} float32 + label, batch {BATCH}, median of {args.repeats}; "
          "the ratio is the median of each repeat's ratio to the no-shuffle run beside it")
    print("| --shuffle | epoch 1 (stream) rows/s | vs 0 | epoch 2 (spill) rows/s | vs 0 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for s in settings:
        med = [statistics.median(r[i] for r in results[s]) for i in range(2)]
        ratio = [statistics.median(r[i] / b[i] for r, b in zip(results[s], results[0])) for i in range(2)]
        label = f"{s:,}" + (" (default)" if s == default else "")
        print(f"| {label} | {med[0]:,.0f} | {ratio[0]:.2f}x | {med[1]:,.0f} | {ratio[1]:.2f}x |")


if __name__ == "__main__":
    main()
