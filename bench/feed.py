"""Rows/s into tf.data: tfos-magic's feed against the usual alternatives, in one run.

All paths read the same cached DataFrame: 1M rows x 16 float32 features + a float32
label in 2 partitions, on a local[2] Spark session, 512-row batches.

  tfos feed      2 barrier tasks stream Arrow into 2 TF processes: steady-state rate,
                 timed on each worker from its first batch (after an all-reduce, so no
                 worker's TF start-up competes for the 2 cores) to its last, all rows over
                 the slower worker's time; epoch 1 from Spark, epoch 2 from the local
                 spill. Plus the job's whole wall time, Spark and TF start-up included.
  toPandas       df.toPandas() (Arrow on) -> from_tensor_slices -> batch, in the driver
  upper bound    an in-memory pyarrow Table -> numpy -> from_tensor_slices -> batch

Each path runs --repeats times (default 3); the table shows the median.

Usage: .venv/bin/python bench/feed.py [--rows N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

import numpy as np
import pyarrow as pa

FEATURES = [f"f{i}" for i in range(16)]
BATCH = 512

TRAIN = f"""
import time
import tensorflow as tf

def barrier(ctx):
    # An all-reduce: no worker starts its clock while another is still starting up.
    ctx.strategy.reduce("SUM", ctx.strategy.run(lambda: tf.constant(1.0)), axis=None)

def train(ctx):
    for epoch in (1, 2):
        batches = iter(ctx.dataset({BATCH}))
        x, y = next(batches)  # pipeline built and first batch in, on every worker
        barrier(ctx)
        rows, t0 = int(y.shape[0]), time.perf_counter()
        for x, y in batches:
            rows += int(y.shape[0])
        ctx.report(epoch=epoch, rows=rows, seconds=time.perf_counter() - t0)
"""


def consume(ds) -> int:
    rows = 0
    for _, y in ds:
        rows += int(y.shape[0])
    return rows


def bench_tfos(spark, df) -> dict[str, float]:
    from tfos_magic.driver.launcher import launch
    from tfos_magic.job import JobSpec, JobStore, TrainOptions

    store = JobStore(tempfile.mkdtemp(prefix="tfos-bench-"))
    spec = JobSpec("bench", etl_source="df", train_source=TRAIN,
                   options=TrainOptions(workers=2, label="y", batch_size=BATCH))
    store.save_spec(spec)
    t0 = time.perf_counter()
    launch(spark, spec, df, store)
    wall = time.perf_counter() - t0
    out = {"wall": wall}
    for epoch in (1, 2):
        ev = [e for e in store.events("bench") if e["kind"] == "epoch" and e["epoch"] == epoch]
        rows = sum(e["metrics"]["rows"] for e in ev)
        out[f"epoch{epoch}"] = rows / max(e["metrics"]["seconds"] for e in ev)
        out["rows"] = rows
    return out


def bench_to_pandas(df) -> float:
    import tensorflow as tf

    t0 = time.perf_counter()
    pdf = df.toPandas()
    ds = tf.data.Dataset.from_tensor_slices((pdf[FEATURES].to_numpy(np.float32), pdf["y"].to_numpy(np.float32)))
    rows = consume(ds.batch(BATCH))
    return rows / (time.perf_counter() - t0)


def bench_upper_bound(n: int) -> float:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    table = pa.table({c: rng.random(n, dtype=np.float32) for c in FEATURES + ["y"]})
    t0 = time.perf_counter()
    x = np.column_stack([table.column(c).to_numpy() for c in FEATURES])
    ds = tf.data.Dataset.from_tensor_slices((x, table.column("y").to_numpy())).batch(BATCH)
    rows = consume(ds)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.driver.memory", "3g").config("spark.pyspark.python", sys.executable)
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    cols = [f"cast(rand({i}) as float) as {c}" for i, c in enumerate(FEATURES)] + ["cast(rand(99) as float) as y"]
    df = spark.range(args.rows, numPartitions=2).selectExpr(*cols).cache()
    assert df.count() == args.rows

    import tensorflow as tf  # noqa: F401  (start-up kept out of the in-process timings)

    med = statistics.median
    upper = med(bench_upper_bound(args.rows) for _ in range(args.repeats))
    pandas_rate = med(bench_to_pandas(df) for _ in range(args.repeats))
    runs = [bench_tfos(spark, df) for _ in range(args.repeats)]
    assert all(r["rows"] == args.rows for r in runs), runs
    tfos = {k: med(r[k] for r in runs) for k in ("epoch1", "epoch2", "wall")}

    print(f"rows={args.rows} features=16 float32 partitions=2 batch={BATCH} master=local[2] "
          f"median of {args.repeats}")
    print(f"{'path':44} {'rows/s':>12} {'vs toPandas':>12} {'vs upper':>9}")
    rows = [
        ("tfos feed, epoch 1 (streamed from Spark)", tfos["epoch1"]),
        ("tfos feed, epoch 2 (local Arrow spill)", tfos["epoch2"]),
        ("tfos job wall time incl. TF start-up", args.rows / tfos["wall"]),
        ("toPandas -> from_tensor_slices", pandas_rate),
        ("upper bound: in-memory Arrow -> numpy -> tf.data", upper),
    ]
    for name, rate in rows:
        print(f"{name:44} {rate:12,.0f} {rate / pandas_rate:11.2f}x {rate / upper:8.0%}")
    spark.stop()


if __name__ == "__main__":
    main()
