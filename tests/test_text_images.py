"""Text, images and sequences end to end, on 2 workers of the shared local[2] session:
a text classifier whose model begins with TextVectorization (adapted on build_model's
sample, with word dropout in preprocess()), a CNN that decodes PNG bytes read by Spark's binaryFile source in a layer of
its own, and sequence models on a variable-length id column, ragged and padded, over
uneven partitions. Accuracy is measured on held-out rows through `Job.predict`, and the
text model's SavedModel serves raw strings in a process that never ran the cell."""

import json
import os
import subprocess
import sys

import pytest
from conftest import error_of, run

from tfos_magic import get_job

pytestmark = pytest.mark.e2e

POSITIVE = "great superb lovely moving brilliant charming delightful gripping witty stunning"
NEGATIVE = "dull awful boring clumsy tedious bland messy weak lifeless dreary"
NEUTRAL = ("the a film movie plot actor scene story music camera ending director script cast role "
           "and of it this was with very some long short")

TEXT_ETL = f"""%%spark_etl reviews
from pyspark.sql import functions as F
def words(text):
    return F.array(*[F.lit(w) for w in text.split()])
def pick(options, seed):
    return F.element_at(options, (F.rand(seed) * F.size(options)).cast("int") + 1)
def reviews(rows, seed):
    base = spark.range(rows, numPartitions=2).withColumn("label", (F.rand(seed) < 0.5).cast("int"))
    # 14 words a review, each a class word with probability 0.3; 5% of labels flipped.
    tone = F.when(F.col("label") == 1, words("{POSITIVE}")).otherwise(words("{NEGATIVE}"))
    text = F.concat_ws(" ", F.array(*[F.when(F.rand(seed * 100 + i) < 0.3, pick(tone, seed * 200 + i))
                                       .otherwise(pick(words("{NEUTRAL}"), seed * 300 + i)) for i in range(14)]))
    noisy = F.when(F.rand(seed + 7) < 0.05, 1 - F.col("label")).otherwise(F.col("label"))
    return base.select(text.alias("review"), noisy.cast("double").alias("label")).orderBy("label")
heldout = reviews(1000, 2)
reviews(6000, 1)
"""

TEXT_MODEL = """
import tensorflow as tf

def preprocess(features, label, training):
    # Augmentation, in training only: a tenth of each review's words dropped at random.
    if training:
        words = tf.strings.split(features["review"])
        kept = tf.boolean_mask(words, tf.random.uniform(tf.shape(words)) > 0.1)
        features = {"review": tf.strings.reduce_join(kept, separator=" ")}
    return features, label

def build_model(sample):
    features, _ = sample
    words = tf.keras.layers.TextVectorization(max_tokens=200, output_sequence_length=14)
    words.adapt(features["review"])
    review = tf.keras.Input(shape=(), dtype=tf.string, name="review")
    x = tf.keras.layers.Embedding(200, 8)(words(review))
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    m = tf.keras.Model(review, tf.keras.layers.Dense(1, activation="sigmoid")(x))
    m.compile(optimizer=tf.keras.optimizers.Adam(0.02), loss="binary_crossentropy", metrics=["accuracy"])
    return m
"""

SERVE = """
import json, sys
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = serve(review=tf.constant(sys.argv[2:]))
print(json.dumps([float(v) for v in tf.reshape(out["prediction"], [-1]).numpy()]))
"""


def _accuracy(frame, label: str, prediction: str, classes: int) -> float:
    """Held-out accuracy, computed by Spark: a sigmoid's 0.5, or a softmax's argmax."""
    from pyspark.sql import functions as F

    if classes == 1:
        right = ((F.col(prediction) > 0.5).cast("int") == F.col(label).cast("int")).cast("double")
    else:
        right = (F.array_position(F.col(prediction), F.array_max(F.col(prediction))) - 1 == F.col(label)).cast("double")
    return frame.select(F.avg(right)).first()[0]


