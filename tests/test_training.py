"""Training features on the shared local[2] session: validation data, dict inputs with
array columns, step checkpoints, shutdown() after success and failure, resume notes."""

import glob
import os
import re

import pytest
from conftest import DICT_FEATURES_MODEL, run

from tfos_magic import JobFailed, get_job

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
from pyspark.ml.linalg import Vectors, VectorUDT
base = spark.range(4000).select(F.col("id"), F.rand(1).alias("a"), F.rand(2).alias("b"))
to_vec = F.udf(lambda a, b: Vectors.dense([a, b]), VectorUDT())
df = base.select((F.col("id") % 10).alias("cat"), F.array("a", "b").alias("arr"), to_vec("a", "b").alias("vec"),
                 (3 * F.col("a") - 2 * F.col("b") + 0.1 * (F.col("id") % 10)).alias("y"))
val = df.limit(500)
df
"""

DICT_MODEL = DICT_FEATURES_MODEL + """
import os

def shutdown():
    open(os.path.join(MARKERS, f"shutdown-{os.getpid()}"), "w").close()
"""


@pytest.fixture
def markers(tmp_path):
    path = tmp_path / "markers"
    path.mkdir()
    return path


@pytest.mark.e2e
def test_validation_dict_inputs_arrays_step_checkpoints_and_shutdown(shell, markers, capsys):
    _, err = run(shell, ETL.format(name="feat"))
    assert err is None, err
    _, err = run(shell, "%%tf_train feat --workers 2 --epochs 2 --batch-size 100 --label y "
                        "--validation-df val --checkpoint-every-steps 7 --restart\n"
                        f"MARKERS = {str(markers)!r}\n" + DICT_MODEL)
    assert err is None, err
    job = get_job("feat")
    assert job.state == "succeeded"
    assert [h["epoch"] for h in job.history] == [1, 2]
    assert all("val_loss" in h for h in job.history), job.history
    assert job.history[-1]["loss"] < job.history[0]["loss"]
    saved = [e["step"] for e in job.events if e["kind"] == "checkpoint"]
    assert [s for s in saved if s % 7 == 0], saved
    assert len(glob.glob(os.path.join(job.checkpoint_dir, "ckpt-*.index"))) <= 3  # max_to_keep
    assert len(list(markers.iterdir())) == 2, "shutdown() runs once on each worker"
    model = job.load_model()
    assert set(model.input_names) == {"cat", "arr", "vec"}

    # Same cell again: already at --epochs, so it resumes and has nothing left to do.
    capsys.readouterr()
    _, err = run(shell, "%%tf_train feat --workers 2 --epochs 2 --batch-size 100 --label y "
                        "--validation-df val\n"
                        f"MARKERS = {str(markers)!r}\n" + DICT_MODEL)
    assert err is None, err
    assert "nothing left to train" in capsys.readouterr().out
    assert len(get_job("feat").history) == 2


@pytest.mark.e2e
def test_shutdown_runs_after_a_failure_and_the_error_names_the_cell_line(shell, markers, capsys):
    run(shell, "%%spark_etl boom\nspark.range(100).selectExpr('rand() as a', 'rand() as y')\n")
    cell = ("%%tf_train boom --workers 2 --label y\nimport os\n"
            "def train(ctx):\n"
            "    for x, y in ctx.dataset(10):\n"
            "        raise RuntimeError(f'bad idea {print(\"looking at\", len(y), \"rows\")}')\n"
            "def shutdown():\n"
            "    open(os.path.join(MARKERS, f'down-{os.getpid()}'), 'w').close()\n"
            f"MARKERS = {str(markers)!r}\n")
    _, err = run(shell, cell)
    assert isinstance(err, JobFailed), err
    assert "RuntimeError: bad idea" in str(err) and "cell line 5" in str(err)
    # Whichever worker fails first ends the attempt; its own print precedes its error on its connection.
    failed = re.search(r"worker (\d)", str(err))
    assert failed, str(err)
    assert f"[worker {failed.group(1)}] looking at 10 rows" in capsys.readouterr().out, "prints reach the notebook"
    assert get_job("boom").state == "failed"
    assert len(list(markers.iterdir())) >= 1


VAL_ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range(16000, numPartitions=2).select(F.rand(1).alias("a"), F.rand(2).alias("b")) \\
    .withColumn("y", 3 * F.col("a") - 2 * F.col("b")).withColumn("k", (F.col("a") * 10).cast("int"))
separate = spark.range(3000).select(F.rand(3).alias("a"), F.rand(4).alias("b")) \\
    .withColumn("y", 3 * F.col("a") - 2 * F.col("b")).withColumn("k", (F.col("a") * 10).cast("int"))
limited = df.limit(2000)
df
"""
VAL_MODELS = {
    "matrix": """
import tensorflow as tf
def build_model():
    m = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    m.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss="mse")
    return m
""",
    "dict": """
import tensorflow as tf
def build_model():
    a, b, k = tf.keras.Input((), name="a"), tf.keras.Input((), name="b"), tf.keras.Input((), name="k", dtype="int64")
    x = tf.keras.layers.Concatenate()([tf.stack([a, b], -1), tf.keras.layers.Flatten()(tf.keras.layers.Embedding(10, 1)(k))])
    m = tf.keras.Model({"a": a, "b": b, "k": k}, tf.keras.layers.Dense(1)(x))
    m.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss="mse")
    return m
""",
}


# Pairwise cover of inputs x validation (a limit() of the training frame, a frame of its
# own) x workers (1, 2) x epochs (1, 3: later epochs read the memory-mapped spill); no
# validation is covered by every other training test, and every combination of the four
# at the feed level by test_feed.py.
@pytest.mark.e2e
@pytest.mark.parametrize("inputs,validation,workers,epochs", [
    ("matrix", "limited", 1, 3), ("matrix", "separate", 2, 1),
    ("dict", "separate", 1, 3), ("dict", "limited", 2, 1),
])
def test_validation_with_each_input_layout(shell, inputs, validation, workers, epochs):
    name = f"val_{inputs}_{validation}_{workers}_{epochs}"
    _, err = run(shell, VAL_ETL.format(name=name))
    assert err is None, err
    features = "a,b" if inputs == "matrix" else "a,b,k"
    option = f" --validation-df {validation}" if validation else ""
    _, err = run(shell, f"%%tf_train {name} --workers {workers} --epochs {epochs} --batch-size 64 --label y "
                        f"--features {features} --inputs {inputs}{option} --max-restarts 0\n" + VAL_MODELS[inputs])
    assert err is None, err
    hist = get_job(name).history
    assert [h["epoch"] for h in hist] == list(range(1, epochs + 1)), hist
    # Predicting zero scores about 1.3. A 1-epoch loss is the mean over that epoch, early steps
    # included; the validation loss and later epochs show what was learnt.
    assert hist[-1]["loss"] < (0.3 if epochs > 1 else 1.0), hist
    if validation:
        assert all(h["val_loss"] < 0.3 for h in hist), hist
