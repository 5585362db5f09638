"""Every TF process's life, in a real kernel (jupyter_client) on local Spark: a re-run
takes the spare TF processes its last run left (TensorFlow already loaded, task/spares.py)
and nothing of one job reaches the next; a background job returns at once, is refused a
second time and stops on `%tfos_stop`; a kernel interrupt checkpoints and cancels; and
no TF process, spare or not, outlives a failure, a stop, an interrupt, `spark.stop()`,
its idle time or the kernel."""

import time

import psutil
import pytest
from conftest import assert_stop_checkpoint, kernel_run, tf_processes

from tfos_magic import get_job

ETL = "%%spark_etl {name}\nspark.range(4000, numPartitions=2).selectExpr('rand(1) as a', 'rand(2) as y')"
LONG = ("%%tf_train {name} --workers 2 --epochs 1000 --batch-size 64 --label y {flags}\n"
        "import tensorflow as tf\n"
        "def build_model():\n"
        "    m = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])\n"
        "    m.compile(optimizer='sgd', loss='mse')\n"
        "    return m\n")
CELL = """
import builtins
import tensorflow as tf
assert not hasattr(builtins, "tfos_left_by_an_earlier_job"), "a spare carried state from one job into another"
builtins.tfos_left_by_an_earlier_job = True
{extra}
def build_model():
    m = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])
    m.compile(optimizer="sgd", loss="mse")
    return m
"""
ANY_TF = "tfos_magic.training.child"


def _train(kc, name: str, flags: str = "", extra: str = "", workers: int = 2, timeout: float = 180):
    reply, out = kernel_run(kc, ETL.format(name=name))
    assert reply["status"] == "ok", out
    return kernel_run(kc, f"%%tf_train {name} --workers {workers} --epochs 1 --batch-size 64 --label y {flags}\n"
                      + CELL.format(extra=extra), timeout=timeout)


def _tf_of(km, pattern: str = ANY_TF) -> list:
    """This kernel's TF processes (its Spark's Python workers' children), spares included:
    other tests' Spark sessions may hold spares of their own."""
    mine = {p.pid for p in psutil.Process(km.provisioner.pid).children(recursive=True)}
    return [p for p in tf_processes(pattern) if p.pid in mine]


def _spares(km, count: int, timeout: float = 60.0) -> list:
    """This kernel's spare TF processes once `count` are waiting (each loads TensorFlow first)."""
    deadline = time.time() + timeout
    while len(found := _tf_of(km, "--spare")) < count:
        assert time.time() < deadline, f"{len(found)} spare TF processes after {timeout:.0f}s, not {count}"
        time.sleep(0.3)
    return found


def _gone(procs: list, km=None, timeout: float = 30.0) -> bool:
    """Whether `procs` (and, with `km`, every TF process of that kernel) ended within
    `timeout`: checked by pid, so a process orphaned by its parent's end still counts."""
    deadline = time.time() + timeout
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive and not (km is not None and _tf_of(km)):
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.3)


def _warm(home, name: str) -> list[bool]:
    started = [e for e in get_job(name, str(home)).events if e["kind"] == "started"]
    return [bool(e.get("warm")) for e in sorted(started, key=lambda e: e["worker"])]


