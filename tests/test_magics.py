"""The cell magics in a real IPython shell on the shared local[2] Spark session.

Bad input must give one clear error that names the fix, quickly, and lose nothing.
"""

import os
import time

import pytest
from conftest import run

from tfos_magic import JobFailed, TfosError, get_job

ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range({rows}).select(F.rand(1).alias("a"), F.rand(2).alias("b"))
df.withColumn("y", 3 * F.col("a") - 2 * F.col("b") + 0.5)
"""
MODEL = """
import tensorflow as tf
def build_model():
    m = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    m.compile(optimizer=tf.keras.optimizers.Adam(0.05), loss="mse")
    return m
"""


def _error(ip, source):
    _, err = run(ip, source)
    assert err is not None, "the cell should have failed"
    return err


def test_etl_registers_the_dataframe_without_running_a_job(shell, capsys):
    jobs_before = len(shell.user_ns["spark"].sparkContext.statusTracker().getJobIdsForGroup())
    _, err = run(shell, ETL.format(name="ok", rows=100))
    assert err is None
    out = capsys.readouterr().out
    assert "'ok'" in out and "partitions" in out and "|-- y: double" in out
    assert get_job("ok").state == "registered"
    assert get_job("ok").spec.etl_source.startswith("from pyspark.sql")
    assert len(shell.user_ns["spark"].sparkContext.statusTracker().getJobIdsForGroup()) == jobs_before


def test_an_etl_with_shuffles_is_planned_not_run(shell, capsys):
    """`value.rdd` on an adaptive plan would run every shuffle of the ETL here, in the cell."""
    tracker = shell.user_ns["spark"].sparkContext.statusTracker()
    jobs_before = len(tracker.getJobIdsForGroup())
    _, err = run(shell, "%%spark_etl shuffled\nfrom pyspark.sql import functions as F\nr = spark.range(1000)\n"
                        "r.groupBy((F.col('id') % 7).alias('k')).count().join(r.withColumn('k', F.col('id') % 7), 'k')")
    assert err is None, err
    assert "its shuffles decide the partitions when it runs" in capsys.readouterr().out
    assert len(tracker.getJobIdsForGroup()) == jobs_before


def test_etl_binds_spark_and_takes_df_variable(shell):
    del shell.user_ns["spark"]
    _, err = run(shell, "%%spark_etl byvar --df frame\nframe = spark.range(3)\nx = 1\n")
    assert err is None and "spark" in shell.user_ns


def test_etl_that_yields_no_dataframe(shell):
    err = _error(shell, "%%spark_etl nodf\nx = [1, 2]\nx\n")
    assert isinstance(err, TfosError)
    assert "must produce a Spark DataFrame" in str(err) and "a list" in str(err) and "--df" in str(err)
    assert not os.path.exists(os.path.join(os.environ["TFOS_HOME"], "jobs", "nodf", "spec.json"))


def test_job_name_cannot_escape_the_store(shell):
    err = _error(shell, "%%spark_etl ../x\nspark.range(1)\n")
    assert isinstance(err, TfosError) and "Invalid job name" in str(err)
    assert not os.path.exists(os.path.join(os.environ["TFOS_HOME"], "x"))


def test_train_without_etl(shell):
    err = _error(shell, "%%tf_train ghost --label y\n" + MODEL)
    assert isinstance(err, TfosError) and "%%spark_etl ghost" in str(err)


def test_train_cell_without_entry_point_or_with_syntax_error(shell):
    run(shell, ETL.format(name="src", rows=10))
    err = _error(shell, "%%tf_train src --label y\nimport tensorflow as tf\nmodel = 1\n")
    assert isinstance(err, TfosError) and "neither build_model() nor train(ctx)" in str(err)
    err = _error(shell, "%%tf_train src --label y\nimport tensorflow as tf\ndef build_model(:\n    pass\n")
    assert isinstance(err, TfosError) and "line 3" in str(err)  # line 1 is the %%tf_train line


def test_label_and_feature_column_errors(shell):
    run(shell, ETL.format(name="cols", rows=10))
    err = _error(shell, "%%tf_train cols --label rating\n" + MODEL)
    assert "label column 'rating' is not in the job's DataFrame" in str(err) and "a, b, y" in str(err)
    err = _error(shell, "%%tf_train cols\n" + MODEL)
    assert "--label" in str(err)
    for ddl, kind, hint in [("current_timestamp()", "timestamp", "cast it to a numeric type"),
                            ("map('k', rand())", "map<string,double>", "separate numeric columns"),
                            ("named_struct('p', rand())", "struct<p:double>", "df.select('f.*')"),
                            ("array('a', 'b')", "array<string>", "concat_ws")]:
        _, err = run(shell, f'%%spark_etl bad\nspark.range(5).selectExpr("rand() as a", "{ddl} as f", "rand() as y")\n')
        assert err is None, err
        err = _error(shell, "%%tf_train bad --label y\n" + MODEL)
        assert isinstance(err, TfosError), err
        assert "feature column 'f'" in str(err) and kind in str(err) and hint in str(err)


def test_more_workers_than_slots_fails_at_once(shell):
    run(shell, ETL.format(name="slots", rows=10))
    t0 = time.time()
    err = _error(shell, "%%tf_train slots --workers 3 --label y\n" + MODEL)
    assert isinstance(err, TfosError) and "2 task slots" in str(err) and "--workers" in str(err)
    assert time.time() - t0 < 10


def test_unwritable_checkpoint_dir(shell, tmp_path):
    run(shell, ETL.format(name="ckpt", rows=10))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    err = _error(shell, f"%%tf_train ckpt --label y --checkpoint-dir {blocker}/sub\n" + MODEL)
    assert isinstance(err, TfosError) and "not writable" in str(err) and "--checkpoint-dir" in str(err)
    assert get_job("ckpt").spec.etl_source, "the job is kept"


@pytest.mark.e2e
def test_nulls_are_reported_by_column_and_fillna_fixes_them(shell, capsys):
    run(shell, "%%spark_etl nulls\nfrom pyspark.sql import functions as F\n"
               "spark.range(400).select(F.when(F.col('id') % 7 == 3, None).otherwise(F.rand(1)).alias('a'),"
               " F.rand(2).alias('b'), F.rand(3).alias('y'))\n")
    t0 = time.time()
    err = _error(shell, "%%tf_train nulls --workers 2 --label y\n" + MODEL)
    assert isinstance(err, JobFailed), err
    assert "feature column 'a' has null values" in str(err) and "--fillna" in str(err)
    assert get_job("nulls").state == "failed" and "null" in get_job("nulls").error
    assert time.time() - t0 < 120
    _, err = run(shell, "%%tf_train nulls --workers 2 --label y --fillna 0\n" + MODEL)
    assert err is None, err
    assert get_job("nulls").state == "succeeded"


@pytest.mark.e2e
def test_uneven_and_empty_partitions_do_not_hang(shell):
    run(shell, ETL.format(name="tiny", rows=3))
    _, err = run(shell, "%%tf_train tiny --workers 2 --epochs 2 --batch-size 2 --label y\n" + MODEL)
    assert err is None, err
    run(shell, ETL.format(name="one", rows=1))
    _, err = run(shell, "%%tf_train one --workers 2 --epochs 1 --label y\n" + MODEL)
    assert err is None, err
    assert len(get_job("one").history) == 1
    run(shell, "%%spark_etl empty\nspark.range(0).selectExpr('rand() as a', 'rand() as y')\n")
    err = _error(shell, "%%tf_train empty --workers 2 --label y\n" + MODEL.replace("(2,)", "(1,)"))
    assert isinstance(err, JobFailed) and "DataFrame is empty" in str(err)


@pytest.mark.e2e
@pytest.mark.parametrize("second", [1000, 0])
def test_uneven_partitions_take_the_agreed_steps_every_epoch(shell, second):
    """Worker 0 has 2,000 rows, worker 1 half as many or none. Epoch 1 streams from Spark
    and agrees the end of data at each step; later epochs agree their step count once
    (keras_fit.agreed_steps), and the worker with fewer rows takes empty batches: exactly
    the larger partition's 20 batches. TF's per-step agreement may take one more step, an
    empty one on every worker, at the end of the streamed epoch."""
    name = f"uneven{second}"
    run(shell, f"%%spark_etl {name}\nfrom pyspark.sql import functions as F\n"
               f"spark.range(0, 4000, numPartitions=2).where(F.col('id') < {2000 + second})"
               ".select(F.rand(1).alias('a'), F.rand(2).alias('b')).withColumn('y', F.col('a') - F.col('b'))\n")
    _, err = run(shell, f"%%tf_train {name} --workers 2 --epochs 3 --batch-size 100 --label y\n" + MODEL)
    assert err is None, err
    job = get_job(name)
    ends = {(e["worker"], e["epoch"]): e["step"] for e in job.events if e["kind"] == "epoch"}
    first = ends[(0, 1)]
    assert first in (20, 21) and ends == {(w, n): first + 20 * (n - 1) for w in (0, 1) for n in (1, 2, 3)}, ends
    assert all(row["loss"] < 1.0 for row in job.history), job.history
    done = [e for e in job.events if e["kind"] == "finished"]
    assert len(done) == 2 and all(e["status"] == "ok" for e in done), done


@pytest.mark.e2e
def test_workers_that_never_start_fail_within_the_start_timeout(shell):
    # No shuffle before the barrier stage (one partition per worker already), so a
    # partition whose first row never comes keeps its TF worker from starting.
    run(shell, "%%spark_etl stuck\nimport time\nfrom pyspark.sql import functions as F\n"
               "stall = F.udf(lambda v: time.sleep(600) or v, 'double')\n"
               "spark.range(4, numPartitions=2).select(stall(F.rand(1)).alias('a'), F.rand(2).alias('y'))\n")
    t0 = time.time()
    err = _error(shell, "%%tf_train stuck --workers 2 --label y --start-timeout 3\n" + MODEL.replace("(2,)", "(1,)"))
    assert isinstance(err, TfosError), err
    assert "Only 0 of 2 TF tasks started within 3s" in str(err) and "worker/0, worker/1" in str(err) and "--start-timeout" in str(err)
    assert time.time() - t0 < 90
    assert get_job("stuck").state == "failed"
    tracker = shell.user_ns["spark"].sparkContext.statusTracker()
    deadline = time.time() + 30
    while tracker.getActiveJobsIds() and time.time() < deadline:
        time.sleep(0.5)
    assert tracker.getActiveJobsIds() == [], "the Spark job was cancelled"


@pytest.mark.e2e
def test_checkpoint_uri_that_workers_cannot_write(shell):
    # A URI is not checked in the driver (it may be hdfs:// or s3://); the chief checks it.
    run(shell, ETL.format(name="uri", rows=20))
    err = _error(shell, "%%tf_train uri --label y --checkpoint-dir nosuchscheme://bucket/ckpt\n" + MODEL)
    assert isinstance(err, JobFailed), err
    assert "not writable from the workers" in str(err) and "--checkpoint-dir" in str(err)


def test_a_job_running_elsewhere_is_not_started_twice(shell):
    import socket
    import subprocess

    from tfos_magic.job import JobStore

    run(shell, ETL.format(name="busy", rows=10))
    other = subprocess.Popen(["sleep", "60"])  # stands in for the kernel that runs the job
    try:
        JobStore().write_state("busy", state="running", run=3, attempt=1, driver_pid=other.pid,
                               driver_host=socket.gethostname())
        err = _error(shell, "%%tf_train busy --label y\n" + MODEL)
        assert isinstance(err, TfosError) and f"already running in process {other.pid}" in str(err), err
    finally:
        other.kill()
        other.wait()
    # Its kernel is gone: the stale 'running' does not block a new run (which fails on the label).
    err = _error(shell, "%%tf_train busy --label nosuch\n" + MODEL)
    assert "already running" not in str(err) and "'nosuch'" in str(err), err