@pytest.mark.spark35
def test_a_text_classifier_on_a_string_column_learns_predicts_and_serves_raw_strings(shell, tmp_path):
    _, err = run(shell, TEXT_ETL)
    assert err is None, err
    _, err = run(shell, "%%tf_train reviews --workers 2 --epochs 4 --batch-size 64 --label label --restart\n"
                 + TEXT_MODEL)
    assert err is None, err
    job = get_job("reviews")
    assert job.state == "succeeded" and job._state["feed"]["features"] == [
        {"name": "review", "dtype": "string", "is_array": False, "lengths": "fixed"}], job._state
    accuracy = _accuracy(job.predict(shell.user_ns["heldout"]), "label", "prediction", 1)
    assert accuracy >= 0.85, accuracy
    print(f"text: held-out accuracy {accuracy:.3f}")
    path = str(tmp_path / "served")
    job.export(path)
    texts = ["the film was great and witty", "a dull and tedious plot", "brilliant lovely music"]
    done = subprocess.run([sys.executable, "-c", SERVE, path, *texts], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert scores[0] > 0.5 > scores[1] and scores[2] > 0.5, scores


DIGITS_ETL = """%%spark_etl digits
from pyspark.sql import functions as F
from tfos_magic.examples.digits import read_pngs, write_pngs
write_pngs(r"{folder}")
images = read_pngs(spark, r"{folder}").withColumn("part", F.abs(F.hash("path")) % 5)
heldout = images.where("part = 0")
images.where("part > 0").select("png", "label").repartition(2)
"""

DIGITS_MODEL = """
import tensorflow as tf

class DecodePng(tf.keras.layers.Layer):
    \"\"\"PNG bytes, one string a row, to 8x8x1 pixels in [0, 1].\"\"\"
    def call(self, png):
        # A fully defined shape: a worker whose rows ran out maps zero-row batches.
        pixels = tf.map_fn(lambda b: tf.io.decode_png(b, channels=1), png,
                           fn_output_signature=tf.TensorSpec([8, 8, 1], tf.uint8))
        return tf.cast(pixels, tf.float32) / 255.0

def build_model():
    png = tf.keras.Input(shape=(), dtype=tf.string, name="png")
    x = DecodePng()(png)
    x = tf.keras.layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = tf.keras.layers.MaxPooling2D()(x)
    x = tf.keras.layers.Conv2D(32, 3, activation="relu", padding="same")(x)
    x = tf.keras.layers.Flatten()(x)  # where a stroke is tells digits apart: no global pooling
    m = tf.keras.Model(png, tf.keras.layers.Dense(10, activation="softmax")(x))
    m.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m
"""


def test_a_cnn_decodes_png_bytes_from_spark_s_binary_file_source_in_a_layer(shell, tmp_path):
    _, err = run(shell, DIGITS_ETL.format(folder=tmp_path / "digits"))
    assert err is None, err
    _, err = run(shell, "%%tf_train digits --workers 2 --epochs 8 --batch-size 32 --label label --restart\n"
                 + DIGITS_MODEL)
    assert err is None, err
    job = get_job("digits")
    accuracy = _accuracy(job.predict(shell.user_ns["heldout"]), "label", "prediction", 10)
    assert accuracy >= 0.85, accuracy
    print(f"png: held-out accuracy {accuracy:.3f}")


SEQ_ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
# Two partitions, of 1,500 and 4,500 rows, of 1 to 24 ids (1 to 99) each (from a hash: the same rows
# each time the ETL runs); the label says whether ids below 50 outnumber the others.
base = spark.range(0, 12000, numPartitions=2).where((F.col("id") < 1500) | (F.col("id") >= 7500))
ids = F.expr("transform(sequence(1, pmod(hash(id), 24) + 1), i -> pmod(hash(id, i), 99) + 1)")  # 0 pads
below = F.aggregate(ids, F.lit(0), lambda acc, v: acc + F.when(v < 50, 1).otherwise(-1))
sequences = base.select(ids.alias("ids"), (below > 0).cast("double").alias("label"))
sequences
"""

RAGGED_MODEL = """
import tensorflow as tf

class MeanOverRows(tf.keras.layers.Layer):
    def call(self, x):
        return tf.reduce_mean(x, axis=1)

def build_model():
    ids = tf.keras.Input(shape=(None,), dtype=tf.int64, ragged=True, name="ids")
    x = MeanOverRows()(tf.keras.layers.Embedding(100, 8)(ids))
    m = tf.keras.Model(ids, tf.keras.layers.Dense(1, activation="sigmoid")(x))
    m.compile(optimizer=tf.keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    return m
"""

PADDED_MODEL = """
import tensorflow as tf

def build_model():
    ids = tf.keras.Input(shape=(24,), dtype=tf.int64, name="ids")
    x = tf.keras.layers.Embedding(100, 8, mask_zero=True)(ids)
    x = tf.keras.layers.GlobalAveragePooling1D()(x)
    m = tf.keras.Model(ids, tf.keras.layers.Dense(1, activation="sigmoid")(x))
    m.compile(optimizer=tf.keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    return m
"""


SERVE_IDS = """
import json, sys
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
rows = json.loads(sys.argv[2])
if sys.argv[3] == "ragged":  # a ragged column's signature takes its values and row splits
    ids = tf.ragged.constant(rows, dtype=tf.int64)
    out = serve(ids_values=ids.values, ids_row_splits=ids.row_splits)
else:
    out = serve(ids=tf.constant([r + [0] * (24 - len(r)) for r in rows], dtype=tf.int64))
print(json.dumps([float(v) for v in tf.reshape(out["prediction"], [-1]).numpy()]))
"""


@pytest.mark.parametrize("how", ["ragged", "pad"])
def test_a_sequence_model_trains_on_variable_length_ids_over_uneven_partitions(shell, how, tmp_path):
    name = f"seq{how}"
    _, err = run(shell, SEQ_ETL.format(name=name))
    assert err is None, err
    option, model = ("--ragged ids", RAGGED_MODEL) if how == "ragged" else ("--pad ids=24", PADDED_MODEL)
    _, err = run(shell, f"%%tf_train {name} --workers 2 --epochs 3 --batch-size 64 --label label {option} "
                        "--stall-timeout 120 --restart\n" + model)
    assert err is None, err
    job = get_job(name)
    ends = {(e["worker"], e["epoch"]): e["step"] for e in job.events if e["kind"] == "epoch"}
    assert ends and len({s for (w, n), s in ends.items() if n == 1}) == 1, ends  # both workers, one step count
    assert job.history[-1]["loss"] < job.history[0]["loss"] < 0.75, job.history
    scored = job.predict(shell.user_ns["sequences"]).limit(50).collect()
    assert len(scored) == 50 and all(0 <= r["prediction"] <= 1 for r in scored)
    # The SavedModel serves the same rows in a process that never ran the cell.
    path = str(tmp_path / "served")
    job.export(path)
    done = subprocess.run([sys.executable, "-c", SERVE_IDS, path, json.dumps([list(r["ids"]) for r in scored]), how],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served == pytest.approx([r["prediction"] for r in scored], abs=1e-5), served


def test_nulls_in_a_text_column_fail_naming_it_and_fillna_fills_them(shell):
    _, err = run(shell, "%%spark_etl nulls\nspark.range(200, numPartitions=1).selectExpr("
                        "\"if(id % 10 = 0, null, concat('w', id % 7)) as t\", 'cast(id % 2 as double) as y')\n")
    assert err is None, err
    cell = """
import tensorflow as tf
def build_model():
    t = tf.keras.Input(shape=(), dtype=tf.string, name="t")
    x = tf.keras.layers.Hashing(16, output_mode="one_hot")(t)
    m = tf.keras.Model(t, tf.keras.layers.Dense(1)(x))
    m.compile(optimizer="adam", loss="mse")
    return m
"""
    err = error_of(shell, "%%tf_train nulls --label y --restart\n" + cell)
    assert err is not None and "feature column 't' has null values" in str(err) and "--fillna TEXT" in str(err), err
    _, err = run(shell, "%%tf_train nulls --label y --fillna missing --restart\n" + cell)
    assert err is None, err


PS_TEXT_MODEL = """
import numpy as np
import tensorflow as tf

def build_model(sample):
    features, label = sample  # numpy in ps mode's TF1 graphs, where adapt() cannot run
    assert features["review"].dtype == object and len(features["review"]) == len(label) > 1000
    review = tf.keras.Input(shape=(), dtype=tf.string, name="review")
    x = tf.keras.layers.Hashing(64, output_mode="one_hot")(review)
    m = tf.keras.Model(review, tf.keras.layers.Dense(1, activation="sigmoid")(x))
    m.compile(optimizer=tf.keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    return m
"""


def test_parameter_servers_train_on_a_string_column_with_build_model_s_sample(shell):
    """ps mode's TF1 graph takes tf.string inputs too; its sample comes as numpy."""
    _, err = run(shell, TEXT_ETL)
    assert err is None, err
    _, err = run(shell, "%%tf_train reviews --strategy ps --ps 1 --workers 1 --epochs 1 --batch-size 256 "
                        "--label label --restart\n" + PS_TEXT_MODEL)
    assert err is None, err
    scored = get_job("reviews").predict(shell.user_ns["heldout"]).limit(20).collect()
    assert len(scored) == 20 and all(0 <= r["prediction"] <= 1 for r in scored)


IMAGE_ETL = """%%spark_etl images
from pyspark.sql import functions as F
from tfos_magic.examples.digits import LABEL_FROM_PATH, write_pngs
write_pngs(r"{folder}")
files = spark.read.format("image").option("recursiveFileLookup", "true").load(r"{folder}")
label = F.regexp_extract("image.origin", LABEL_FROM_PATH, 1).cast("int").alias("label")
structs = files.select("image", label)
rows = files.select(F.col("image.data").alias("pixels"), label, (F.abs(F.hash("image.origin")) % 5 == 0).alias("held"))
heldout = rows.where("held").drop("held")
rows.where("not held").drop("held").repartition(2)
"""

PIXELS_MODEL = """
import tensorflow as tf

class DecodePixels(tf.keras.layers.Layer):
    \"\"\"The image source's data, height x width x nChannels bytes a row, as 8x8x1 floats.\"\"\"
    def call(self, data):
        pixels = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.float32) / 255.0
        return tf.reshape(pixels, [-1, 8, 8, 1])

def build_model():
    data = tf.keras.Input(shape=(), dtype=tf.string, name="pixels")
    x = tf.keras.layers.Conv2D(16, 3, activation="relu", padding="same")(DecodePixels()(data))
    x = tf.keras.layers.MaxPooling2D()(x)
    x = tf.keras.layers.Flatten()(tf.keras.layers.Conv2D(32, 3, activation="relu", padding="same")(x))
    m = tf.keras.Model(data, tf.keras.layers.Dense(10, activation="softmax")(x))
    m.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    return m
"""


def test_spark_s_image_source_trains_from_its_data_field_and_its_struct_is_refused_naming_it(shell, tmp_path):
    """spark.read.format("image"): the struct as it comes is refused with what to select;
    its `data` field (decoded pixels) trains a CNN that reshapes them in a layer."""
    _, err = run(shell, IMAGE_ETL.format(folder=tmp_path / "digits"))
    assert err is None, err
    _, err = run(shell, "%%spark_etl structs\nstructs\n")
    assert err is None, err
    err = error_of(shell, "%%tf_train structs --label label\n" + PIXELS_MODEL)
    assert err is not None and "column 'image'" in str(err) and "F.col('image.data')" in str(err), err
    _, err = run(shell, "%%tf_train images --workers 2 --epochs 8 --batch-size 32 --label label --restart\n"
                 + PIXELS_MODEL)
    assert err is None, err
    accuracy = _accuracy(get_job("images").predict(shell.user_ns["heldout"]), "label", "prediction", 10)
    assert accuracy >= 0.85, accuracy
    print(f"image source: held-out accuracy {accuracy:.3f}")
