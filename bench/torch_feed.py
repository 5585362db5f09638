"""Rows/s into a PyTorch training loop: tfos-magic's feed against TorchDistributor's loader, its write-then-read design at its best, and toPandas, in one run.

Why: Spark's own route from a DataFrame into PyTorch, TorchDistributor.train_on_dataframe,
first writes each barrier task's whole partition to a local Arrow file, and only then starts
torchrun, whose loader reads that file back (pyspark/ml/torch/distributor.py and data.py);
its dataset refuses a multi-worker DataLoader, so the decoding runs on the training
process's own thread. The other usual route, df.toPandas(), pulls every row through the
driver. tfos-magic's `%%torch_train` streams Arrow from the Spark task into the training
process while it trains (the first epoch), keeping the rows for later epochs in memory.

All three ways read the same cached DataFrame on a local[2] Spark session: --rows (1M) x
8 float features f0..f7 + a float label y, in 2 partitions; --batch-size (1024) rows a batch;
--epochs (3); the same trivial step a batch (x.sum() and y.sum() into a checksum, which is
printed, so that a way that lost or doubled rows shows); torch on 1 thread everywhere.

  tfos        a real `%%torch_train` job through the job API (api.register + api.train,
              --framework torch, --workers 2, --label y, --shuffle 0 unless --shuffle is
              given, as the other ways keep Spark's order): train(ctx) iterates
              ctx.dataloader(batch_size) once per epoch, timing each pass on each worker and
              sending it with ctx.report(epoch=...). Epoch 1 streams from Spark (and writes
              the feed's local spill as it goes); epoch 2 first decodes the spill into memory
              (once, when it fits --memory-cache), and it and later epochs read memory. The
              "later" column is the median of epochs 2..E, so with --epochs 2 or 3 it holds
              that one-time cost; the per-epoch rates on stderr show it apart.
  arrow-file  TorchDistributor's way, made as fast as it can be: a barrier mapInArrow over
              the 2 partitions; each task writes its whole partition to a local Arrow IPC
              file (pyarrow.ipc.new_file), then, per epoch, memory-maps the file, turns each
              record batch into one float32 matrix and a label vector (numpy), cuts them into
              batches and hands them to torch.from_numpy, with the same step: the
              write-then-read design with a columnar reader, which Spark's own loader is not
              (spark-loader). Epoch 1 = the write plus the first read pass.
  spark-loader  TorchDistributor's own loader, as train_on_dataframe runs it: each barrier
              task writes its partition with Spark's ArrowStreamSerializer to a local file,
              then per epoch pyspark.ml.torch.data's dataset reads it through pandas, one row
              at a time, and a DataLoader of --batch-size collates the rows (the features
              stacked into a matrix), with the same step. Epoch 1 = the write plus the first pass.
  toPandas    df.toPandas() on the driver (Arrow on), one float32 matrix and label vector,
              batches sliced from them, the same step; epoch 1 includes toPandas.

Printed per way: the wall seconds of the whole run (for tfos, the api.train call with its
process start-up; for arrow-file, the Spark job; for toPandas, toPandas plus the loops),
rows/s over it (rows x epochs / wall), epoch 1's rows/s and the later epochs' (median),
each an epoch's rows of all workers / the slowest worker's time for it (every round's
per-epoch rates and checksums go to stderr as it runs); then tfos's ratios
to arrow-file and to toPandas, and arrow-file's to toPandas. With --repeats N every way runs
N times in turn (after one tiny warm-up of each) and the table shows the medians.

Usage: .venv/bin/python bench/torch_feed.py [--rows N] [--epochs E] [--batch-size B] [--repeats N]
                                            [--shuffle ROWS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import spark_session  # noqa: E402 - the same local[2] session as the other benches
from tfos_magic.training.torch_feed import rebatch  # noqa: E402 - every way cuts its batches alike

FEATURES = [f"f{i}" for i in range(8)]
LABEL = "y"
WORKERS = 2
WARM_ROWS = 4096

# The tfos job's cell: one pass of ctx.dataloader() per epoch, the same step as the baselines.
TRAIN_SOURCE = """
import time
import torch

def train(ctx):
    torch.set_num_threads(1)
    for epoch in range(ctx.epochs):
        ctx.feed.epoch = epoch
        rows, checksum, t0 = 0, 0.0, time.perf_counter()
        for x, y in ctx.dataloader(BATCH_SIZE):
            checksum += float(x.sum()) + float(y.sum())
            rows += len(x)
        seconds = time.perf_counter() - t0
        ctx.report(step=epoch + 1, epoch=epoch + 1, rows=rows, seconds=seconds, checksum=checksum,
                   rows_per_s=rows / max(seconds, 1e-9))
