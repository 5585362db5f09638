"""What differs on Spark 3.5, run in the Spark 3.5 environment (.venv-spark35, which
scripts/test.sh runs the `spark35` tests in after the suite): a standalone cluster
started from pyspark 3.5's own scripts, whose workers take their GPUs from the session's
task-level resources (no stage-level scheduling for a DataFrame before 4.0), and a GPU
request beyond those refused with the setting to change. The rest of the 3.5 tier is the
suite's own tests marked `spark35` (the quickstart, predict, ps with ZooKeeper, a worker
killed mid-checkpoint); on Spark 4 this file has nothing to check."""

import os

import pyspark
import pytest
from conftest import regression_cell
from test_cluster import ETL, Kernel

from tfos_magic import get_job
from tfos_magic.driver.spark_backend import STAGE_PROFILES

pytestmark = [pytest.mark.spark35,
              pytest.mark.skipif(STAGE_PROFILES, reason="Spark 3.5 only: scripts/test.sh runs it in .venv-spark35")]


@pytest.fixture(scope="module")
def kernel35(spark_standalone, tfos_kernel, tmp_path_factory):
    """A kernel on the standalone cluster whose session gives each task 1 of its executor's 2 GPUs."""
    home = tmp_path_factory.mktemp("spark35-home")
    # Plain text output (no dashboard widget): the start line's notes come back as the cell's text.
    env = dict(os.environ, TFOS_HOME=str(home), TFOS_SPARK_MASTER=spark_standalone, SPARK_LOCAL_IP="127.0.0.1",
               TFOS_DASHBOARD="0")
    kernel = Kernel(tfos_kernel, env)
    reply, out = kernel.run("from pyspark.sql import SparkSession\n"
                            "spark = SparkSession.builder.master(%r).config('spark.executor.memory', '1g')"
                            ".config('spark.executor.resource.gpu.amount', '2')"
                            ".config('spark.task.resource.gpu.amount', '1')"
                            ".config('spark.pyspark.python', __import__('sys').executable)"
                            ".config('spark.ui.showConsoleProgress', 'false').getOrCreate()\n"
                            "print(spark.version)" % spark_standalone)
    assert reply["status"] == "ok", out
    assert out.strip().endswith(pyspark.__version__), out
    yield kernel, str(home)
    kernel.close()


def test_a_job_on_a_spark35_cluster_takes_the_sessions_task_gpus(kernel35):
    kernel, home = kernel35
    reply, out = kernel.run(ETL.format(name="sa35", rows=50000))
    assert reply["status"] == "ok", out
    assert f"Spark {pyspark.__version__}" in out and "|-- y: double" in out, out  # the schema, printed on 3.5 too
    reply, out = kernel.run("%%tf_train sa35 --workers 2 --epochs 3 --batch-size 256 --label y --restart "
                            "--gpus-per-worker 1\n" + regression_cell(inputs=4, hidden=16, learning_rate=0.003))
    assert reply["status"] == "ok", out
    assert "GPUs from the session's task-level resources: 1 a task" in out, out
    job = get_job("sa35", home)
    assert job.state == "succeeded" and job.history[-1]["loss"] < 0.2 * job.history[0]["loss"], job.history
    gpus = [e.get("gpus") for e in job.events if e["kind"] == "started"]
    assert len(gpus) == 2 and all(g in {"0", "1", "2", "3"} for g in gpus), gpus  # one of its executor's two, each


def test_more_gpus_than_the_session_gives_a_task_are_refused_naming_the_setting(kernel35):
    kernel, _ = kernel35
    reply, out = kernel.run(ETL.format(name="gpu35", rows=1000))
    assert reply["status"] == "ok", out
    reply, out = kernel.run("%%tf_train gpu35 --workers 1 --gpus-per-worker 2 --label y\n"
                            + regression_cell(inputs=4, hidden=16, learning_rate=0.003), timeout=120)
    assert reply["status"] == "error", out
    assert "spark.task.resource.gpu.amount=2" in out and "gives each task 1 GPU(s)" in out, out
