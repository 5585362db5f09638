"""A background job in a real kernel (jupyter_client): the cell returns at once, other cells
run meanwhile, a second run is refused, %tfos_status shows it, and %tfos_stop ends it
with no TF process or Spark job left."""

import time

import pytest
from conftest import assert_stop_checkpoint, kernel_run, tf_processes, tf_processes_gone

from tfos_magic import get_job

TRAIN = ("%%tf_train bg --workers 2 --epochs 1000 --batch-size 64 --label y --background\n"
         "import tensorflow as tf\n"
         "def build_model():\n"
         "    m = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])\n"
         "    m.compile(optimizer='sgd', loss='mse')\n"
         "    return m\n")


@pytest.mark.slow
def test_background_job_status_and_stop(local_kernel):
    _, kc, home = local_kernel
    reply, out = kernel_run(kc, "%%spark_etl bg\nspark.range(300000).selectExpr('rand(1) as a', 'rand(2) as y')")
    assert reply["status"] == "ok", out
    t0 = time.time()
    reply, out = kernel_run(kc, TRAIN)
    assert reply["status"] == "ok", out
    assert time.time() - t0 < 15, "a background cell returns at once"
    assert "widget-view" in out or "background" in out, out
    reply, out = kernel_run(kc, "print(6 * 7)")
    assert reply["status"] == "ok" and "42" in out, "the kernel is free while the job runs"
    reply, out = kernel_run(kc, TRAIN)
    assert reply["status"] == "error" and "already running in this kernel" in out, out

    deadline = time.time() + 240
    while sum(e["kind"] == "step" for e in get_job("bg", str(home)).events) < 2:
        assert time.time() < deadline, "training never started"
        time.sleep(0.5)
    assert len(tf_processes("tfos-bg-")) == 2
    reply, out = kernel_run(kc, "%tfos_status bg")
    assert reply["status"] == "ok" and "widget-view" in out, out

    t0 = time.time()
    reply, out = kernel_run(kc, "%tfos_stop bg", timeout=60)
    assert reply["status"] == "ok" and "stopped" in out, out
    assert "PythonException" not in out, "a stop is not a task failure: no Spark stack trace in the cell"
    assert time.time() - t0 < 15, "control returns within 15 s"
    job = get_job("bg", str(home))
    assert job.state == "stopped"
    assert_stop_checkpoint(job)
    assert tf_processes_gone("tfos-bg-", timeout=30), "TF processes outlived the stop"
    reply, out = kernel_run(kc, "assert spark.sparkContext.statusTracker().getActiveJobsIds() == []")
    assert reply["status"] == "ok", out
    reply, out = kernel_run(kc, "%tfos_stop bg")
    assert reply["status"] == "error" and "is not running" in out, out