"""


# --- shared by the baselines -----------------------------------------------------------

def train_pass(chunks: Iterator[tuple[np.ndarray, np.ndarray]], size: int) -> tuple[int, float]:
    """One epoch of the trivial step over numpy chunks as torch batches: (rows, checksum)."""
    import warnings

    import torch

    # Arrow's memory-mapped label column is read-only; the step only reads it.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    rows, checksum = 0, 0.0
    for x, y in rebatch(chunks, size):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        checksum += float(xt.sum()) + float(yt.sum())
        rows += len(xt)
    return rows, checksum


def arrow_chunks(record_batches: Iterator[Any]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each Arrow record batch as one float32 (rows, 8) matrix and a float32 label vector."""
    for rb in record_batches:
        names = rb.schema.names
        x = np.column_stack([rb.column(names.index(c)).to_numpy(zero_copy_only=False) for c in FEATURES])
        yield x.astype(np.float32, copy=False), rb.column(names.index(LABEL)).to_numpy(zero_copy_only=False)


# --- the three ways ---------------------------------------------------------------------

def run_tfos(spark: Any, df: Any, epochs: int, batch_size: int, shuffle: int) -> dict[str, Any]:
    """A %%torch_train job through the job API; rates from its workers' epoch events."""
    import tfos_magic
    from tfos_magic import api
    from tfos_magic.protocol.options import options_from

    name = f"torchfeed-{uuid.uuid4().hex[:8]}"
    api.register(name, df)
    opts = options_from({"framework": "torch", "workers": WORKERS, "epochs": epochs, "batch_size": batch_size,
                         "label": LABEL, "shuffle": shuffle, "max_restarts": 0})
    source = f"BATCH_SIZE = {batch_size}\n" + TRAIN_SOURCE
    t0, launched = time.perf_counter(), time.time()
    api.train(name, source, opts, namespace={"spark": spark})
    wall, ended = time.perf_counter() - t0, time.time()
    job = tfos_magic.get_job(name)
    events = [e for e in job.events if e["kind"] == "epoch"]
    # Where the wall time outside the epochs goes: before the first worker's first pass
    # (Spark stage, process start, process group), and after the last worker's last epoch.
    first = min(e["time"] - e["metrics"]["seconds"] for e in events if e["epoch"] == 1)
    assert len(job.history) == epochs, job.history
    per_epoch = []
    for e in range(1, epochs + 1):
        mine = [ev["metrics"] for ev in events if ev["epoch"] == e]
        assert len(mine) == WORKERS, mine
        per_epoch.append((sum(m["rows"] for m in mine), max(m["seconds"] for m in mine),
                          sum(m["checksum"] for m in mine)))
    result = summary(wall, per_epoch)
    result["before_s"] = first - launched
    result["after_s"] = ended - max(e["time"] for e in events)
    return result


