"""Job store and spec: pure logic, real files."""

import json
import multiprocessing
import os
import stat
import threading
import tracemalloc

import pytest

from tfos_magic.errors import TfosError
from tfos_magic.job import Job, JobSpec, JobStore, TrainOptions
from tfos_magic.job.digest import CHECKPOINTS_KEPT, EPOCHS_KEPT, SERIES_POINTS, JobDigest
from tfos_magic.job.store import check_name


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 101, "a b", "a..b", "ratings\n",
                                  "a\nb"])
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


@pytest.fixture
def umask_022():
    """The usual umask, which would leave new files world-readable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_store_is_private_whatever_the_umask(tmp_path, umask_022):
    home = tmp_path / "home" / "tfos"
    store = JobStore(home)
    store.save_spec(JobSpec("p"))
    store.append_events("p", [{"v": 1, "kind": "log", "text": "hello"}])
    details = store.write_error_details("p", "run-1-attempt-1-worker-0.txt", "Traceback ...")
    store.request_stop("p")
    job = store.job_dir("p")
    for folder in (home, store.jobs_dir, job, store.errors_dir("p")):
        assert _mode(folder) == 0o700, folder
    for file in (job / "spec.json", job / "state.json", store.metrics_path("p"), details,
                 store.stop_request_path("p")):
        assert _mode(file) == 0o600, file


def test_a_stop_request_is_never_written_through_a_link(tmp_path):
    store = JobStore(tmp_path / "home")
    store.save_spec(JobSpec("s"))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    store.stop_request_path("s").symlink_to(victim)  # planted in the job's directory
    store.request_stop("s")
    assert victim.read_text() == "keep me"
    assert stat.S_ISREG(os.lstat(store.stop_request_path("s")).st_mode) and store.stop_requested("s")


def test_error_details_are_read_only_from_the_jobs_own_errors_dir(tmp_path):
    store = JobStore(tmp_path / "home")
    store.save_spec(JobSpec("e"))
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    job = Job("e", store)
    store.write_state("e", error_file=str(secret))  # state.json names a file outside the job
    assert job.error_details is None
    store.errors_dir("e").mkdir()
    (store.errors_dir("e") / "secret.txt").symlink_to(secret)  # a link in errors/ leading out
    assert job.error_details is None
    details = store.write_error_details("e", "run-1-attempt-1-worker-0.txt", "Traceback ...\nValueError: bad")
    store.write_state("e", error_file=str(details))
    assert job.error_details == "Traceback ...\nValueError: bad"
    store.write_state("e", error_file="/elsewhere/run-1-attempt-1-worker-0.txt")  # a store moved since
    assert job.error_details == "Traceback ...\nValueError: bad", "the file's name counts, in the job's errors/"


def _metrics(store: JobStore, name: str, lines: list[bytes]) -> None:
    store.save_spec(JobSpec(name))
    store.metrics_path(name).write_bytes(b"".join(lines))


def _step(step: int, loss, **extra) -> bytes:
    return json.dumps({"v": 1, "kind": "step", "worker": 0, "step": step, "metrics": {"loss": loss}, **extra}
                      ).encode() + b"\n"


def test_lines_that_are_no_event_objects_are_skipped(tmp_path):
    store = JobStore(tmp_path)
    _metrics(store, "m", [
        _step(1, 1.0),
        b"[1, 2, 3]\n",  # JSON, but no object
        b'\xff\xfe{"kind": "step"}\n',  # not UTF-8
        b'{"v": 1, "kind": "step", "worker": 0, "step": 2, "metrics": {"loss": NaN, "rows_per_s": Infinity}}\n',
        b'{"v": 1, "kind": "step", "worker": 0, "step": 3, "metrics": [1, 2]}\n',  # metrics no object
        b'{"kind": "log", "text": ' + b"[" * 100 + b"]" * 100 + b"}\n",  # nested too deep to be written back
        _step(4, 0.5),
    ])
    events = list(store.events("m"))
    assert [e.get("step") for e in events] == [1, 2, 3, 4]
    assert events[1]["metrics"] == {"loss": None, "rows_per_s": None}, "NaN and infinities read as null"
    digest = JobDigest.of(events)
    assert (digest.step, digest.loss) == (4, 0.5)
    assert [p["step"] for p in digest.loss_curve(500)] == [1, 4]


def test_an_offset_inside_a_line_or_a_character_reads_from_the_next_line(tmp_path):
    store = JobStore(tmp_path)
    first = json.dumps({"kind": "log", "text": "héllo"}, ensure_ascii=False).encode() + b"\n"
    _metrics(store, "m", [first, _step(1, 1.0)])
    inside_e_acute = first.index("é".encode()) + 1
    read = store.read_events("m", inside_e_acute)
    assert [e["step"] for e in read.events] == [1] and not read.restarted
    assert read.offset == store.metrics_path("m").stat().st_size


def _in_a_thread(call, timeout: float = 10.0):
    """What `call()` returned or raised, or a failure if it is still blocked after `timeout`."""
    result = {}

    def body():
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread.is_alive(), result


def test_a_fifo_in_place_of_metrics_is_refused_without_blocking(tmp_path):
    store = JobStore(tmp_path)
    store.save_spec(JobSpec("f"))
    fifo = store.metrics_path("f")
    os.mkfifo(fifo)
    try:
        for call in (lambda: store.read_events("f"), lambda: list(store.events("f")),
                     lambda: store.append_events("f", [{"kind": "log"}])):
            blocked, result = _in_a_thread(call)
            assert not blocked, "a reader or writer blocked on the FIFO"
            assert isinstance(result.get("error"), OSError) and "not a regular file" in str(result["error"])
    finally:
        release_fifo(fifo)


def release_fifo(fifo) -> None:
    """Open the FIFO's other ends, so that a thread the old code left blocked on it goes on."""
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        try:
            os.close(os.open(fifo, flags))
        except OSError:
            pass


