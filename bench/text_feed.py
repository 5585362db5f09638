"""Rows/s of text and binary columns into tf.data: the tfos feed against toPandas, in one run.

Two cached DataFrames on a local[2] session, 2 partitions, 512-row batches, a float32
label beside the one feature column:

  text    200-character strings (hex digits of a hash, so no two rows are alike)
  binary  1 KiB of bytes a row (a hash's bytes, repeated)

For each, the same paths as bench/feed.py:

  tfos feed  2 barrier tasks stream Arrow into 2 TF processes; each worker times its
             pass from its first batch (after an all-reduce) to its last, all rows over
             the slower worker's time. Epoch 1 streams from Spark, epoch 2 reads the
             worker's memory or spill. The tf.string tensors come from Arrow's buffers
             as numpy object arrays of bytes, built in Arrow's C++.
  toPandas   df.toPandas() (Arrow on) -> from_tensor_slices -> batch, in the driver.

Each path runs --repeats times (default 3); the table shows the medians and the ratio
to toPandas.

Usage: .venv/bin/python bench/text_feed.py [--rows N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feed import BATCH, bench_tfos, consume, local_session  # noqa: E402 - after the environment above


def frames(spark, rows: int) -> dict[str, object]:
    """The two DataFrames, cached and counted (their ETL is no part of any timing)."""
    from pyspark.sql import functions as F

    base = spark.range(rows, numPartitions=2)
    digest = F.sha2(F.col("id").cast("string"), 256)  # 64 hex digits: 32 bytes
    label = F.rand(9).cast("float").alias("y")
    out = {
        "text (200 chars)": base.select(F.substring(F.repeat(digest, 4), 1, 200).alias("x"), label),
        "binary (1 KiB)": base.select(F.unhex(F.repeat(digest, 32)).alias("x"), label),
    }
    for df in out.values():
        df.cache()
        assert df.count() == rows
    return out


def bench_to_pandas(df) -> float:
    import tensorflow as tf

    t0 = time.perf_counter()
    pdf = df.toPandas()
    ds = tf.data.Dataset.from_tensor_slices(({"x": pdf["x"].to_numpy(object)}, pdf["y"].to_numpy(np.float32)))
    rows = consume(ds.batch(BATCH))
    return rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spark = local_session("4g")
    data = frames(spark, args.rows)

    import tensorflow as tf  # noqa: F401  (start-up kept out of the in-process timings)

    med = statistics.median
    print(f"rows={args.rows} one feature column + float32 label, partitions=2 batch={BATCH} master=local[2] "
          f"median of {args.repeats}")
    print(f"{'column':18} {'path':38} {'rows/s':>10} {'MiB/s':>8} {'vs toPandas':>12}")
    for name, df in data.items():
        row_bytes = 200 if name.startswith("text") else 1024
        pandas_rate = med(bench_to_pandas(df) for _ in range(args.repeats))
        runs = [bench_tfos(spark, df) for _ in range(args.repeats)]
        assert all(r["rows"] == args.rows for r in runs), runs
        tfos = {k: med(r[k] for r in runs) for k in ("epoch1", "epoch2", "wall")}
        for path, rate in (("tfos feed, epoch 1 (streamed from Spark)", tfos["epoch1"]),
                           ("tfos feed, epoch 2 (memory)", tfos["epoch2"]),
                           ("tfos job wall time incl. TF start-up", args.rows / tfos["wall"]),
                           ("toPandas -> from_tensor_slices", pandas_rate)):
            print(f"{name:18} {path:38} {rate:10,.0f} {rate * row_bytes / 2**20:8.1f} {rate / pandas_rate:11.2f}x")
    spark.stop()


if __name__ == "__main__":
    main()
