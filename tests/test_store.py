"""Job store and spec: pure logic, real files."""

import json
import multiprocessing

import pytest

from tfos_magic.errors import TfosError
from tfos_magic.job import Job, JobSpec, JobStore, TrainOptions
from tfos_magic.job.store import check_name


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 101, "a b", "a..b"])
def test_names_that_escape_or_confuse_are_refused(name):
    with pytest.raises(TfosError, match="Invalid job name"):
        check_name(name)


@pytest.mark.parametrize("name", ["ratings", "ratings_v2", "A-1.b"])
def test_good_names(name):
    assert check_name(name) == name


def test_spec_round_trip_and_state(tmp_path):
    store = JobStore(tmp_path)
    spec = JobSpec("j1", etl_source="df", train_source="def train(ctx): pass",
                   options=TrainOptions(workers=2, features=["a", "b"], label="y"))
    store.save_spec(spec)
    assert store.load_spec("j1") == spec
    on_disk = json.loads((tmp_path / "jobs/j1/spec.json").read_text())
    assert on_disk["format"] == "tfos-job/1"
    assert store.read_state("j1")["state"] == "registered"
    store.write_state("j1", state="running", run=1)
    assert Job("j1", store).state == "running"
    with pytest.raises(ValueError):
        store.write_state("j1", state="exploded")
    assert store.names() == ["j1"]
    assert not list(tmp_path.glob("jobs/j1/.*.tmp")), "atomic writes leave no temp files"


def test_unknown_job_names_the_fix(tmp_path):
    with pytest.raises(TfosError, match=r"Unknown job 'nope'.*%%spark_etl nope"):
        JobStore(tmp_path).load_spec("nope")


def test_history_from_chief_epochs_latest_run_wins(tmp_path):
    store = JobStore(tmp_path)
    store.save_spec(JobSpec("h"))
    store.append_events("h", [
        {"v": 1, "kind": "epoch", "worker": 0, "epoch": 1, "metrics": {"loss": 1.0}},
        {"v": 1, "kind": "epoch", "worker": 1, "epoch": 1, "metrics": {"loss": 9.0}},
        {"v": 1, "kind": "epoch", "worker": 0, "epoch": 2, "metrics": {"loss": 0.5}},
        {"v": 1, "kind": "checkpoint", "worker": 0, "path": "/c/ckpt-10"},
        {"v": 1, "kind": "epoch", "worker": 0, "epoch": 2, "metrics": {"loss": 0.4}},
    ])
    with open(store.metrics_path("h"), "a") as f:
        f.write('{"v": 1, "kind": "epo')  # a writer caught mid-line
    job = Job("h", store)
    assert job.history == [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.4}]
    assert job.latest_checkpoint == "/c/ckpt-10"


def _write_states(home, n):
    store = JobStore(home)
    for i in range(n):
        store.write_state("race", state="running", run=i)


def test_concurrent_reader_never_sees_a_torn_state(tmp_path):
    store = JobStore(tmp_path)
    store.save_spec(JobSpec("race"))
    proc = multiprocessing.get_context("spawn").Process(target=_write_states, args=(tmp_path, 300))
    proc.start()
    reads = 0
    while proc.is_alive() or reads == 0:
        state = store.read_state("race")  # json.load raises on a torn file
        assert state["format"] == "tfos-state/1"
        reads += 1
    proc.join(30)
    assert proc.exitcode == 0


def _running(store, **fields):
    store.save_spec(JobSpec("j"))
    return store.write_state("j", state="running", **fields)


def test_a_run_whose_kernel_died_reads_interrupted(tmp_path):
    import os
    import socket
    import subprocess
    import time

    store = JobStore(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    _running(store, driver_pid=dead.pid, driver_host=socket.gethostname(), heartbeat=time.time())
    state = store.read_state("j")
    assert state["state"] == "interrupted" and state["interrupted_at"] is not None
    assert Job("j", store).state == "interrupted", "get_job() reconciles too"
    assert store.read_state("j", reconcile=False)["state"] == "running", "the file itself is left alone"
    # Live on this host with a fresh heartbeat: running.
    store.write_state("j", driver_pid=os.getpid(), heartbeat=time.time())
    assert store.read_state("j")["state"] == "running"
    # On another host only the heartbeat counts.
    store.write_state("j", driver_host="elsewhere", heartbeat=time.time() - 5)
    assert store.read_state("j")["state"] == "running"
    store.write_state("j", heartbeat=time.time() - 120)
    assert store.read_state("j")["state"] == "interrupted"


def test_heartbeat_keeps_a_run_alive_and_stops_when_closed(tmp_path):
    import time

    from tfos_magic.job.store import Heartbeat

    store = JobStore(tmp_path)
    _running(store, driver_host="elsewhere", heartbeat=0)
    assert store.read_state("j")["state"] == "interrupted", "no heartbeat yet"
    beat = Heartbeat(store, "j", interval=0.05)
    first = store.read_state("j")["heartbeat"]
    assert store.read_state("j")["state"] == "running"
    time.sleep(0.3)
    beat.close()
    last = store.read_state("j")["heartbeat"]
    assert last > first, "the thread refreshes the heartbeat"
    time.sleep(0.2)
    assert store.read_state("j")["heartbeat"] == last, "and stops when closed"
