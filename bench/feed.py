"""Rows/s into tf.data: tfos-magic's feed against the usual alternatives, in one run.

All paths read the same cached DataFrame: 1M rows x 16 float32 features + a float32
label in 2 partitions, on a local[2] Spark session, 512-row batches.

  tfos feed      2 barrier tasks stream Arrow into 2 TF processes: steady-state rate,
                 timed on each worker from its first batch (after an all-reduce, so no
                 worker's TF start-up competes for the 2 cores) to its last, all rows over
                 the slower worker's time; epoch 1 from Spark, epoch 2 from the local
                 spill. Plus the job's whole wall time, Spark and TF start-up included.
  toPandas       df.toPandas() (Arrow on) -> from_tensor_slices -> batch, in the driver
  Parquet        materialise-then-read, what a pipeline does when Spark and TF only share
                 storage: df.write.parquet(tmpdir), then pyarrow.dataset reads the files
                 -> numpy -> from_tensor_slices -> batch, in the driver; timed from the
                 write's start to the last batch consumed (the write is part of the cost).
                 Here the files are on the local disk; on a cluster they would go through
                 shared storage (HDFS, an object store), which is slower.
  row-at-a-time  the feed of older tools (TensorFlowOnSpark's InputMode.SPARK and the
                 like): Spark rows iterated in Python and each row pickled through a
                 queue into the TF process, which reads them with from_generator. Here the
                 driver is the producer: it iterates df.toLocalIterator() and puts each
                 row, a tuple of 17 Python floats, on a multiprocessing.Queue, one put a
                 row (no batching); a fresh consumer process (spawned, TF imported and its
                 pipeline built before the producer starts) runs
                 from_generator(one row a yield) -> batch, counting rows. Timed in the
                 consumer from the first row it receives to the last batch; the producer
                 stops after --row-baseline-rows rows (default 100k, a subset since the
                 path is slow; the table's label says so). TensorFlowOnSpark pushes from
                 a mapPartitions on the executors into a multiprocessing manager's queue
                 instead, still one put a row; the per-row pickling, queue hand-off and
                 from_generator call are the same.
  upper bound    an in-memory pyarrow Table -> numpy -> from_tensor_slices -> batch

Each path runs --repeats times (default 3); the table shows the median.

With --shuffle, only the tfos feed runs, with --shuffle 0 and with the default, one after
the other in each repeat, and the table gives each epoch's rate and its ratio to none.

Usage: .venv/bin/python bench/feed.py [--rows N] [--repeats R] [--row-baseline-rows N] [--shuffle]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Iterator

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

import numpy as np
import pyarrow as pa

FEATURES = [f"f{i}" for i in range(16)]
BATCH = 512
ROW_QUEUE_SIZE = 10_000  # rows the row-at-a-time queue holds before a put blocks
ROW_TIMEOUT = 300.0  # seconds any one wait of the row-at-a-time baseline may take

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


def bench_tfos(spark, df, shuffle: int | None = None) -> dict[str, float]:
    from tfos_magic.driver.launcher import launch
    from tfos_magic.job import JobSpec, JobStore, TrainOptions

    home = tempfile.mkdtemp(prefix="tfos-bench-")
    try:
        store = JobStore(home)
        spec = JobSpec("bench", etl_source="df", train_source=TRAIN,
                       options=TrainOptions(workers=2, label="y", batch_size=BATCH,
                                            **({} if shuffle is None else {"shuffle": shuffle})))
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
    finally:
        shutil.rmtree(home, ignore_errors=True)


def bench_to_pandas(df) -> float:
    import tensorflow as tf

    t0 = time.perf_counter()
    pdf = df.toPandas()
    ds = tf.data.Dataset.from_tensor_slices((pdf[FEATURES].to_numpy(np.float32), pdf["y"].to_numpy(np.float32)))
    rows = consume(ds.batch(BATCH))
    return rows / (time.perf_counter() - t0)


def bench_parquet(df, n: int) -> float:
    """df.write.parquet, then pyarrow.dataset -> numpy -> from_tensor_slices -> batch; write included."""
    import pyarrow.dataset as pds
    import tensorflow as tf

    work = tempfile.mkdtemp(prefix="tfos-bench-parquet-")
    path = os.path.join(work, "data")
    try:
        t0 = time.perf_counter()
        df.write.parquet(path)
        table = pds.dataset(path, format="parquet").to_table()
        x = np.column_stack([table.column(c).to_numpy() for c in FEATURES])
        ds = tf.data.Dataset.from_tensor_slices((x, table.column("y").to_numpy())).batch(BATCH)
        rows = consume(ds)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert rows == n, (rows, n)
    return rows / seconds


def row_consumer(rows_q: Any, ready: Any, result_q: Any) -> None:
    """The TF side of the row-at-a-time baseline, in its own process: from_generator over
    the queue, one row a yield, batched; puts (rows, seconds from the first row to the end)."""
    try:
        import tensorflow as tf

        first: list[float] = []

        def rows_from_queue() -> Iterator[tuple[tuple[float, ...], float]]:
            while True:
                row = rows_q.get(timeout=ROW_TIMEOUT)
                if row is None:
                    return
                if not first:
                    first.append(time.perf_counter())
                yield row[:-1], row[-1]

        signature = (tf.TensorSpec((len(FEATURES),), tf.float32), tf.TensorSpec((), tf.float32))
        batches = iter(tf.data.Dataset.from_generator(rows_from_queue, output_signature=signature).batch(BATCH))
        ready.set()
        rows = 0
        for _, y in batches:
            rows += int(y.shape[0])
        result_q.put(("ok", rows, time.perf_counter() - first[0] if first else 0.0))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result_q.put(("error", f"{type(exc).__name__}: {exc}", 0.0))


def bench_row_at_a_time(df, limit: int) -> tuple[float, int]:
    """The driver iterates the DataFrame's rows and puts each, as a tuple of floats, on a
    multiprocessing.Queue read by a TF process through from_generator. Returns (rows/s, rows)."""
    ctx = mp.get_context("spawn")  # no fork of a process that holds TF and a JVM gateway
    rows_q, result_q, ready = ctx.Queue(maxsize=ROW_QUEUE_SIZE), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=row_consumer, args=(rows_q, ready, result_q), name="row-consumer", daemon=True)
    proc.start()
    ok = False
    try:
        deadline = time.monotonic() + ROW_TIMEOUT
        while not ready.wait(1.0):  # TF imported and the pipeline built before the first row
            if not proc.is_alive() or time.monotonic() > deadline:
                break
        if not ready.is_set():
            try:
                status = result_q.get(timeout=5)
            except queue.Empty:
                status = ("error", f"exit code {proc.exitcode}" if not proc.is_alive() else "start-up timeout", 0)
            raise RuntimeError(f"row-at-a-time consumer did not start: {status[1]}")
        sent = 0
        for row in df.toLocalIterator():
            if sent == limit:
                break
            rows_q.put(tuple(row), timeout=ROW_TIMEOUT)
            sent += 1
        rows_q.put(None, timeout=ROW_TIMEOUT)
        status, rows, seconds = result_q.get(timeout=ROW_TIMEOUT)
        if status != "ok":
            raise RuntimeError(f"row-at-a-time consumer failed: {rows}")
        assert rows == sent, (rows, sent)
        proc.join(30)
        ok = True
        return rows / seconds, rows
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(30)
        if not ok:  # rows left in the pipe must not hold this process's exit
            rows_q.cancel_join_thread()
        rows_q.close()
        result_q.close()


def bench_upper_bound(n: int) -> float:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    table = pa.table({c: rng.random(n, dtype=np.float32) for c in FEATURES + ["y"]})
    t0 = time.perf_counter()
    x = np.column_stack([table.column(c).to_numpy() for c in FEATURES])
    ds = tf.data.Dataset.from_tensor_slices((x, table.column("y").to_numpy())).batch(BATCH)
    rows = consume(ds)
    return rows / (time.perf_counter() - t0)


def compare_shuffle(spark, df, args) -> None:
    """The job's feed with the default shuffle against none, run after run: rows/s of each
    epoch, and the median of each pair's ratio (this machine drifts between runs)."""
    from tfos_magic.job import TrainOptions

    default = TrainOptions().shuffle
    pairs = [(bench_tfos(spark, df, shuffle=0), bench_tfos(spark, df)) for _ in range(args.repeats)]
    med = statistics.median
    print(f"rows={args.rows} features=16 float32 partitions=2 batch={BATCH} master=local[2] "
          f"median of {args.repeats}; the ratio is the median of each pair's")
    print("| --shuffle | epoch 1 (streamed from Spark) rows/s | vs 0 | epoch 2 (spill) rows/s | vs 0 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, k in (("0", 0), (f"{default:,} (default)", 1)):
        rates = [med(p[k][e] for p in pairs) for e in ("epoch1", "epoch2")]
        ratios = [med(p[k][e] / p[0][e] for p in pairs) for e in ("epoch1", "epoch2")]
        print(f"| {label} | {rates[0]:,.0f} | {ratios[0]:.2f}x | {rates[1]:,.0f} | {ratios[1]:.2f}x |")


def local_session(driver_memory: str) -> Any:
    """The benches' Spark: local[2], Arrow on, the executors on this Python."""
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.driver.memory", driver_memory).config("spark.pyspark.python", sys.executable)
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shuffle", action="store_true",
                    help="only the tfos feed, with --shuffle 0 and with the default, interleaved")
    ap.add_argument("--row-baseline-rows", type=int, default=100_000,
                    help="rows the row-at-a-time baseline feeds (a subset: it is slow); default 100000")
    args = ap.parse_args()
    spark = local_session("3g")
    cols = [f"cast(rand({i}) as float) as {c}" for i, c in enumerate(FEATURES)] + ["cast(rand(99) as float) as y"]
    df = spark.range(args.rows, numPartitions=2).selectExpr(*cols).cache()
    assert df.count() == args.rows

    import tensorflow as tf  # noqa: F401  (start-up kept out of the in-process timings)

    med = statistics.median
    if args.shuffle:
        compare_shuffle(spark, df, args)
        spark.stop()
        return
    upper = med(bench_upper_bound(args.rows) for _ in range(args.repeats))
    pandas_rate = med(bench_to_pandas(df) for _ in range(args.repeats))
    parquet_rate = med(bench_parquet(df, args.rows) for _ in range(args.repeats))
    row_runs = [bench_row_at_a_time(df, min(args.row_baseline_rows, args.rows)) for _ in range(args.repeats)]
    row_rate, row_rows = med(r for r, _ in row_runs), row_runs[0][1]
    runs = [bench_tfos(spark, df) for _ in range(args.repeats)]
    assert all(r["rows"] == args.rows for r in runs), runs
    tfos = {k: med(r[k] for r in runs) for k in ("epoch1", "epoch2", "wall")}

    print(f"rows={args.rows} features=16 float32 partitions=2 batch={BATCH} master=local[2] "
          f"median of {args.repeats}")
    subset = f", first {row_rows:,} rows" if row_rows < args.rows else ""
    rows = [
        ("tfos feed, epoch 1 (streamed from Spark)", tfos["epoch1"]),
        ("tfos feed, epoch 2 (local Arrow spill)", tfos["epoch2"]),
        ("tfos job wall time incl. TF start-up", args.rows / tfos["wall"]),
        ("toPandas -> from_tensor_slices", pandas_rate),
        ("Parquet materialise-then-read, write incl.", parquet_rate),
        (f"row-at-a-time feed (older tools){subset}", row_rate),
        ("upper bound: in-memory Arrow -> numpy -> tf.data", upper),
    ]
    width = max(44, max(len(name) for name, _ in rows))
    print(f"{'path':{width}} {'rows/s':>12} {'vs toPandas':>12} {'vs upper':>9}")
    for name, rate in rows:
        print(f"{name:{width}} {rate:12,.0f} {rate / pandas_rate:11.2f}x {rate / upper:8.0%}")
    spark.stop()


if __name__ == "__main__":
    main()
