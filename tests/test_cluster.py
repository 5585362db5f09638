"""Acceptance on a real Spark standalone cluster (a master and 2 workers x 2 cores on
127.0.0.1), driven from a real kernel the way a notebook would be:

- a PS job (1 PS + 2 workers) trains to a loss below 20% of its first epoch;
- the all-reduce job of the core issue, with a GPU per worker from fake GPU addresses
  (a discovery script): each TF process gets CUDA_VISIBLE_DEVICES = its task's GPU;
- a worker's TF process killed mid-training: the job restarts from the latest
  checkpoint, loses at most one checkpoint interval of steps, and ends with no PS
  task left running.
"""

import json
import os
import signal
import time

import pytest
from conftest import regression_cell, tf_processes, tf_processes_gone
from jupyter_client.manager import start_new_kernel

from tfos_magic import get_job

pytestmark = pytest.mark.slow

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range({rows}).select(*[F.rand(seed=i).alias(f"x{{i}}") for i in range(4)])
df.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + 0.5 * F.col("x2") + F.col("x3") + 1.0)
"""
MODEL = regression_cell(inputs=4, hidden=16, learning_rate=0.003)


class Kernel:
    def __init__(self, kernel_name, env):
        self.km, self.kc = start_new_kernel(kernel_name=kernel_name, env=env)

    def run(self, code, timeout=600):
        out = []
        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: out.append(
            m["content"].get("text") or m["content"].get("evalue") or ""))
        return reply["content"], "".join(out)

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def cluster_kernel(spark_standalone, tfos_kernel, tmp_path_factory):
    home = tmp_path_factory.mktemp("cluster-home")
    env = dict(os.environ, TFOS_HOME=str(home), TFOS_SPARK_MASTER=spark_standalone, SPARK_LOCAL_IP="127.0.0.1")
    kernel = Kernel(tfos_kernel, env)
    reply, out = kernel.run("from pyspark.sql import SparkSession\n"
                            "spark = SparkSession.builder.master(%r).config('spark.executor.memory', '1g')"
                            ".config('spark.executor.resource.gpu.amount', '2')"
                            ".config('spark.pyspark.python', __import__('sys').executable)"
                            ".config('spark.ui.showConsoleProgress', 'false').getOrCreate()\n"
                            "print(spark.sparkContext.master)" % spark_standalone)
    assert reply["status"] == "ok", out
    yield kernel, str(home)
    kernel.close()


def _loss_drop(job):
    hist = job.history
    assert hist, job.events[-5:]
    return hist[-1]["loss"] / hist[0]["loss"]


def test_ps_job_on_a_standalone_cluster(cluster_kernel):
    kernel, home = cluster_kernel
    reply, out = kernel.run(ETL.format(name="ps_sa", rows=40000))
    assert reply["status"] == "ok", out
    reply, out = kernel.run("%%tf_train ps_sa --strategy ps --ps 1 --workers 2 --epochs 3 --batch-size 64 "
                            "--label y --restart\n" + MODEL)
    assert reply["status"] == "ok", out
    job = get_job("ps_sa", home)
    assert job.state == "succeeded", job.error
    assert _loss_drop(job) < 0.2, job.history
    roles = {(e.get("role"), e["worker"]) for e in job.events if e["kind"] == "started"}
    assert roles == {("ps", 0), ("worker", 0), ("worker", 1)}


def test_allreduce_job_on_a_standalone_cluster(cluster_kernel):
    kernel, home = cluster_kernel
    reply, out = kernel.run(ETL.format(name="ar_sa", rows=100000))
    assert reply["status"] == "ok", out
    reply, out = kernel.run("%%tf_train ar_sa --workers 2 --epochs 3 --batch-size 256 --label y --restart "
                            "--gpus-per-worker 1\n" + MODEL)
    assert reply["status"] == "ok", out
    job = get_job("ar_sa", home)
    assert job.state == "succeeded" and _loss_drop(job) < 0.2, job.history
    # Each TF process saw exactly the one GPU Spark assigned to its task (fake addresses 0-3).
    gpus = [e.get("gpus") for e in job.events if e["kind"] == "started"]
    assert len(gpus) == 2 and all(g in {"0", "1", "2", "3"} for g in gpus) and gpus[0] != gpus[1], gpus


def test_killed_worker_restarts_from_the_latest_checkpoint(cluster_kernel):
    kernel, home = cluster_kernel
    interval = 40
    reply, out = kernel.run(ETL.format(name="kill_sa", rows=60000))
    assert reply["status"] == "ok", out
    msg_id = kernel.kc.execute(
        f"%%tf_train kill_sa --strategy ps --ps 1 --workers 2 --epochs 3 --batch-size 32 --label y --restart "
        f"--checkpoint-every-steps {interval}\n" + MODEL)
    metrics = os.path.join(home, "jobs", "kill_sa", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:
        events = [json.loads(line) for line in open(metrics)] if os.path.exists(metrics) else []
        if sum(e["kind"] == "checkpoint" for e in events) >= 2:
            break
        time.sleep(0.3)
    else:
        pytest.fail("training did not reach two checkpoints")
    victims = tf_processes("tfos-kill_sa-worker1-")
    assert len(victims) == 1
    victims[0].send_signal(signal.SIGKILL)
    reply = kernel.kc.get_shell_msg(timeout=600)
    assert reply["parent_header"]["msg_id"] == msg_id
    job = get_job("kill_sa", home)
    assert reply["content"]["status"] == "ok", job.error
    assert job.state == "succeeded" and [h["epoch"] for h in job.history] == [1, 2, 3]
    events = job.events
    before = max(e["step"] for e in events if e["kind"] in ("step", "checkpoint") and e["attempt"] == 1)
    resumed = [e for e in events if e["kind"] == "training" and e["attempt"] == 2 and e["worker"] == 0]
    assert resumed, "the job restarted as attempt 2"
    assert resumed[0]["initial_step"] > 0 and resumed[0]["restored_from"]
    assert before - resumed[0]["initial_step"] <= interval, (before, resumed[0])
    assert tf_processes_gone("tfos-kill_sa-ps"), "no PS task is left running"
    reply, out = kernel.run("assert spark.sparkContext.statusTracker().getActiveJobsIds() == []")
    assert reply["status"] == "ok", out
