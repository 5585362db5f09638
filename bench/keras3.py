"""Step overhead of the Keras 3 path against the legacy tf.keras path, side by side in one run.

The same mlp model as bench/e2e.py (Dense 16->64->64->1, Adam, MSE, batch 512 rows per
worker), written once with `tf.keras` (legacy Keras, trained with `fit`) and once with
`import keras` (Keras 3, trained by training/keras3_loop.py's step loop), on:

  plain     one fresh TF process, from_tensor_slices -> batch, model.fit (each Keras' own)
  tfos w1   the real launch() path, 1 worker, local[2] Spark
  tfos w2   the same with 2 workers (MultiWorkerMirroredStrategy)
  bare w2   2 bare MultiWorkerMirroredStrategy processes, legacy fit, fixed steps and 32 MiB
            packs (bench/e2e.py's "mwms b"; Keras 3's fit fails under that strategy)

Each round runs every row once, the legacy and Keras 3 rows of a kind back to back, and
--repeats rounds run in turn. A row's rate is the median of its epochs after the first
(rows of all workers / epoch time). Printed: each row's rates, and per kind the median of
the Keras 3 / legacy ratios of the rounds, with their spread.

Usage: .venv/bin/python bench/keras3.py [--rows N] [--epochs E] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e  # noqa: E402 - the shared baselines and tfos launch
import numpy as np  # noqa: E402

KINDS = ("plain", "tfos w1", "tfos w2")


def _with_keras(keras: str, measure: Callable[[], dict[str, Any]]) -> float | None:
    os.environ[e2e.KERAS_ENV] = keras
    try:
        run = measure()
        return float(np.median(run["epoch_rates"][1:]))
    except Exception as exc:  # noqa: BLE001 - a failed row is printed, the others still run
        print(f"  failed (Keras {keras}): {' '.join(str(exc).split())[:1500]}", file=sys.stderr, flush=True)
        return None
    finally:
        os.environ.pop(e2e.KERAS_ENV, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=4, help="epochs a run; the median of epochs 2..E is its rate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    from tfos_magic.job import JobStore

    work = Path(tempfile.mkdtemp(prefix="tfos-keras3-"))
    store = JobStore(work / "store")
    cols = e2e.make_data("mlp", args.rows)
    data = work / "mlp.npz"
    np.savez(data, **cols)
    spark = e2e.spark_session()
    rates: dict[tuple[str, str], list[float | None]] = {}
    bare: list[float | None] = []
    try:
        e2e.warm_up(spark, store, args.timeout)
        frames = {1: e2e.frame(spark, cols, 1), 2: e2e.frame(spark, cols, 2)}
        runs = {
            "plain": lambda: e2e.bench_plain("mlp", data, work, e2e.BATCH, args.epochs, args.timeout),
            "tfos w1": lambda: e2e.bench_tfos(spark, frames[1], store, "mlp", 1, args.epochs, args.rows, args.timeout),
            "tfos w2": lambda: e2e.bench_tfos(spark, frames[2], store, "mlp", 2, args.epochs, args.rows, args.timeout),
        }
        for i in range(args.repeats):
            for kind in KINDS:
                for keras in ("2", "3"):
                    rate = _with_keras(keras, runs[kind])
                    rates.setdefault((kind, keras), []).append(rate)
                    print(f"  round {i + 1} {kind} Keras {keras}: {rate or 0:,.0f} rows/s", file=sys.stderr, flush=True)
            bare.append(_with_keras("2", lambda: e2e.bench_mwms("mlp", data, work, "b", args.epochs, args.timeout)))
    finally:
        spark.stop()
    print(f"rows={args.rows} batch={e2e.BATCH} rows per worker a step, median of epochs 2-{args.epochs}, "
          f"{args.repeats} rounds, master=local[2], {os.cpu_count()} CPUs")
    print(f"{'path':12} {'legacy tf.keras rows/s':>34} {'Keras 3 rows/s':>34} {'Keras 3 / legacy':>22}")
    for kind in KINDS:
        old, new = rates[(kind, "2")], rates[(kind, "3")]
        ratios = [n / o for o, n in zip(old, new) if o and n]
        text = (f"{float(np.median(ratios)):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "failed")
        print(f"{kind:12} {', '.join(f'{r or 0:,.0f}' for r in old):>34} {', '.join(f'{r or 0:,.0f}' for r in new):>34} "
              f"{text:>22}")
    w2 = rates[("tfos w2", "3")]
    vs = [n / b for n, b in zip(w2, bare) if n and b]
    print(f"bare MWMS x2 (legacy fit, fixed steps): {', '.join(f'{r or 0:,.0f}' for r in bare)} rows/s; "
          + (f"tfos w2 Keras 3 / bare: median {float(np.median(vs)):.2f}x" if vs else "no ratio"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
