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
