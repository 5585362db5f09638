"""The driver's memory while a real tfos job trains on ever more rows: it must stay flat.

tfos-magic streams each Spark partition as Arrow straight from its barrier task into that
worker's TF process; no training row passes through the driver. This measures that claim
where a user would notice it: the driver's resident memory while the job runs.

For each size in --sizes (default 1M, 4M and 16M rows) a DataFrame of 16 float32 features
and a float32 label is generated in Spark with rand() (not cached, so nothing is held
anywhere before the job, 2 partitions), on a local[2] session, and a real 2-worker job
(`launch()`, the path `%%tf_train` takes) trains a tiny Dense model (16 -> 8 -> 1, Adam,
MSE) for 1 epoch with 4096-row batches. A thread samples every 50 ms, during `launch()`:

  Python driver   this process's RSS (the notebook kernel's place): the peak's growth
                  over the RSS just before `launch()`
  JVM             the Spark driver JVM's RSS (the `java` child of this process, found with
                  psutil): just before `launch()` and its peak. In local mode the JVM is
                  also the executor, so its figure holds the tasks' work too (the rows are
                  generated and turned into Arrow there); the JVM's heap grows towards its
                  -Xmx (--driver-memory, default 1g, Spark's default) and is not given back,
                  so it plateaus rather than staying flat. On a cluster the executors are
                  other JVMs on other machines.

The TF processes and Spark's Python workers are children of the JVM and are not counted.
A tiny warm-up job runs first, so one-off imports and Spark's first-job set-up do not show
as growth of the first size. The data's size (rows x 17 x 4 bytes) is printed alongside:
`toPandas()` of the same frame would grow the driver by at least that much.

Usage: .venv/bin/python bench/memory.py [--sizes 1000000,4000000,16000000] [--quick]
                                        [--driver-memory 1g] [--timeout S]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["PYSPARK_PYTHON"] = sys.executable

import psutil
from e2e import launch_with_timeout  # the same guarded launch() as bench/e2e.py (this folder)

FEATURES = [f"f{i}" for i in range(16)]
BATCH = 4096
WORKERS = 2
SAMPLE_EVERY = 0.05  # seconds
MIB = 2**20

MODEL = """
import tensorflow as tf

def build_model():
    x = tf.keras.Input((16,), dtype="float32", name="x")
    h = tf.keras.layers.Dense(8, activation="relu")(x)
    model = tf.keras.Model(x, tf.keras.layers.Dense(1)(h))
    model.compile(optimizer=tf.keras.optimizers.Adam(), loss="mse")
    return model
"""


class PeakRss:
    """Samples the RSS of some processes every SAMPLE_EVERY seconds on a thread, keeping
    each one's value at the start and its peak. A process that is gone keeps its last peak."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.base = {k: self._rss(p) for k, p in procs.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    @staticmethod
    def _rss(proc: psutil.Process) -> int:
        try:
            return proc.memory_info().rss
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            for k, p in self.procs.items():
                self.peak[k] = max(self.peak[k], self._rss(p))

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for k, p in self.procs.items():  # one last sample
            self.peak[k] = max(self.peak[k], self._rss(p))


def spark_jvm(spark: Any) -> psutil.Process:
    """The Spark driver JVM: the `java` process among this process's descendants (else the
    pid the JVM gives for itself, should it run under another name)."""
    javas = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "java":
                javas.append(p)
        except psutil.Error:  # a short-lived child, gone
            pass
    if len(javas) == 1:
        return javas[0]
    return psutil.Process(int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()))


def spark_session(driver_memory: str) -> Any:
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.driver.memory", driver_memory).config("spark.pyspark.python", sys.executable)
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def frame(spark: Any, rows: int) -> Any:
    """rows x (16 float32 features + float32 label y), generated by Spark, not cached."""
    cols = [f"cast(rand({i}) as float) as {c}" for i, c in enumerate(FEATURES)] + ["cast(rand(99) as float) as y"]
    return spark.range(rows, numPartitions=2).selectExpr(*cols)


