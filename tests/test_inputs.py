"""How features reach the model: `--inputs auto` picks the layout a model expects, and a
model whose inputs do not match the feed gets an error that says what the feed gives
and which option would match."""

import numpy as np
import pytest
from conftest import run
from pyspark.sql import types as T

from tfos_magic import JobFailed, get_job
from tfos_magic.driver.columns import prepare
from tfos_magic.protocol.feed_spec import ColumnSpec, FeedSpec
from tfos_magic.training.model_inputs import InputMismatch, check, mismatch


def _frame(spark, **types):
    schema = T.StructType([T.StructField(n, t) for n, t in types.items()])
    return spark.createDataFrame([], schema)


def test_auto_picks_a_matrix_for_floats_arrays_and_vectors_and_a_dict_for_ids(spark):
    from pyspark.ml.linalg import VectorUDT

    floats = T.ArrayType(T.FloatType())
    cases = [
        ({"pixels": floats, "label": T.LongType()}, "matrix"),
        ({"a": T.DoubleType(), "vec": VectorUDT(), "arr": T.ArrayType(T.DoubleType()), "label": T.LongType()}, "matrix"),
        ({"user": T.IntegerType(), "a": T.DoubleType(), "label": T.DoubleType()}, "dict"),
        ({"ids": T.ArrayType(T.LongType()), "label": T.DoubleType()}, "dict"),
    ]
    for types, want in cases:
        _, spec = prepare(_frame(spark, **types), label="label", features=None, require_label=True)
        assert spec.inputs == want, (types, spec)
    _, spec = prepare(_frame(spark, pixels=floats, label=T.LongType()), label="label", features=None,
                      inputs="dict", require_label=True)
    assert spec.inputs == "dict", "the user's choice wins"


PIXELS = FeedSpec([ColumnSpec("pixels", "float32", True)], ColumnSpec("label", "int64"), "matrix",
                  array_lengths={"pixels": 64})


def test_feed_describes_itself():
    assert PIXELS.describe() == ("--inputs matrix: one float32 matrix of shape (batch, 64) from the columns pixels, "
                                 "in that order; the label 'label' is int64 (batch,)")
    as_dict = FeedSpec(PIXELS.features, PIXELS.label, "dict", array_lengths={"pixels": 64})
    assert "a dict of tensors: 'pixels' float32 (batch, 64)" in as_dict.describe()


def test_mismatches_are_found_before_training_and_name_the_fix():
    import tensorflow as tf

    seq = tf.keras.Sequential([tf.keras.Input((64,)), tf.keras.layers.Dense(10)])
    check(seq, PIXELS)  # matches
    as_dict = FeedSpec(PIXELS.features, PIXELS.label, "dict", array_lengths={"pixels": 64})
    # Keras matches a dict to the model's inputs by name.
    assert "not all columns" in mismatch(as_dict, [("input_1", (None, 64))])
    two = FeedSpec([ColumnSpec("a", "float32"), ColumnSpec("b", "float32")], None, "dict")
    with pytest.raises(InputMismatch) as err:
        check(tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)]), two)
    assert "Pass --inputs matrix" in str(err.value) and "'a' float32 (batch,)" in str(err.value)
    assert mismatch(as_dict, [("pixels", (None, 64))]) is None

    wide = tf.keras.Sequential([tf.keras.Input((63,)), tf.keras.layers.Dense(10)])
    with pytest.raises(InputMismatch, match=r"takes 63 values a row, the feed gives 64.*--features"):
        check(wide, PIXELS)

    a, b = tf.keras.Input((32,), name="left"), tf.keras.Input((32,), name="right")
    named = tf.keras.Model({"left": a, "right": b}, tf.keras.layers.Concatenate()([a, b]))
    with pytest.raises(InputMismatch, match=r"2 named inputs: 'left' \(batch, 32\), 'right' \(batch, 32\).*"
                                            r"no columns named 'left', 'right'"):
        check(named, PIXELS)

    unbuilt = tf.keras.Sequential([tf.keras.layers.Dense(10)])
    check(unbuilt, PIXELS)  # cannot be told before it is called: TF's own error is explained later


DIGITS = """%%spark_etl {name}
from pyspark.sql import functions as F
rows = spark.range(6000, numPartitions=2).withColumn("label", (F.col("id") % 10).cast("long"))
# Class c lights pixels 6c..6c+5; every pixel also gets uniform noise.
pixels = [(F.floor(F.lit(j) / 6) == F.col("label")).cast("float") + F.rand(seed=j).cast("float") * 0.9
          for j in range(64)]
data = rows.select(F.array(*pixels).alias("pixels"), "label", (F.col("id") % 7 == 0).alias("held_out"))
train = data.where(~F.col("held_out")).drop("held_out")
test = data.where(F.col("held_out")).drop("held_out")
train
"""
DIGITS_MODEL = """
import tensorflow as tf
def build_model():
    m = tf.keras.Sequential([tf.keras.layers.Input((64,)), tf.keras.layers.Dense(32, activation="relu"),
                             tf.keras.layers.Dense(10, activation="softmax")])
    m.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m
"""