def test_an_over_long_line_is_skipped_in_bounded_memory_and_the_reads_move_on(tmp_path):
    store = JobStore(tmp_path)
    _metrics(store, "long", [_step(1, 1.0), b'{"kind": "log", "text": "' + b"x" * (24 << 20)])  # no newline yet
    tracemalloc.start()
    try:
        offsets = [0]
        for _ in range(8):
            read = store.read_events("long", offsets[-1], max_bytes=4 << 20)
            offsets.append(read.offset)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"reading a 24 MiB line took {peak >> 20} MiB"
    assert offsets[1] > len(_step(1, 1.0)) and offsets == sorted(offsets) and offsets[-1] > 20 << 20, \
        "each read moves on past what it skipped, so no read scans the line again"
    with open(store.metrics_path("long"), "ab") as f:
        f.write(b'"}\n' + _step(2, 0.5))
    end = store.read_events("long", offsets[-1])
    assert [e["step"] for e in end.events] == [2], "the line's tail is skipped; the next line is read"
    assert [e.get("step") for e in store.events("long")] == [1, 2]


def test_the_digest_folds_each_event_once_whatever_its_shape(tmp_path):
    store = JobStore(tmp_path)
    _metrics(store, "d", [
        b'{"kind": "checkpoint", "worker": 0, "step": 10, "epoch": 1, "path": "/c/ckpt-10", "reason": "epoch"}\n',
        b'{"kind": "step", "worker": 0, "step": 11, "metrics": "bad"}\n',
        b'{"kind": "epoch", "worker": 0, "epoch": "one", "metrics": {"loss": 1}}\n',
        b'{"kind": "epoch", "worker": 0, "epoch": 1e999, "metrics": {"loss": 1}}\n',
        b'{"kind": "gpu", "devices": [1, null, {"utilization": "x"}, {"utilization": 40}]}\n',
        b'{"kind": "gpu", "devices": "none"}\n',
        b'{"kind": "checkpoint", "path": ["not", "a", "path"], "step": 1e999}\n',
        b'{"kind": "model", "path": {"x": 1}}\n',
    ])
    digest = JobDigest()
    for _ in range(3):
        try:
            digest = digest.refresh(store, "d")
        except Exception:  # noqa: BLE001 - the old fold raised here, and then folded it all again
            pass
    assert [c["path"] for c in digest.checkpoints] == ["/c/ckpt-10", None], "each checkpoint listed once"
    assert digest.checkpoints[-1]["step"] is None and digest.step == 11 and digest.history == []
    assert digest.gpu_util is None and not digest.models


def test_the_digest_stays_bounded_however_long_the_run(tmp_path):
    digest = JobDigest()
    for s in range(1, 200_001):
        digest.feed({"kind": "step", "worker": 0, "step": s, "metrics": {"loss": 1.0 / s}})
    for s in range(3 * CHECKPOINTS_KEPT):
        digest.feed({"kind": "checkpoint", "step": s, "path": f"/c/ckpt-{s}"})
    for e in range(1, 2 * EPOCHS_KEPT):
        digest.feed({"kind": "epoch", "worker": 0, "epoch": e, "metrics": {f"m{i}": i for i in range(100)}})
    assert len(digest.loss_series.points) <= SERIES_POINTS
    curve = digest.loss_curve(500)
    assert len(curve) <= 500 and curve[0]["step"] == 1 and curve[-1]["step"] == 200_000
    assert [p["step"] for p in curve] == sorted(p["step"] for p in curve)
    assert len(digest.checkpoints) == CHECKPOINTS_KEPT and digest.latest_checkpoint.endswith(
        f"ckpt-{3 * CHECKPOINTS_KEPT - 1}")
    history = digest.history
    assert len(history) <= EPOCHS_KEPT and history[-1]["epoch"] == 2 * EPOCHS_KEPT - 1, "the latest epochs"
    assert len(history[-1]) <= 33, "a row keeps at most 32 metrics and its epoch"
