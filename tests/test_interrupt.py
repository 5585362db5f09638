"""A kernel interrupt during training checkpoints, cancels the Spark job and leaves no TF
process behind."""

import time

import pytest
from conftest import assert_stop_checkpoint, tf_processes, tf_processes_gone

from tfos_magic import get_job


def _reply(kc, msg_id, timeout=300):
    """The shell reply to `msg_id`, skipping others: a kernel_info reply left over from a slow
    start (jupyter_client asks again every second) must not be taken for it."""
    deadline = time.time() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(1, deadline - time.time()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def _execute(kc, code, timeout=300):
    return _reply(kc, kc.execute(code), timeout)


@pytest.mark.slow
def test_interrupt_stops_the_job_and_its_processes(local_kernel):
    km, kc, home = local_kernel
    reply = _execute(kc, "assert 'spark_etl' in get_ipython().magics_manager.magics['cell']")
    assert reply["content"]["status"] == "ok", "the tfos kernel loads the extension at start"
    reply = _execute(kc, "%%spark_etl long\nspark.range(300000).selectExpr('rand(1) as a', 'rand(2) as y')")
    assert reply["content"]["status"] == "ok", reply["content"]
    train = kc.execute(
        "%%tf_train long --workers 2 --epochs 1000 --batch-size 64 --label y\n"
        "import tensorflow as tf\n"
        "def build_model():\n"
        "    m = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])\n"
        "    m.compile(optimizer='sgd', loss='mse')\n"
        "    return m\n")
    deadline = time.time() + 240
    while time.time() < deadline:
        events = list(get_job("long", str(home)).events) if (home / "jobs/long/metrics.jsonl").exists() else []
        if sum(e["kind"] == "step" for e in events) >= 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail("training never started")
    assert len(tf_processes("tfos-long-")) == 2
    t0 = time.time()
    km.interrupt_kernel()
    reply = _reply(kc, train, timeout=120)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.time() - t0 < 15, "control returns within 15 s"
    job = get_job("long", str(home))
    assert job.state == "stopped"
    assert_stop_checkpoint(job)
    assert tf_processes_gone("tfos-long-", timeout=60 - (time.time() - t0)), \
        "TF worker processes outlived the interrupt"
    reply = _execute(kc, "assert spark.sparkContext.statusTracker().getActiveJobsIds() == []")
    assert reply["content"]["status"] == "ok", reply["content"]