@pytest.mark.e2e
def test_a_rerun_starts_warm_and_no_tf_process_outlives_a_failure_a_stop_an_interrupt_or_spark_stop(local_kernel):
    km, kc, home = local_kernel
    reply, out = _train(kc, "w1")
    assert reply["status"] == "ok", out
    assert _warm(home, "w1") == [False, False], "the session's first job has no spares to take"
    spares = _spares(km, 2)  # one per Spark Python worker that ran a TF task, no more
    time.sleep(1)
    assert len(_tf_of(km, "--spare")) == 2

    reply, out = _train(kc, "w2")
    assert reply["status"] == "ok", out  # the cell asserts it sees nothing of w1's process
    assert _warm(home, "w2") == [True, True]
    assert _gone(spares), "a spare serves one task, then ends with it"
    started = [e for e in get_job("w2", str(home)).events if e["kind"] == "started"]
    assert all(e.get("rss_mib") and e["rss_mib"] > 50 for e in started), started  # what each one held

    # A failure: the job's processes and every spare end.
    spares = _spares(km, 2)
    reply, out = _train(kc, "w3", extra="raise ValueError('the cell fails')")
    assert reply["status"] == "error" and "the cell fails" in out, out
    assert _gone(spares, km), "TF processes or spares outlived a failure"

    # A background run: the cell returns at once, the kernel stays free, a second run is
    # refused, `%tfos_stop` checkpoints and ends it.
    reply, out = _train(kc, "w4")
    assert reply["status"] == "ok", out
    spares = _spares(km, 2)
    reply, out = kernel_run(kc, ETL.format(name="bg"))
    t0 = time.time()
    reply, out = kernel_run(kc, LONG.format(name="bg", flags="--background"))
    assert reply["status"] == "ok", out
    assert time.time() - t0 < 15, "a background cell returns at once"
    assert "widget-view" in out or "background" in out, out
    reply, out = kernel_run(kc, "print(6 * 7)")
    assert reply["status"] == "ok" and "42" in out, "the kernel is free while the job runs"
    reply, out = kernel_run(kc, LONG.format(name="bg", flags="--background"))
    assert reply["status"] == "error" and "already running in this kernel" in out, out
    _wait_steps(home, "bg")
    assert len(tf_processes("tfos-bg-")) == 2
    reply, out = kernel_run(kc, "%tfos_status bg")
    assert reply["status"] == "ok" and "widget-view" in out, out
    t0 = time.time()
    reply, out = kernel_run(kc, "%tfos_stop bg", timeout=60)
    assert reply["status"] == "ok" and "stopped" in out, out
    assert "PythonException" not in out, "a stop is not a task failure: no Spark stack trace in the cell"
    _stopped_and_gone(km, kc, home, "bg", t0, spares, "a stop")
    reply, out = kernel_run(kc, "%tfos_stop bg")
    assert reply["status"] == "error" and "is not running" in out, out

    # A kernel interrupt while a job trains in the cell.
    reply, out = _train(kc, "w6")
    assert reply["status"] == "ok", out
    spares = _spares(km, 2)
    reply, out = kernel_run(kc, ETL.format(name="long"))
    msg = kc.execute(LONG.format(name="long", flags=""))
    _wait_steps(home, "long")
    assert len(tf_processes("tfos-long-")) == 2
    t0 = time.time()
    km.interrupt_kernel()
    reply = _reply(kc, msg)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    _stopped_and_gone(km, kc, home, "long", t0, spares, "an interrupt")

    # spark.stop(): the Python workers end, and their spares with them.
    reply, out = _train(kc, "w8")
    assert reply["status"] == "ok", out
    spares = _spares(km, 2)
    reply, out = kernel_run(kc, "spark.stop()")
    assert reply["status"] == "ok", out
    assert _gone(spares, km), "spares outlived spark.stop()"


@pytest.mark.e2e
def test_spares_end_after_their_idle_time_and_with_the_kernel_and_can_be_turned_off(local_kernel):
    km, kc, home = local_kernel
    reply, out = _train(kc, "i1", flags="--warm-start 0", workers=1)
    assert reply["status"] == "ok", out
    time.sleep(3)
    assert not _tf_of(km, "--spare"), "--warm-start 0 leaves no spare"
    reply, out = _train(kc, "i2", flags="--warm-start 4", workers=1)
    assert reply["status"] == "ok", out
    assert _gone(_spares(km, 1), timeout=40), "a spare outlived its idle time"
    reply, out = _train(kc, "i3", workers=1)
    assert reply["status"] == "ok", out
    spares = _spares(km, 1)
    km.shutdown_kernel(now=False)
    assert _gone(spares), "a spare outlived its kernel"


def _stopped_and_gone(km, kc, home, name: str, asked_at: float, spares: list, how: str) -> None:
    """Control back within 15 s, the job `stopped` at a checkpoint, and no TF process,
    spare or Spark job left."""
    assert time.time() - asked_at < 15, "control returns within 15 s"
    job = get_job(name, str(home))
    assert job.state == "stopped"
    assert_stop_checkpoint(job)
    assert _gone(spares, km), f"TF processes or spares outlived {how}"
    reply, out = kernel_run(kc, "assert spark.sparkContext.statusTracker().getActiveJobsIds() == []")
    assert reply["status"] == "ok", out


def _wait_steps(home, name: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        metrics = home / "jobs" / name / "metrics.jsonl"
        if metrics.exists() and sum(e["kind"] == "step" for e in get_job(name, str(home)).events) >= 2:
            return
        assert time.time() < deadline, f"{name} never trained"
        time.sleep(0.3)


def _reply(kc, msg_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(1, deadline - time.time()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply
