"""The supervisor's decisions against a scripted Spark (tests/spark_fake.py), in milliseconds:
when the start-up clock starts, when a job starved of task slots fails, when the PS job
starts, what a stop during the ETL cancels; and the launcher's checks of slots and of
the checkpoint dir. The same paths run for real in test_multihost.py and test_cluster.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from spark_fake import FakeAction, FakeSpark

from tfos_magic.driver.observers import JobObserver
from tfos_magic.driver.spark_backend import SparkJob
from tfos_magic.driver.supervisor import AttemptFailed, AttemptJobs, JobStopped, RunMonitor, StopControl, run_attempt
from tfos_magic.errors import TfosError
from tfos_magic.job import JobStore
from tfos_magic.protocol.events import make_event

GROUP = "tfos-job-run1-beef-a1"
WORKERS = [("worker", 0), ("worker", 1)]
OK_ROWS = [{"worker": 0, "result": json.dumps({"status": "ok"})}, {"worker": 1, "result": json.dumps({"status": "ok"})}]


class Seen(JobObserver):
    def __init__(self) -> None:
        self.events: list[dict] = []

    def on_event(self, event: dict) -> None:
        self.events.append(event)


@pytest.fixture
def monitor(tmp_path):
    return RunMonitor(JobStore(tmp_path), "job", 1)


def later(seconds: float, fn) -> threading.Timer:
    timer = threading.Timer(seconds, fn)
    timer.start()
    return timer


def send(monitor: RunMonitor, kind: str, index: int, role: str = "worker", **fields) -> None:
    monitor.sink(make_event(kind, index, role=role, **fields), 1)


def test_a_long_etl_whose_tasks_run_never_starts_the_start_up_clock(monitor):
    """The ETL's stages (an adaptive query's shuffles, each a job of the group) run for 4x
    the start timeout; the TF stage's tasks then start, and the attempt succeeds."""
    spark, action, seen = FakeSpark(), FakeAction(OK_ROWS), Seen()
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    for i in range(8):  # 2 s of ETL, its tasks running, progress moving
        later(0.25 * i, lambda i=i: spark.set_activity(GROUP, done=i, total=10, running=2))

    def tf_stage() -> None:
        for index in (0, 1):
            send(monitor, "task", index, stage=7)
            send(monitor, "started", index)
        later(0.3, action.finish)

    later(2.0, tf_stage)
    started = time.monotonic()
    run_attempt(jobs, monitor, WORKERS, start_timeout=0.5, observers=seen)
    assert time.monotonic() - started >= 2.0
    progress = [e for e in seen.events if e["kind"] == "spark"]
    assert len(progress) >= 4 and progress[-1]["done"] > progress[0]["done"], progress


def test_a_job_that_no_task_slot_runs_fails_after_the_start_timeout_naming_slots(monitor):
    spark, action = FakeSpark(), FakeAction()
    spark.set_activity(GROUP, done=0, total=2, running=0)  # the TF stage waits for slots
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    started = time.monotonic()
    with pytest.raises(AttemptFailed, match="No Spark task of the job ran for 1s") as err:
        run_attempt(jobs, monitor, WORKERS, start_timeout=1.0, observers=JobObserver())
    assert 1.0 <= time.monotonic() - started < 3.0
    assert "no free task slots" in str(err.value) and not err.value.retryable
    assert GROUP in spark.cancelled and not jobs.workers.running


def test_tf_processes_that_never_start_are_named_from_when_their_stage_started(monitor):
    spark, action = FakeSpark(), FakeAction()
    spark.set_activity(GROUP, done=3, total=5, running=2)
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    for index in (0, 1):
        later(0.5, lambda index=index: send(monitor, "task", index, stage=3))
    later(0.6, lambda: send(monitor, "started", 0))
    started = time.monotonic()
    with pytest.raises(AttemptFailed) as err:
        run_attempt(jobs, monitor, WORKERS, start_timeout=1.0, observers=JobObserver())
    assert 1.5 <= time.monotonic() - started < 3.5  # timed from the tasks' start, not the job's
    assert "Only 1 of 2 TF tasks started within 1s of the TF stage starting" in str(err.value)
    assert "worker/1 ran as Spark tasks but their TF processes did not start" in str(err.value)


def test_the_parameter_servers_start_when_the_workers_tasks_do(monitor):
    spark, workers_action, ps_action = FakeSpark(), FakeAction(OK_ROWS), FakeAction()
    started_ps: list[float] = []

    def start_ps() -> SparkJob:
        started_ps.append(time.monotonic())
        return SparkJob(spark, GROUP + "-ps", "ps", ps_action)

    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", workers_action), start_ps=start_ps)
    spark.set_activity(GROUP, done=0, total=4, running=2)
    tasks_at: list[float] = []

    def tf_stage() -> None:
        tasks_at.append(time.monotonic())
        for index in (0, 1):
            send(monitor, "task", index, stage=3)
        later(0.4, lambda: [send(monitor, "task", 0, role="ps", stage=4)] + [
            send(monitor, "started", i, role=r) for r, i in [("worker", 0), ("worker", 1), ("ps", 0)]])
        later(0.8, workers_action.finish)

    later(1.0, tf_stage)
    run_attempt(jobs, monitor, WORKERS + [("ps", 0)], start_timeout=5.0, observers=JobObserver())
    assert len(started_ps) == 1 and 0 <= started_ps[0] - tasks_at[0] < 0.5, (started_ps, tasks_at)
    assert GROUP + "-ps" in spark.cancelled and not jobs.ps.running  # the PS job ends with the workers'


def test_a_stop_during_the_etl_cancels_the_group_and_its_future_jobs(monitor):
    spark, action = FakeSpark(), FakeAction()
    spark.set_activity(GROUP, done=1, total=50, running=2)
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    asked = threading.Event()
    later(0.5, asked.set)
    with pytest.raises(JobStopped):
        run_attempt(jobs, monitor, WORKERS, start_timeout=0.2, observers=JobObserver(),
                    stop=StopControl(asked.is_set, lambda: 0))
    assert spark.cancelled == [GROUP] and not jobs.workers.running


def test_slots_are_counted_for_the_profile_the_workers_run_under():
    from tfos_magic.driver.slots import check_slots

    spark = FakeSpark(slots=4, profile_slots=2)  # 2 executors x 2 GPUs; 2 GPUs per worker: 2 slots
    started = time.monotonic()
    check_slots(spark, 2, "--workers 2", profile=object(), gpus=2)
    with pytest.raises(TfosError, match="needs 3 concurrent Spark tasks with 2 GPU\\(s\\) each, but the cluster "
                                        "\\(spark://fake:7077\\) has 2 task slots with that many GPUs"):
        check_slots(spark, 3, "--workers 3", profile=object(), gpus=2)
    with pytest.raises(TfosError, match="needs 5 concurrent Spark tasks, but .* has 4 task slots now. Lower "
                                        "--workers to at most 1"):
        check_slots(spark, 2, "--workers 2 plus --ps 3", profile=object(), gpus=2, others=3)
    assert time.monotonic() - started < 0.5  # a settled cluster is answered at once


def test_a_young_sessions_executors_get_a_moment_to_register():
    from tfos_magic.driver.slots import check_slots

    spark = FakeSpark(slots=1)
    spark.age = 0.0
    later(0.6, lambda: setattr(spark, "slots", 2))  # the second executor registers
    started = time.monotonic()
    check_slots(spark, 2, "--workers 2", wait=5)
    assert 0.5 < time.monotonic() - started < 3
    spark.age, spark.slots = 4.0, 1  # 1 s of the 5 left
    started = time.monotonic()
    with pytest.raises(TfosError):
        check_slots(spark, 2, "--workers 2", wait=5)
    assert 0.9 < time.monotonic() - started < 3


def test_a_checkpoint_dir_an_executor_does_not_see_is_refused_naming_it(tmp_path):
    from tfos_magic.driver.checkpoint_dir import VisibilityMarker, check_visible

    spark = FakeSpark()
    marker = VisibilityMarker(str(tmp_path))
    assert (tmp_path / marker.path.rsplit("/", 1)[1]).exists()
    spark.barrier_reports = [json.dumps({"executor": "198.18.0.11", "host": "h1", "sees": True}),
                             json.dumps({"executor": "198.18.0.12", "host": "h2", "sees": False})]
    with pytest.raises(TfosError) as err:
        check_visible(spark, str(tmp_path), marker, "g", JobObserver())
    assert f"The checkpoint dir {str(tmp_path)!r} is not visible to the executors on 198.18.0.12 (h2)" in str(err.value)
    assert "--checkpoint-dir" in str(err.value) and "TFOS_CHECKPOINT_ROOT" in str(err.value)
    spark.barrier_reports[1] = spark.barrier_reports[0]
    check_visible(spark, str(tmp_path), marker, "g", JobObserver())
    marker.remove()
    assert not list(tmp_path.iterdir())


def test_a_busy_cluster_skips_the_visibility_check_with_a_note(tmp_path, monkeypatch):
    from tfos_magic.driver import checkpoint_dir

    monkeypatch.setattr(checkpoint_dir, "PROBE_WAIT_S", 0.3)
    spark, notes = FakeSpark(), []

    class Notes(JobObserver):
        def on_log(self, line: str) -> None:
            notes.append(line)

    marker = checkpoint_dir.VisibilityMarker(str(tmp_path))
    checkpoint_dir.check_visible(spark, str(tmp_path), marker, "g-storage", Notes())
    assert notes and "task slots are busy" in notes[0] and "g-storage" in spark.cancelled


def test_the_site_root_gives_each_job_its_own_checkpoint_dir(tmp_path, monkeypatch):
    from tfos_magic.driver.checkpoint_dir import checkpoint_dir_for

    store = JobStore(tmp_path)
    monkeypatch.delenv("TFOS_CHECKPOINT_ROOT", raising=False)
    assert checkpoint_dir_for(None, store, "a") == store.default_checkpoint_dir("a")
    monkeypatch.setenv("TFOS_CHECKPOINT_ROOT", "hdfs://nn:8020/tfos/")
    assert checkpoint_dir_for(None, store, "a") == "hdfs://nn:8020/tfos/a"
    assert checkpoint_dir_for("s3a://b/x", store, "a") == "s3a://b/x"


SPARK_TEXT = ("An error occurred while calling o87.collectToPython.\n: org.apache.spark.SparkException: Job aborted due "
              "to stage failure: ... org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
              "  File \"feeder.py\", line 300, in task\ntfos_magic.task.feeder.{cls}: TF worker 0 {what}\n\tat org.apache")


@pytest.mark.parametrize("cls, what, retryable", [
    ("WorkerFailed", "failed: NameError: name 'x' is not defined", False),  # the cell: a restart cannot help
    ("WorkerCrashed", "crashed with SIGKILL (signal 9) before reporting a result", True),
])
def test_a_task_failure_is_retried_only_when_spark_says_it_crashed(monitor, cls, what, retryable):
    """No report reached the notebook (its executors could not reach it, say): the class
    that failed the task, in Spark's error text, says whether a restart may help."""
    spark, action = FakeSpark(), FakeAction()
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    later(0.2, lambda: action.fail(RuntimeError(SPARK_TEXT.format(cls=cls, what=what))))
    with pytest.raises(AttemptFailed) as err:
        run_attempt(jobs, monitor, WORKERS, start_timeout=5.0, observers=JobObserver())
    assert err.value.retryable is retryable and str(err.value) == f"TF worker 0 {what}", str(err.value)


