"""Trust: what a job ships, stores and reports must not be another user's, nor wrong.

- the package zip the executors import is built in a folder only this user can write,
  and checked against the package before it is shipped: a folder and a zip planted
  where the old code looked (the shared temp dir) are ignored;
- secrets stay out of the store and off command lines;
- every exit from a run leaves a final state; a refused run changes nothing; a stop
  during a background run's planning is honoured; a partition that breaks mid-stream
  never looks complete to its TF process.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import run

from tfos_magic import JobFailed, TfosError, get_job

NOBODY = 65534
ETL = """%%spark_etl {name}
from pyspark.sql import functions as F
df = spark.range(200).select(F.rand(1).alias("a"), F.rand(2).alias("b"))
df.withColumn("y", 3 * F.col("a") - 2 * F.col("b"))
"""
MODEL = """
import tensorflow as tf
def build_model():
    m = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    m.compile(optimizer="adam", loss="mse")
    return m
"""


def _as_another_user(path: Path) -> None:
    """Hand `path` to uid nobody, as if that user had made it (root only; else left as is)."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)


def _old_shipped_name() -> str:
    """The name the old code gave the package zip: a hash of the package's public sources."""
    from tfos_magic.driver import executor_env

    digest = hashlib.sha256()
    for path in executor_env._sources():
        digest.update(str(path.relative_to(executor_env.PACKAGE)).encode())
        digest.update(path.read_bytes())
    return f"tfos_magic-{digest.hexdigest()[:16]}.zip"


def test_a_package_zip_planted_in_the_temp_dir_is_never_shipped(tmp_path, monkeypatch):
    """Another local user makes the folder the old code used, with a zip whose
    tfos_magic would run their code in every executor as the notebook's owner."""
    import tempfile

    from tfos_magic.driver.executor_env import package_zip

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    planted = Path(tempfile.gettempdir()) / f"tfos-ship-{os.getuid()}"
    existed = planted.exists()
    planted.mkdir(exist_ok=True)
    owner = planted.stat()
    evil = planted / _old_shipped_name()
    kept = evil.read_bytes() if evil.exists() else None
    try:
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("tfos_magic/__init__.py", "raise SystemExit('planted code ran')\n")
        _as_another_user(planted)
        _as_another_user(evil)
        shipped = package_zip()  # what ship_package hands Spark
        assert shipped.parent == tmp_path / "cache" / "tfos-magic" / "ship", shipped
        assert (shipped.parent.stat().st_mode & 0o777) == 0o700 and shipped.stat().st_uid == os.getuid()
        with zipfile.ZipFile(shipped) as zf:
            init = zf.read("tfos_magic/__init__.py")
        assert b"planted" not in init and init == (Path(__file__).parents[1] / "tfos_magic/__init__.py").read_bytes()
    finally:  # leave the folder as it was (an older version of this package may use it)
        evil.unlink(missing_ok=True)
        if kept is not None:
            evil.write_bytes(kept)
        if not existed:
            planted.rmdir()
        elif os.geteuid() == 0:
            os.chown(planted, owner.st_uid, owner.st_gid)


def test_a_tampered_zip_or_a_foreign_folder_in_the_cache_is_not_trusted(tmp_path, monkeypatch):
    from tfos_magic.driver.executor_env import package_zip

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = package_zip()
    with zipfile.ZipFile(good, "w") as zf:  # the right name, another content
        zf.writestr("tfos_magic/__init__.py", "raise SystemExit('tampered')\n")
    again = package_zip()
    assert again == good
    with zipfile.ZipFile(again) as zf:
        assert b"tampered" not in zf.read("tfos_magic/__init__.py")
    # The cache folder is a link to a folder someone else controls: a private temp dir instead.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = tmp_path / "cache2" / "tfos-magic" / "ship"
    folder.parent.mkdir(parents=True)
    folder.symlink_to(elsewhere)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    fallback = package_zip()
    assert elsewhere not in fallback.parents and (fallback.parent.stat().st_mode & 0o777) == 0o700


def test_secrets_are_redacted_in_the_store_and_the_command_line_takes_no_password(tmp_path):
    from tfos_magic.cli.parameters import parse_parameters
    from tfos_magic.cli.submit import zk_auth_from
    from tfos_magic.job.spec import REDACTED, redact_conf
    from tfos_magic.protocol.options import TrainOptions

    conf = redact_conf({"spark.hadoop.fs.s3a.secret.key": "s3cr3t", "spark.hadoop.fs.s3a.access.key": "AKIA",
                        "spark.authenticate.secret": "x", "spark.executor.memory": "2g"})
    assert conf == {"spark.hadoop.fs.s3a.secret.key": REDACTED, "spark.hadoop.fs.s3a.access.key": REDACTED,
                    "spark.authenticate.secret": REDACTED, "spark.executor.memory": "2g"}
    assert TrainOptions(zk_auth="alice:pw").to_dict(secrets=False)["zk_auth"] == "alice:***"
    assert TrainOptions(zk_auth="justapassword").to_dict(secrets=False)["zk_auth"] == "***"
    with pytest.raises(TfosError, match="shows the password to every user"):
        zk_auth_from("alice:pw")
    secret = tmp_path / "zk"
    secret.write_text("alice:pw\n")
    assert zk_auth_from(f"@{secret}") == "alice:pw"
    with pytest.raises(TfosError, match="not a keyword"):
        parse_parameters(["class=1"])


