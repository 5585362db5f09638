"""Spark Connect sessions, driven from a real kernel as a notebook would: the same cells on
a `spark.api.mode=connect` session (the kernel's pyspark starts a local Connect server)
and on an `sc://` remote (a Spark Connect server started from pyspark's own
distribution, `SparkConnectServer` through spark-submit). On each:

- a ps job trains;
- `%tfos_stop` (the path of the dashboard's and the sidebar's stop) and a kernel interrupt
  end a running job within 15 s at a checkpoint, with no TF process and no Spark
  operation left;
- `--env` ships an archive through the session's artifacts, and the TF processes run its
  Python.

Two paths run on one kind only, each on another: both kinds are the same Connect client,
and the paths above already run on both. On the remote, a shuffle ETL shows its stages as
progress, a 2-worker all-reduce job with a validation frame trains, and its model predicts
on the executors; on the local server, a text model adapts on its sample and scores raw
strings.

The classic session runs the same paths in every other end-to-end test; the supervisor's
decisions on a scripted Spark are test_supervisor.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time

import pytest
from conftest import assert_stop_checkpoint, make_venv, regression_cell, tf_processes_gone
from test_cluster import Kernel

from tfos_magic import get_job
from tfos_magic.driver.pack_env import pack_env

pytestmark = pytest.mark.e2e

MODEL = regression_cell(inputs=4, hidden=16, learning_rate=0.01)
# The ETL's first step takes 12 s a partition, so that its stages are in progress when
# the text view prints its 10-second progress line; the sort is a shuffle the job runs in
# stages of its own.
ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
def slow(batches):
    import time
    time.sleep(12)
    yield from batches
def frame(rows, seed):
    raw = spark.range(rows, numPartitions=4).select(*[F.rand(seed=seed + i).alias(f"x{{i}}") for i in range(4)])
    return raw.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + 0.5 * F.col("x2") + F.col("x3") + 1.0)
raw = frame({rows}, 0)
df = raw.mapInArrow(slow, raw.schema).orderBy("x3")
val = frame(1500, 10)
df
"""
SMALL_ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range({rows}, numPartitions=2).select(*[F.rand(seed=i).alias(f"x{{i}}") for i in range(4)])
df.withColumn("y", 2 * F.col("x0") - 3 * F.col("x1") + 0.5 * F.col("x2") + F.col("x3") + 1.0)
"""


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    """A Spark Connect server on 127.0.0.1 (master local[4]), on a port it picks itself and
    names in its log. Yields its sc:// URL."""
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    root = tmp_path_factory.mktemp("connect-server")
    env = dict(os.environ, SPARK_HOME=home, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    log = root / "server.log"
    proc = subprocess.Popen(
        [os.path.join(home, "bin", "spark-submit"), "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
         "--master", "local[4]", "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
         "--conf", "spark.connect.grpc.binding.port=0", "--conf", "spark.ui.enabled=false",
         "--conf", f"spark.pyspark.python={sys.executable}", "spark-internal"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 120
    while not (found := re.search(r"Spark Connect server started at: 127\.0\.0\.1:(\d+)",
                                  log.read_text() if log.exists() else "")):
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"the Spark Connect server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    yield f"sc://127.0.0.1:{found.group(1)}"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module", params=["api-mode", "remote"])
def connect_kernel(request, tfos_kernel, tmp_path_factory):
    """A kernel whose `spark` is a Connect session of either kind."""
    home = tmp_path_factory.mktemp(f"connect-home-{request.param}")
    # Text views (TFOS_DASHBOARD=0): what a job says lands in the cell's text output.
    env = dict(os.environ, TFOS_HOME=str(home), PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
               TFOS_DASHBOARD="0")
    if request.param == "remote":
        make = f"SparkSession.builder.remote({request.getfixturevalue('connect_server')!r}).getOrCreate()"
    else:
        make = ("SparkSession.builder.master('local[4]').config('spark.api.mode', 'connect')"
                ".config('spark.ui.enabled', 'false').config('spark.ui.showConsoleProgress', 'false').getOrCreate()")
    kernel = Kernel(tfos_kernel, env)
    reply, out = kernel.run(f"from pyspark.sql import SparkSession\nspark = {make}\nprint(type(spark).__module__)")
    assert reply["status"] == "ok" and "pyspark.sql.connect" in out, out
    yield kernel, str(home), request.param
    kernel.close()


def _ok(kernel, code: str, timeout: float = 600) -> str:
    reply, out = kernel.run(code, timeout=timeout)
    assert reply["status"] == "ok", out
    return out


@pytest.mark.parametrize("connect_kernel", ["remote"], indirect=True)
def test_a_shuffle_etl_shows_progress_and_an_allreduce_job_trains_and_predicts(connect_kernel):
    kernel, home, kind = connect_kernel
    out = _ok(kernel, ETL.format(name="cx_ar", rows=16000))
    assert "DataFrame registered (a Spark Connect session shows its partitions only when it runs" in out, out
    out = _ok(kernel, "%%tf_train cx_ar --workers 2 --epochs 3 --batch-size 64 --label y --validation-df val "
                      "--restart\n" + MODEL)
    assert "does not offer a link to the Spark UI" in out, out  # said, not failed on
    job = get_job("cx_ar", home)
    assert job.state == "succeeded", job.error
    assert job.history[-1]["loss"] < 0.2 * job.history[0]["loss"], job.history
    assert "val_loss" in job.history[-1], job.history[-1]
    # The ETL's stages ran in the job, and their tasks were shown as progress while they ran.
    assert re.search(r"tfos cx_ar: Spark is computing the DataFrame: \d+ of ([4-9]|\d\d+) tasks done", out), out
    started = {(e["role"], e["worker"]) for e in job.events if e["kind"] == "started"}
    assert started == {("worker", 0), ("worker", 1)}, started
    out = _ok(kernel, "from tfos_magic import get_job\np = get_job('cx_ar').predict(val)\n"
                      "rows = p.select('x0', 'y', 'prediction').toPandas()\n"
                      "print('ROWS', len(rows), float(((rows.prediction - rows.y) ** 2).mean()))")
    rows, mse = out.split("ROWS ")[1].split()[:2]
    assert int(rows) == 1500 and float(mse) < 0.2 * job.history[0]["loss"], out
    assert tf_processes_gone("tfos-cx_ar-")


def test_a_ps_job_trains(connect_kernel):
    kernel, home, kind = connect_kernel
    _ok(kernel, SMALL_ETL.format(name="cx_ps", rows=8000))
    _ok(kernel, "%%tf_train cx_ps --strategy ps --ps 1 --workers 2 --epochs 2 --batch-size 64 --label y "
                "--restart\n" + MODEL)
    job = get_job("cx_ps", home)
    assert job.state == "succeeded", job.error
    assert job.history[-1]["loss"] < 0.5 * job.history[0]["loss"], job.history
    roles = {(e["role"], e["worker"]) for e in job.events if e["kind"] == "started"}
    assert roles == {("ps", 0), ("worker", 0), ("worker", 1)}, roles
    assert tf_processes_gone("tfos-cx_ps-")


def _training(home: str, name: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not [e for e in get_job(name, home).events if e["kind"] == "step"]:
        assert time.time() < deadline, get_job(name, home).events[-5:]
        time.sleep(0.3)


def _nothing_left(kernel, name: str) -> None:
    """No TF process of the job, and no operation of the session still running on the server."""
    assert tf_processes_gone(f"tfos-{name}-")
    out = _ok(kernel, "print('LEFT', spark.interruptAll())")
    assert "LEFT []" in out, out


def test_a_stop_and_an_interrupt_end_a_running_job_within_15s_with_nothing_left_running(connect_kernel):
    kernel, home, kind = connect_kernel
    train = "%%tf_train {name} --workers 2 --epochs 50 --batch-size 32 --label y --restart {flags}\n" + MODEL
    _ok(kernel, SMALL_ETL.format(name="cx_stop", rows=200000))
    _ok(kernel, train.format(name="cx_stop", flags="--background"))
    _training(home, "cx_stop")
    started = time.monotonic()
    out = _ok(kernel, "%tfos_stop cx_stop", timeout=60)
    took = time.monotonic() - started
    assert "stopped" in out and took < 15, (took, out)
    job = get_job("cx_stop", home)
    assert job.state == "stopped"
    assert_stop_checkpoint(job)
    _nothing_left(kernel, "cx_stop")
    # A kernel interrupt while a job trains in the cell.
    _ok(kernel, SMALL_ETL.format(name="cx_int", rows=200000))
    msg = kernel.kc.execute(train.format(name="cx_int", flags=""))
    _training(home, "cx_int")
    started = time.monotonic()
    kernel.km.interrupt_kernel()
    reply = kernel.kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg:
        reply = kernel.kc.get_shell_msg(timeout=60)
    assert reply["content"]["ename"] == "KeyboardInterrupt" and time.monotonic() - started < 15, reply["content"]
    job = get_job("cx_int", home)
    assert job.state == "stopped"
    assert_stop_checkpoint(job)
    _nothing_left(kernel, "cx_int")


def test_an_env_archive_travels_through_the_sessions_artifacts(connect_kernel, tmp_path):
    """A small environment packed by pack_env: a venv whose site-packages adds this one's
    (a .pth that runs site.addsitedir), so it has TensorFlow and tfos-magic without
    copying GBs into the archive."""
    kernel, home, kind = connect_kernel
    site = make_venv(tmp_path / "env")
    with open(os.path.join(site, "tfos-test-base.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    archive = pack_env(str(tmp_path / f"env-{kind}.tar.gz"), prefix=str(tmp_path / "env"), log=lambda _: None)
    _ok(kernel, SMALL_ETL.format(name="cx_env", rows=8000))
    _ok(kernel, f"%%tf_train cx_env --workers 2 --epochs 2 --batch-size 64 --label y --restart --env {archive}\n"
        + MODEL)
    job = get_job("cx_env", home)
    assert job.state == "succeeded", job.error
    pythons = [e.get("python") or "" for e in job.events if e["kind"] == "started"]
    assert len(pythons) == 2 and all("/tfos-env-" in p and not p.startswith(sys.prefix) for p in pythons), pythons
    assert tf_processes_gone("tfos-cx_env-")


def test_after_a_kernel_restart_a_job_resumes_on_the_server_it_ran_on(connect_server, tfos_kernel, tmp_path):
    """A job trained on an sc:// server, then a new kernel with no session: `%tfos_resume`
    connects to that server again (the stored job's address), re-runs the stored ETL cell
    there, and continues from the latest checkpoint."""
    env = dict(os.environ, TFOS_HOME=str(tmp_path), PYSPARK_PYTHON=sys.executable, TFOS_DASHBOARD="0")
    first = Kernel(tfos_kernel, env)
    try:
        _ok(first, f"from pyspark.sql import SparkSession\nspark = SparkSession.builder.remote({connect_server!r})"
                   ".getOrCreate()")
        _ok(first, SMALL_ETL.format(name="cx_resume", rows=8000))
        _ok(first, "%%tf_train cx_resume --workers 2 --epochs 1 --batch-size 64 --label y --restart\n" + MODEL)
    finally:
        first.close()
    assert [h["epoch"] for h in get_job("cx_resume", str(tmp_path)).history] == [1]
    # The job is asked for more epochs than it ran, as a user re-running with --epochs 2 would.
    second = Kernel(tfos_kernel, env)
    try:
        _ok(second, "%%tf_train cx_resume --workers 2 --epochs 2 --batch-size 64 --label y --rerun-etl\n" + MODEL)
        out = _ok(second, "print('SESSION', type(spark).__module__, spark.client.host, spark.client._builder.endpoint)")
    finally:
        second.close()
    assert f"SESSION pyspark.sql.connect.session 127.0.0.1 {connect_server.removeprefix('sc://')}" in out, out
    job = get_job("cx_resume", str(tmp_path))
    assert job.state == "succeeded", job.error
    assert [h["epoch"] for h in job.history] == [1, 2], job.history
    restored = [e for e in job.events if e["kind"] == "training" and e.get("restored_from")]
    assert restored, [e for e in job.events if e["kind"] == "training"]  # continued, not started over
    status = subprocess.run([os.path.join(sys.prefix, "bin", "tfos"), "status", "cx_resume"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert status.returncode == 0 and re.search(rf"spark:\s+{re.escape(connect_server)}\n", status.stdout), status


@pytest.mark.parametrize("connect_kernel", ["api-mode"], indirect=True)
def test_a_text_model_adapts_on_its_sample_and_scores_raw_strings(connect_kernel):
    """A string column, build_model(sample) (drawn with toArrow) and Job.predict over a
    Connect session."""
    from test_text_images import TEXT_ETL, TEXT_MODEL

    kernel, home, kind = connect_kernel
    _ok(kernel, TEXT_ETL.replace("%%spark_etl reviews", "%%spark_etl cx_text"))
    _ok(kernel, "%%tf_train cx_text --workers 2 --epochs 4 --batch-size 64 --label label --restart\n" + TEXT_MODEL)
    out = _ok(kernel, "from pyspark.sql import functions as F\nfrom tfos_magic import get_job\n"
                      "p = get_job('cx_text').predict(heldout)\nright = (F.col('prediction') > 0.5).cast('int') == "
                      "F.col('label').cast('int')\nprint('ACCURACY', p.select(F.avg(right.cast('double'))).first()[0])")
    accuracy = float(out.split("ACCURACY ")[1].split()[0])
    assert accuracy >= 0.85, out
    assert tf_processes_gone("tfos-cx_text-")
