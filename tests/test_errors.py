"""What a user reads when training fails: the real exception and its text, the cell line,
and a file in the job's errors/ dir with the full traceback and the TF process's log."""

import os

import pytest
from conftest import run

from tfos_magic import JobFailed, get_job
from tfos_magic.training.failures import describe, shorten

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
spark.range(2000, numPartitions=1).select(F.rand(1).alias("a"), F.rand(2).alias("b")) \\
    .withColumn("y", 3 * F.col("a") - 2 * F.col("b"))
"""


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("nothing raised")


def test_autograph_errors_name_the_real_exception_not_in_user_code():
    import tensorflow as tf

    from tfos_magic.protocol.cells import run_cell

    ns = {}
    run_cell("import tensorflow as tf\n@tf.function\ndef step(x):\n    raise KeyError(f'no column {x.shape}')\n",
             "j", ns)
    exc = _raised(lambda: ns["step"](tf.zeros((2, 3))))
    assert str(exc).startswith("in user code:"), "TF's wrapping, as the user would get it"
    message = describe(exc)
    assert message.startswith("KeyError: 'no column (2, 3)'"), message
    assert message.endswith("(cell line 5: raise KeyError(f'no column {x.shape}'))"), message


def test_an_empty_batch_through_a_map_without_its_shape_gets_the_fix():
    """A worker whose rows ran out takes zero-row batches; TF's own error names neither."""
    import tensorflow as tf

    from tfos_magic.protocol.cells import run_cell

    ns = {}
    run_cell("import tensorflow as tf\n@tf.function\ndef decode(png):\n"
             "    return tf.map_fn(lambda b: tf.io.decode_png(b, channels=1), png, fn_output_signature=tf.uint8)\n",
             "j", ns)
    message = describe(_raised(lambda: ns["decode"](tf.zeros([0], tf.string))))
    assert message.startswith("InvalidArgumentError") and "empty list" in message, message
    assert "zero-row batches" in message and "fn_output_signature" in message and len(message) <= 1200 + 400, message


def test_long_messages_keep_both_ends():
    text = "start " + "x" * 5000 + " end"
    short = shorten(text, 300)
    assert len(short) <= 300 and short.startswith("start ") and short.endswith(" end") and "characters cut" in short
    assert describe(ValueError(text)).endswith(" end")


CASES = {
    # autograph: a Python error raised while TF traces a tf.function in the cell
    "in_tf_function": ("""
import tensorflow as tf
@tf.function
def step(x):
    if x.shape[-1] != 3:
        raise ValueError(f"step() wants 3 features, got {x.shape[-1]}")
    return x
def train(ctx):
    for x, y in ctx.dataset(32):
        step(x)
""", "ValueError: step() wants 3 features, got 2", "cell line 7: raise ValueError"),
    # fit: the loss cannot take the label's shape (TF's own error, from its train_function)
    "shape_in_fit": ("""
import tensorflow as tf
def build_model():
    m = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(3, activation="softmax")])
    m.compile(optimizer="adam", loss="categorical_crossentropy")
    return m
""", "ValueError: Shapes (None, 1) and (None, 3) are incompatible", None),
    "in_build_model": ("""
import tensorflow as tf
def build_model():
    layers = {"dense": tf.keras.layers.Dense(1)}
    return tf.keras.Sequential([layers["conv"]])
""", "KeyError: 'conv'", "cell line 6"),
    "at_top_level": ("""
import tensorflow as tf
scale = 1 / 0
def build_model():
    pass
""", "ZeroDivisionError: division by zero", "cell line 4: scale = 1 / 0"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_each_error_shape_reaches_the_user_with_its_cause_and_details(shell, case):
    cell, cause, where = CASES[case]
    run(shell, ETL.format(name=case))
    _, err = run(shell, f"%%tf_train {case} --label y --max-restarts 0\n" + cell)
    assert isinstance(err, JobFailed), err
    message = str(err)
    assert f"worker 0: {cause}" in message, message
    assert "in user code" not in message, message
    if where:
        assert where in message, message
    job = get_job(case)
    path = os.path.join(job.dir, "errors", "run-1-attempt-1-worker-0.txt")
    assert f"(traceback and log: {path})" in message, message
    details = job.error_details
    assert details == open(path).read()
    assert "Traceback (most recent call last)" in details and cause.split(":")[0] in details
    assert "--- last lines of the TF process's log ---" in details
    errors = [e for e in job.events if e["kind"] == "error"]
    assert errors and errors[0]["details_file"] == path and "details" not in errors[0], "metrics.jsonl stays small"


@pytest.mark.e2e
def test_a_crashed_tf_process_is_named_by_its_signal_with_its_log_kept(shell):
    run(shell, ETL.format(name="segv"))
    cell = ("import os, signal\ndef train(ctx):\n    print('about to crash', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGSEGV)\n")
    _, err = run(shell, "%%tf_train segv --label y --max-restarts 0\n" + cell)
    assert isinstance(err, JobFailed), err
    message = str(err)
    assert "TF worker 0 crashed with SIGSEGV (signal 11) before reporting a result" in message, message
    job = get_job("segv")
    assert f"(traceback and log: {job.dir}/errors/run-1-attempt-1-worker-0.txt)" in message, message
    details = job.error_details
    assert "Fatal Python error: Segmentation fault" in details and "about to crash" in details, details