def test_the_stored_spark_conf_keeps_no_secret(spark, tmp_path):
    from tfos_magic.api import spark_settings
    from tfos_magic.job.spec import REDACTED

    spark.sparkContext._conf.set("spark.hadoop.fs.s3a.secret.key", "s3cr3t")
    try:
        settings = spark_settings(spark)
    finally:
        spark.sparkContext._conf._jconf.remove("spark.hadoop.fs.s3a.secret.key")
    assert settings["conf"]["spark.hadoop.fs.s3a.secret.key"] == REDACTED
    assert "s3cr3t" not in json.dumps(settings)


def test_a_run_that_ends_on_an_unexpected_error_is_failed_not_running(shell, monkeypatch):
    """A Py4J error from Spark, an OSError from the store: launch() used to leave the job
    `running` (later `interrupted`, which invites a resume) with no end for its views."""
    from tfos_magic.driver import launcher

    def broken(*args, **kwargs):
        raise RuntimeError("An error occurred while calling o123.collect: py4j says no")

    monkeypatch.setattr(launcher, "_attempt", broken)
    run(shell, ETL.format(name="boom"))
    _, err = run(shell, "%%tf_train boom --label y\n" + MODEL)
    assert isinstance(err, RuntimeError), err
    job = get_job("boom")
    assert job.state == "failed" and job.error.startswith("RuntimeError: An error occurred while calling"), job.error
    assert job._state.get("ended") and not launcher.running_here("boom")


def test_a_refused_run_leaves_the_stored_cells_and_options_as_they_were(shell):
    from tfos_magic.job import JobStore

    run(shell, ETL.format(name="held"))
    other = subprocess.Popen(["sleep", "60"])  # stands in for the kernel that runs the job
    try:
        JobStore().write_state("held", state="running", run=1, attempt=1, driver_pid=other.pid,
                               driver_host=socket.gethostname(), heartbeat=time.time())
        before = (JobStore().job_dir("held") / "spec.json").read_text()
        _, err = run(shell, "%%tf_train held --label y --epochs 7\n" + MODEL)
        assert isinstance(err, TfosError) and "already running" in str(err), err
        assert (JobStore().job_dir("held") / "spec.json").read_text() == before
    finally:
        other.kill()
        other.wait()


def test_a_stop_while_a_background_run_is_still_planned_stops_it(shell, monkeypatch):
    """The run is being planned (here a slot check held for 3 s): %tfos_stop used to say
    'not running', and the launcher then deleted the stop request."""
    from tfos_magic.driver import launcher

    real = launcher.check_slots

    def slow(*args, **kwargs):
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "check_slots", slow)
    run(shell, ETL.format(name="early"))
    result, err = run(shell, "%%tf_train early --label y --background\n" + MODEL)
    assert err is None, err
    started = time.monotonic()
    result, err = run(shell, "%tfos_stop early")
    assert err is None, err
    job = get_job("early")
    deadline = time.monotonic() + 30
    while job.state not in ("stopped", "failed", "succeeded") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.state == "stopped", (job.state, job.error)
    assert time.monotonic() - started < 15
    assert not [e for e in job.events if e["kind"] in ("task", "started", "step")], "no task may start"
    assert not (Path(job.dir) / "stop-request").exists()


def test_a_partition_that_breaks_mid_stream_never_looks_complete_to_its_tf_process():
    """An Arrow IO error from Spark's side is an OSError too: the feeder used to swallow it
    and close the stream with its end marker, so a short partition looked whole."""
    from tfos_magic.task.feeder import _stream

    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys, pyarrow as pa\n"
         "t = pa.ipc.open_stream(sys.stdin.buffer).read_all()\nprint('complete', t.num_rows, flush=True)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    batch = pa.record_batch({"x": pa.array(range(10))})

    def partition():
        yield batch
        raise pa.ArrowIOError("the executor's stream ended early")

    try:
        with pytest.raises(OSError, match="ended early"):
            _stream(reader, batch, partition())
        time.sleep(1.0)
        assert reader.poll() is None, "the TF process saw an end of stream"
    finally:
        reader.kill()
        out, _ = reader.communicate(timeout=30)
    assert b"complete" not in out