def test_a_lost_executor_may_be_retried(monitor):
    spark, action = FakeSpark(), FakeAction()
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    later(0.2, lambda: action.fail(RuntimeError("Job aborted due to stage failure: ExecutorLostFailure (executor 1 "
                                                "exited caused by one of the running tasks)")))
    with pytest.raises(AttemptFailed) as err:
        run_attempt(jobs, monitor, WORKERS, start_timeout=5.0, observers=JobObserver())
    assert err.value.retryable and "ExecutorLostFailure" in str(err.value)


def test_the_failing_process_s_own_report_wins_over_spark_s_earlier_word(monitor):
    """Spark ends the barrier stage as soon as a task fails; the TF process's own error
    event, with the cell's line, may arrive a moment later and is the one to report."""
    spark, action = FakeSpark(), FakeAction()
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    later(0.2, lambda: action.fail(RuntimeError("Job aborted: ExecutorLostFailure")))
    later(1.0, lambda: send(monitor, "error", 1, message="ValueError: bad label (cell line 4)"))
    started = time.monotonic()
    with pytest.raises(AttemptFailed) as err:
        run_attempt(jobs, monitor, WORKERS, start_timeout=5.0, observers=JobObserver())
    assert str(err.value) == "worker 1: ValueError: bad label (cell line 4)" and not err.value.retryable
    assert time.monotonic() - started < 3.5


@pytest.mark.parametrize("complaint", [
    "RuntimeError: [../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:23469: Connection reset by peer.",
    "RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40122",
    "DistBackendError: [../gloo/transport/tcp/unbound_buffer.cc:81] Socket closed",
    "UnavailableError: Collective ops is aborted by: failed to connect to all addresses",
])
def test_a_peer_s_complaint_that_the_dead_worker_broke_its_collective_is_not_the_cause(monitor, complaint):
    """Worker 1 was killed (a retryable crash); worker 0's collective then failed, in the
    words of TF or of Gloo's release. The crash is the error named, and a restart may help."""
    send(monitor, "error", 1, message="PyTorch worker 1 crashed with SIGKILL (signal 9)", retryable=True)
    send(monitor, "error", 0, message=complaint)
    failed = monitor.failed()
    assert str(failed).startswith("worker 1: PyTorch worker 1 crashed") and failed.retryable, failed


def test_a_grpc_server_that_could_not_bind_its_port_is_the_cause_and_a_restart_may_cure_it(monitor):
    """Its agreed port was taken before the server bound it: the next attempt agrees on new ones."""
    send(monitor, "error", 1, message="UnknownError: Could not start gRPC server")
    send(monitor, "error", 0, message="UnavailableError: Collective ops is aborted by: failed to connect")
    failed = monitor.failed()
    assert str(failed).startswith("worker 1: UnknownError: Could not start gRPC") and failed.retryable, failed


def test_an_error_of_the_cell_s_own_is_never_a_peer_s_complaint(monitor):
    send(monitor, "error", 0, message="ValueError: bad label (cell line 4)")
    assert not monitor.failed().retryable


def test_workers_that_stop_making_progress_fail_the_attempt_naming_their_last_events(monitor):
    """Every TF process started, then none moves on: the stall timeout fails the attempt
    (not retried), names each task's last event, and cancels the Spark job."""
    spark, action = FakeSpark(), FakeAction()
    jobs = AttemptJobs(spark, SparkJob(spark, GROUP, "workers", action))
    for index in (0, 1):
        send(monitor, "task", index, stage=3)
        send(monitor, "started", index)
    send(monitor, "step", 0, step=12, loss=0.5)
    started = time.monotonic()
    with pytest.raises(AttemptFailed, match="No progress from any worker for 1s") as err:
        run_attempt(jobs, monitor, WORKERS, start_timeout=5.0, observers=JobObserver(), stall_timeout=1.0)
    assert 1.0 <= time.monotonic() - started < 3.0
    assert "worker 0" in str(err.value) or "worker/0" in str(err.value), err.value
    assert not err.value.retryable and GROUP in spark.cancelled and not jobs.workers.running