def train_once(spark: Any, store: Any, jvm: psutil.Process, rows: int, timeout: float) -> dict[str, Any]:
    """One 1-epoch job on `rows` generated rows, with the driver's and the JVM's RSS sampled."""
    from tfos_magic.job import JobSpec, TrainOptions

    name = f"memory-{rows}-{uuid.uuid4().hex[:6]}"
    opts = TrainOptions(workers=WORKERS, epochs=1, label="y", batch_size=BATCH, inputs="matrix", max_restarts=0,
                        start_timeout=min(timeout, 300.0), stall_timeout=min(timeout, 300.0))
    spec = JobSpec(name, etl_source="generated", train_source=MODEL, options=opts)
    store.save_spec(spec)
    df = frame(spark, rows)
    with PeakRss({"python": psutil.Process(), "jvm": jvm}) as rss:
        t0 = time.perf_counter()
        launch_with_timeout(spark, spec, df, store, timeout)
        wall = time.perf_counter() - t0
    epochs = [e for e in store.events(name) if e["kind"] == "epoch" and e["epoch"] == 1]
    assert sorted(e["worker"] for e in epochs) == list(range(WORKERS)), epochs
    steps = max(e["step"] for e in epochs)
    want = -(-(-(-rows // WORKERS)) // BATCH)  # spark.range splits evenly: the larger half's batches
    return {"rows": rows, "wall": wall, "steps": steps, "want": want,
            "py_base": rss.base["python"], "py_peak": rss.peak["python"],
            "jvm_base": rss.base["jvm"], "jvm_peak": rss.peak["jvm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help="comma-separated row counts (default 1000000,4000000,16000000)")
    ap.add_argument("--quick", action="store_true", help="sizes 20000,40000: a smoke test")
    ap.add_argument("--driver-memory", default="1g", help="spark.driver.memory (default 1g, Spark's default)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds any one job may take")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("20000,40000" if args.quick else "1000000,4000000,16000000")).split(",")]
    from tfos_magic.job import JobStore

    work = Path(tempfile.mkdtemp(prefix="tfos-memory-"))
    store = JobStore(work / "store")
    spark = spark_session(args.driver_memory)
    results = []
    try:
        jvm = spark_jvm(spark)
        warm = train_once(spark, store, jvm, 2 * BATCH * WORKERS, args.timeout)
        print(f"  warm-up job: {warm['wall']:.1f}s, Python driver grew {(warm['py_peak'] - warm['py_base']) / MIB:.0f} MiB",
              file=sys.stderr, flush=True)
        for rows in sizes:
            r = train_once(spark, store, jvm, rows, args.timeout)
            results.append(r)
            print(f"  {rows:,} rows: {r['wall']:.1f}s", file=sys.stderr, flush=True)
    except BaseException:
        print(f"failed; the job store is kept in {work}", file=sys.stderr)
        raise
    finally:
        spark.stop()

    print(f"1 epoch, {WORKERS} workers, batch {BATCH}, 16 float32 features + label, 2 partitions generated "
          f"by rand() (not cached), master=local[2], spark.driver.memory={args.driver_memory}, "
          f"RSS sampled every {SAMPLE_EVERY * 1000:.0f} ms")
    print(f"{'rows':>12} {'data MiB':>9} {'py before':>10} {'py peak growth':>15} "
          f"{'JVM before':>11} {'JVM peak':>9} {'wall s':>7} {'rows/s':>9}")
    for r in results:
        data = r["rows"] * (len(FEATURES) + 1) * 4 / MIB
        print(f"{r['rows']:>12,} {data:9,.0f} {r['py_base'] / MIB:10,.0f} {(r['py_peak'] - r['py_base']) / MIB:15,.1f} "
              f"{r['jvm_base'] / MIB:11,.0f} {r['jvm_peak'] / MIB:9,.0f} {r['wall']:7.1f} {r['rows'] / r['wall']:9,.0f}")
    print("(MiB; py = this Python driver process; JVM = the Spark driver JVM, also the executor in local mode)")
    for r in results:
        # TF's per-step agreement on the end of the data may add one empty step on every worker
        # at the end of a streamed epoch (tests/test_magics.py, uneven partitions).
        if r["steps"] not in (r["want"], r["want"] + 1):
            print(f"  note {r['rows']:,} rows: the chief took {r['steps']} steps, its data makes {r['want']} batches")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
