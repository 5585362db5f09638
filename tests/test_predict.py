"""Predictions back into Spark and SavedModel export, on the shared local[2] session.

A job with every kind of feature column (an integer id, a float array, an ML vector)
trains, then `Job.predict` scores a DataFrame on the executors: the result keeps every
row and column, and its predictions equal `load_model().predict` on the same rows.
`Job.export` writes a SavedModel whose serving signature gives the same numbers.
"""

import numpy as np
import pytest
from conftest import DICT_FEATURES_MODEL, regression_cell, run

from tfos_magic import TfosError, get_job

ETL = """%%spark_etl scored
from pyspark.sql import functions as F
from pyspark.ml.linalg import Vectors, VectorUDT
base = spark.range(3000, numPartitions=3).select(F.col("id"), F.rand(1).alias("a"), F.rand(2).alias("b"))
to_vec = F.udf(lambda a, b: Vectors.dense([a, b]), VectorUDT())
df = base.select("id", (F.col("id") % 10).cast("int").alias("cat"), F.array("a", "b").alias("arr"),
                 to_vec("a", "b").alias("vec"), (3 * F.col("a") - 2 * F.col("b") + 0.1 * (F.col("id") % 10)).alias("y"))
df
"""
TRAIN = "%%tf_train scored --workers 1 --epochs 1 --batch-size 64 --label y --features cat,arr,vec\n" + DICT_FEATURES_MODEL


def _inputs(rows) -> dict:
    return {"cat": np.array([r["cat"] for r in rows], np.int64),
            "arr": np.array([r["arr"] for r in rows], np.float32),
            "vec": np.array([r["vec"].toArray() for r in rows], np.float32)}


@pytest.fixture
def scored(shell):
    for cell in (ETL, TRAIN):
        _, err = run(shell, cell)
        assert err is None, err
    return shell, get_job("scored")


@pytest.mark.e2e
@pytest.mark.spark35
def test_predict_runs_on_the_executors_and_matches_the_model(scored, tmp_path):
    shell, job = scored
    df = shell.user_ns["df"]
    out = job.predict(df)
    assert out.columns == df.columns + ["prediction"]
    assert "MapInArrow" in out._jdf.queryExecution().executedPlan().toString()
    rows = out.orderBy("id").limit(300).collect()
    assert out.count() == 3000 and len({r["id"] for r in rows}) == 300
    expected = job.load_model().predict(_inputs(rows), verbose=0).reshape(-1)
    got = np.array([r["prediction"] for r in rows], np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.std(got) > 0.1, "predictions should vary with the features"

    # The same numbers from the exported SavedModel's serving signature.
    path = job.export(str(tmp_path / "saved"))
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    served = list(serve(**{k: tf.constant(v) for k, v in _inputs(rows).items()}).values())[0].numpy().reshape(-1)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
def test_predict_names_what_is_wrong(scored):
    shell, job = scored
    df = shell.user_ns["df"]
    with pytest.raises(TfosError, match="lacks the feature columns vec"):
        job.predict(df.drop("vec"))
    with pytest.raises(TfosError, match="already has a column 'y'"):
        job.predict(df, output_col="y")


def test_native_stderr_is_held_while_tf_loads_and_let_out_on_failure():
    """TF's CUDA probing lines must not reach the user's cell; an import error's must."""
    import subprocess
    import sys

    code = ("import os\nfrom tfos_magic.protocol.logs import native_stderr_held\n"
            "with native_stderr_held():\n    os.write(2, b'probing noise\\n')\n"
            "try:\n    with native_stderr_held():\n        os.write(2, b'why it failed\\n'); raise ImportError\n"
            "except ImportError:\n    os.write(2, b'after\\n')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    assert err == "why it failed\nafter\n", err


SIGNED = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range(4000, numPartitions=2).select(F.rand(1).alias("a"), F.rand(2).alias("b"))
df = df.withColumn("y", {sign} * (3 * F.col("a") - 2 * F.col("b")))
df
"""
SIGNED_TRAIN = ("%%tf_train {name} --workers 1 --epochs 3 --batch-size 64 --label y --restart\n"
                + regression_cell(inputs=2, hidden=8, learning_rate=0.02))


@pytest.mark.e2e
def test_predict_after_a_retrain_serves_the_new_model(shell):
    """Spark reuses its Python workers, and a retrained job saves its model at the same
    path: a worker that cached the first model by its path served it again."""
    first = None
    for sign in (1, -1):
        for cell in (SIGNED.format(name="signed", sign=sign), SIGNED_TRAIN.format(name="signed")):
            _, err = run(shell, cell)
            assert err is None, err
        job = get_job("signed")
        frame = shell.user_ns["df"].repartition(4)
        for _ in range(2):  # every Python worker Spark keeps for later tasks loads this model
            rows = sorted(job.predict(frame).collect(), key=lambda r: r["a"])  # the same order every time
        got = np.array([r["prediction"] for r in rows], np.float32)
        label = np.array([r["y"] for r in rows], np.float32)
        assert np.corrcoef(got, label)[0, 1] > 0.9, (sign, np.corrcoef(got, label)[0, 1])
        inputs = np.array([[r["a"], r["b"]] for r in rows], np.float32)
        np.testing.assert_allclose(got, job.load_model().predict(inputs, verbose=0).reshape(-1), rtol=1e-4, atol=1e-4)
        first = got if first is None else first
    assert np.corrcoef(first, got)[0, 1] < -0.9  # the second model is not the first