@pytest.mark.e2e
def test_one_float_array_feature_trains_an_ordinary_model_with_auto_inputs(shell):
    _, err = run(shell, DIGITS.format(name="digits"))
    assert err is None, err
    _, err = run(shell, "%%tf_train digits --workers 2 --epochs 3 --batch-size 64 --features pixels --label label "
                        "--restart\n" + DIGITS_MODEL)
    assert err is None, err
    job = get_job("digits")
    assert job.state == "succeeded"
    test = shell.user_ns["test"].toPandas()
    x = np.stack(test["pixels"].to_numpy()).astype(np.float32)
    accuracy = float((job.load_model().predict(x, verbose=0).argmax(-1) == test["label"].to_numpy()).mean())
    assert accuracy > 0.94, (accuracy, job.history)


@pytest.mark.e2e
def test_a_model_that_does_not_fit_the_feed_is_told_what_the_feed_gives(shell):
    _, err = run(shell, DIGITS.format(name="nofit"))
    assert err is None, err
    _, err = run(shell, "%%tf_train nofit --features pixels --label label --inputs dict --max-restarts 0\n"
                        + DIGITS_MODEL)
    assert isinstance(err, JobFailed), err
    assert "The model has one input of shape (batch, 64)" in str(err), str(err)
    assert "The feed gives --inputs dict: a dict of tensors: 'pixels' float32 (batch, 64)" in str(err), str(err)
    assert "Pass --inputs matrix" in str(err) and "errors/run-1-attempt-1-worker-0.txt" in str(err), str(err)
    # With no Input layer the model's inputs are unknown until TF calls it: TF's own error is
    # explained the same way, and names the real exception rather than "in user code".
    no_input = DIGITS_MODEL.replace("tf.keras.layers.Input((64,)), ", "").replace("Dense(32", "Reshape((64,)), tf.keras.layers.Dense(32")
    _, err = run(shell, "%%tf_train nofit --label label --inputs dict --max-restarts 0\n" + no_input)
    assert isinstance(err, JobFailed), err
    assert "worker 0: TypeError: Exception encountered when calling layer" in str(err), str(err)
    assert "in user code" not in str(err) and "The feed gives --inputs dict" in str(err), str(err)
    assert "pass --inputs matrix" in str(err), str(err)


def test_each_worker_gets_one_partition_in_a_stage_spark_runs_as_a_barrier(spark):
    """A frame with one partition per worker is streamed as it is (no shuffle), unless its
    last stage reads RDDs of other sizes: a union (the training frame and the validation
    frame) or a coalesce, which Spark refuses in a barrier stage (SPARK-24820)."""
    from tfos_magic.driver.launcher import one_partition_per_worker

    even = spark.range(100, numPartitions=2)
    assert one_partition_per_worker(even, 2) is even
    def part(start: int):  # one partition whose partitioning Spark does not know
        return spark.createDataFrame(spark.sparkContext.parallelize([(i,) for i in range(start, start + 50)], 1),
                                     "id long")

    for frame in (part(0).union(part(50)), spark.range(100, numPartitions=4).coalesce(2)):
        assert frame.rdd.getNumPartitions() == 2
        fed = one_partition_per_worker(frame, 2)
        assert fed is not frame
        assert fed.mapInArrow(lambda batches: batches, fed.schema, barrier=True).count() == 100


def test_a_shuffled_frame_is_split_for_the_workers_without_running_its_etl(spark):
    """Under adaptive execution, turning a frame with shuffles into an RDD runs them: the
    ETL would run on the kernel's thread before the job, unseen and unstoppable."""
    from pyspark.sql import functions as F

    from tfos_magic.driver.launcher import one_partition_per_worker

    r = spark.range(1000, numPartitions=3)
    etl = r.groupBy((F.col("id") % 7).alias("k")).count().join(r.withColumn("k", F.col("id") % 7), "k")
    sc = spark.sparkContext
    sc.setJobGroup("tfos-test-feed-frame", "planning only")
    try:
        fed = one_partition_per_worker(etl, 2)
        assert list(sc.statusTracker().getJobIdsForGroup("tfos-test-feed-frame")) == []
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert fed.mapInArrow(lambda batches: batches, fed.schema, barrier=True).count() == 1000