def run_arrow_file(spark: Any, df: Any, epochs: int, batch_size: int) -> dict[str, Any]:
    """TorchDistributor's way: each barrier task writes its partition to a local Arrow file,
    then reads it back (memory-mapped) per epoch."""

    def task(record_batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.ipc as ipc
        import torch

        torch.set_num_threads(1)
        fd, path = tempfile.mkstemp(suffix=".arrow", prefix="torchfeed-")
        os.close(fd)
        try:
            t0 = time.perf_counter()
            written, writer = 0, None
            with pa.OSFile(path, "wb") as sink:
                for rb in record_batches:
                    if writer is None:
                        writer = ipc.new_file(sink, rb.schema)
                    writer.write_batch(rb)
                    written += rb.num_rows
                if writer is not None:
                    writer.close()
            write_s = time.perf_counter() - t0

            def one_pass() -> tuple[int, float]:
                with pa.memory_map(path, "r") as source:
                    reader = ipc.open_file(source)
                    parts = (reader.get_batch(i) for i in range(reader.num_record_batches))
                    return train_pass(arrow_chunks(parts), batch_size) if written else (0, 0.0)

            result = timed_epochs(epochs, one_pass, write_s)
        finally:
            os.unlink(path)
        yield pa.RecordBatch.from_pylist([result])

    return _barrier_result(df, task, epochs)


def run_spark_loader(spark: Any, df: Any, epochs: int, batch_size: int) -> dict[str, Any]:
    """TorchDistributor's own loader: each barrier task writes its partition as Spark does
    (ArrowStreamSerializer into a local file), then reads it per epoch through
    pyspark.ml.torch.data's dataset and a DataLoader of `batch_size` (one row at a time
    through pandas, collated by the DataLoader), the same step."""
    schema_json = df.schema.json()

    def task(record_batches: Iterator[Any]) -> Iterator[Any]:
        import json

        import pyarrow as pa
        import torch
        from pyspark.ml.torch.data import _SparkPartitionTorchDataset
        from pyspark.sql.pandas.serializers import ArrowStreamSerializer
        from pyspark.sql.types import StructType
        from torch.utils.data import DataLoader

        torch.set_num_threads(1)
        fd, path = tempfile.mkstemp(suffix=".arrow", prefix="torchfeed-spark-")
        os.close(fd)
        schema = StructType.fromJson(json.loads(schema_json))
        names = schema.names
        try:
            t0 = time.perf_counter()
            written = 0

            def counted(batches: Iterator[Any]) -> Iterator[Any]:
                nonlocal written
                for rb in batches:
                    written += rb.num_rows
                    yield rb

            with open(path, "wb") as f:
                ArrowStreamSerializer().dump_stream(counted(record_batches), f)
            write_s = time.perf_counter() - t0
            features = [names.index(c) for c in FEATURES]

            def one_pass() -> tuple[int, float]:
                rows, checksum = 0, 0.0
                if written:
                    loader = DataLoader(_SparkPartitionTorchDataset(path, schema, written), batch_size, num_workers=0)
                    for fields in loader:
                        x = torch.stack([fields[i] for i in features], dim=1)
                        y = fields[names.index(LABEL)]
                        checksum += float(x.sum()) + float(y.sum())
                        rows += len(x)
                return rows, checksum

            result = timed_epochs(epochs, one_pass, write_s)
        finally:
            os.unlink(path)
        yield pa.RecordBatch.from_pylist([result])

    return _barrier_result(df, task, epochs)


def timed_epochs(epochs: int, one_pass: Callable[[], tuple[int, float]], write_s: float) -> dict[str, Any]:
    """A baseline task's epochs, each `one_pass()` timed: the row its task yields."""
    seconds, sums, counts = [], [], []
    for _ in range(epochs):
        t1 = time.perf_counter()
        rows, checksum = one_pass()
        seconds.append(time.perf_counter() - t1)
        sums.append(checksum)
        counts.append(rows)
    return {"rows": counts, "write_s": write_s, "seconds": seconds, "checksum": sums}


def _barrier_result(df: Any, task: Callable[[Iterator[Any]], Iterator[Any]], epochs: int) -> dict[str, Any]:
    """Run a baseline's barrier task over the partitions; the rates of its epochs."""
    schema = "rows array<bigint>, write_s double, seconds array<double>, checksum array<double>"
    t0 = time.perf_counter()
    out = df.mapInArrow(task, schema, barrier=True).collect()
    wall = time.perf_counter() - t0
    assert len(out) == df.rdd.getNumPartitions(), out
    per_epoch = []
    for e in range(epochs):
        # Epoch 1 of a task holds its write: the stream from Spark, as tfos's first pass.
        per_epoch.append((sum(r["rows"][e] for r in out),
                          max(r["seconds"][e] + (r["write_s"] if e == 0 else 0.0) for r in out),
                          sum(r["checksum"][e] for r in out)))
    result = summary(wall, per_epoch)
    result["write_s"] = max(r["write_s"] for r in out)
    return result


def run_to_pandas(df: Any, epochs: int, batch_size: int) -> dict[str, Any]:
    """df.toPandas() on the driver, then the loop over slices of its arrays."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pdf = df.toPandas()
    x = pdf[FEATURES].to_numpy(np.float32)
    y = pdf[LABEL].to_numpy(np.float32)
    del pdf
    collect_s = time.perf_counter() - t0
    per_epoch = []
    for e in range(epochs):
        t1 = time.perf_counter()
        rows, checksum = train_pass(iter([(x, y)]), batch_size)
        per_epoch.append((rows, time.perf_counter() - t1 + (collect_s if e == 0 else 0.0), checksum))
    result = summary(time.perf_counter() - t0, per_epoch)
    result["collect_s"] = collect_s
    return result


def summary(wall: float, per_epoch: list[tuple[int, float, float]]) -> dict[str, Any]:
    """Wall rate and per-epoch rates (an epoch's rows of all workers / the slowest one's time)."""
    rows = sum(r for r, _, _ in per_epoch)
    rates = [r / max(s, 1e-9) for r, s, _ in per_epoch]
    return {"wall": wall, "rows": rows, "rate": rows / wall, "epoch1": rates[0],
            "later": statistics.median(rates[1:]) if len(rates) > 1 else None,
            "epoch_rates": rates, "epoch_rows": [r for r, _, _ in per_epoch],
            "checksum": [c for _, _, c in per_epoch]}


# --- main -----------------------------------------------------------------------------------

def frame(spark: Any, rows: int, partitions: int = WORKERS) -> Any:
    """rows x f0..f7 + y, all FloatType, seeded, cached in `partitions` partitions."""
    cols = [f"cast(rand({i}) as float) as {c}" for i, c in enumerate(FEATURES)]
    df = spark.range(rows, numPartitions=partitions).selectExpr(*cols, f"cast(randn(99) as float) as {LABEL}").cache()
    assert df.count() == rows
    return df


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=3, help="epoch 1 streams from Spark, later ones reread")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shuffle", type=int, default=0,
                    help="tfos's --shuffle (0: Spark's order, as the other ways; the job's default is 65536)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tfos-torchfeed-"))
    os.environ["TFOS_HOME"] = str(work / "home")
    spark = spark_session()
    ways: dict[str, Callable[[Any], dict[str, Any]]] = {
        "tfos": lambda df: run_tfos(spark, df, args.epochs, args.batch_size, args.shuffle),
        "arrow-file": lambda df: run_arrow_file(spark, df, args.epochs, args.batch_size),
        "spark-loader": lambda df: run_spark_loader(spark, df, args.epochs, args.batch_size),
        "toPandas": lambda df: run_to_pandas(df, args.epochs, args.batch_size),
    }
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
    try:
        warm = frame(spark, WARM_ROWS)
        for way, run in ways.items():  # Python workers, torch imports, the spare processes
            run(warm)
        warm.unpersist()
        df = frame(spark, args.rows)
        for i in range(args.repeats):
            for way, run in ways.items():
                try:
                    r = run(df)
                except Exception as exc:  # noqa: BLE001 - a failed way is printed, the others still run
                    print(f"  round {i + 1} {way}: failed: {' '.join(str(exc).split())[:1500]}",
                          file=sys.stderr, flush=True)
                    continue
                runs[way].append(r)
                print(f"  round {i + 1} {way:12} wall {r['wall']:6.2f}s  {r['rate']:>10,.0f} rows/s  by epoch "
                      f"{', '.join(f'{e:,.0f}' for e in r['epoch_rates'])}  rows/epoch {r['epoch_rows']}  "
                      f"checksum {', '.join(f'{c:.6g}' for c in r['checksum'])}", file=sys.stderr, flush=True)
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"rows={args.rows:,} x {len(FEATURES)} float features + float label, {WORKERS} partitions/workers, "
          f"batch {args.batch_size}, {args.epochs} epochs, median of {args.repeats} rounds, master=local[2], "
          f"{os.cpu_count()} CPUs, tfos --shuffle {args.shuffle}")
    print(f"{'way':12} {'wall s':>8} {'rows/s (wall)':>14} {'epoch 1 rows/s':>15} {'later rows/s':>13}")
    med = {w: {k: median(rs, k) for k in ("wall", "rate", "epoch1", "later")} for w, rs in runs.items()}
    for way, m in med.items():
        if not runs[way]:
            print(f"{way:12} failed")
            continue
        later = f"{m['later']:,.0f}" if m["later"] else "-"
        print(f"{way:12} {m['wall']:8.2f} {m['rate']:14,.0f} {m['epoch1']:15,.0f} {later:>13}")
    for a, b in (("tfos", "spark-loader"), ("tfos", "arrow-file"), ("tfos", "toPandas"), ("arrow-file", "toPandas")):
        print(f"{a} / {b}: wall rate {ratio(med[a]['rate'], med[b]['rate'])}, "
              f"epoch 1 {ratio(med[a]['epoch1'], med[b]['epoch1'])}, later {ratio(med[a]['later'], med[b]['later'])}")
    extra = [f"tfos before the first pass {median(runs['tfos'], 'before_s') or 0:.2f}s and after the last "
             f"{median(runs['tfos'], 'after_s') or 0:.2f}s",
             f"arrow-file write (slowest task) {median(runs['arrow-file'], 'write_s') or 0:.2f}s",
             f"toPandas {median(runs['toPandas'], 'collect_s') or 0:.2f}s"]
    print("of which: " + ", ".join(extra))


if __name__ == "__main__":
    main()
