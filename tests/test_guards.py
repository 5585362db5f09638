"""Runs that must end on their own, with a message: a NaN loss (named by step and worker,
not retried, the last good checkpoint kept) and a cell that stalls (--stall-timeout,
naming each task's last event). Real Spark and TF processes."""

import time

import pytest
from conftest import run, tf_processes_gone

from tfos_magic import JobFailed, get_job

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
spark.range(4000, numPartitions=2).select(F.rand(1).alias("a"), F.rand(2).alias("b")) \\
    .withColumn("y", 3 * F.col("a") - 2 * F.col("b"))
"""

# A loss that turns NaN after a few good steps: the epoch-1 checkpoint is the last good one.
NAN = """
import tensorflow as tf
def build_model():
    m = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    def loss(y, p):
        bad = tf.where(m.optimizer.iterations > 70, float("nan"), 0.0)
        return tf.reduce_mean(tf.square(tf.reshape(y, (-1, 1)) - p)) + bad
    m.compile(optimizer="sgd", loss=loss)
    return m
"""

STALL = """
import time
def train(ctx):
    time.sleep(3600)
"""


@pytest.mark.e2e
def test_nan_loss_fails_once_with_the_step_and_worker(shell):
    run(shell, ETL.format(name="nan"))
    _, err = run(shell, "%%tf_train nan --workers 2 --epochs 3 --batch-size 32 --label y --max-restarts 2\n" + NAN)
    assert isinstance(err, JobFailed), err
    message = str(err)
    assert "The loss is nan at step" in message and "on worker" in message, message
    assert "restart" not in message, "a NaN is not retried"
    job = get_job("nan")
    assert job.state == "failed"
    assert {e.get("attempt") for e in job.events} == {1}, "a single attempt"
    saved = [e for e in job.events if e["kind"] == "checkpoint"]
    assert saved and saved[-1]["epoch"] == 1, "the epoch-1 checkpoint is kept as the last good one"


@pytest.mark.e2e
def test_a_stalled_cell_fails_within_its_timeout_naming_last_events(shell):
    run(shell, ETL.format(name="stall"))
    t0 = time.time()
    _, err = run(shell, "%%tf_train stall --workers 2 --label y --stall-timeout 8\n" + STALL)
    took = time.time() - t0
    assert isinstance(err, JobFailed), err
    message = str(err)
    assert "No progress from any worker for" in message and "--stall-timeout 8" in message, message
    assert "worker 0: started" in message and "worker 1: started" in message, message
    assert took < 120, f"the stall took {took:.0f}s to end"
    assert get_job("stall").state == "failed"
    assert tf_processes_gone("tfos-stall-", timeout=30), "the stalled TF processes outlived the failure"
