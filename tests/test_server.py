"""The server extension's REST API (docs/server-api.md) in a real Jupyter server, with
authentication on: the views of jobs written through the store's own API, events read by
byte offset, requests without a token refused, names and symlinks that would lead out of
the store refused, and a stop asked through the API that a real running job honours."""

import json
import os
import socket
import threading
import time
import tomllib
from pathlib import Path

import pytest

# The jp_* fixtures, for this module only (a plugin would apply its autouse event loop to
# the whole suite); imported first, so that nothing below is shadowed by its names.
from pytest_jupyter.jupyter_server import *  # noqa: F403, I001
from tornado.httpclient import HTTPResponse

from conftest import run
from tfos_magic.job import JobSpec, JobStore, TrainOptions
from tfos_magic.server.handlers import EventsHandler, JobHandler, JobsHandler, NotFoundHandler, StopHandler

ROOT = Path(__file__).parents[1]


@pytest.fixture
def jp_server_config(tfos_home):
    """The extension enabled as the installed config file enables it, with every request
    authenticated; TFOS_HOME is set before the server (and so the extension) starts."""
    return {"ServerApp": {"jpserver_extensions": {"tfos_magic": True, "jupyter_server_terminals": False},
                          "allow_unauthenticated_access": False}}


@pytest.fixture
def api(jp_fetch, jp_asyncio_loop):
    """A request to the API, through the test server: (status, JSON body)."""

    def call(*parts: str, method: str = "GET", headers: dict | None = None, **params: str) -> tuple[int, dict]:
        response: HTTPResponse = jp_asyncio_loop.run_until_complete(
            jp_fetch("tfos", "api", *parts, method=method, headers=headers, params=params,
                     body=b"" if method == "POST" else None, raise_error=False))
        return response.code, json.loads(response.body or b"null")

    return call


@pytest.fixture
def raw(http_server_client, jp_auth_header, jp_base_url, jp_asyncio_loop):
    """A request for a path exactly as written (jp_fetch would escape its `%`)."""

    def call(path: str, method: str = "GET") -> tuple[int, bytes]:
        response = jp_asyncio_loop.run_until_complete(http_server_client.fetch(
            jp_base_url + path, method=method, headers=dict(jp_auth_header), raise_error=False,
            body=b"" if method == "POST" else None, request_timeout=20))
        return response.code, response.body

    return call


def _job(store: JobStore, name: str, workers: int = 2, epochs: int = 3) -> None:
    store.save_spec(JobSpec(name, etl_source="spark.range(10)", train_source="def build_model(): ...",
                            options=TrainOptions(workers=workers, epochs=epochs, label="y")))


def _steps(first: int, last: int, loss0: float = 1.0) -> list[dict]:
    return [{"v": 1, "kind": "step", "worker": 0, "run": 1, "attempt": 1, "time": 1000.0 + s, "step": s,
             "metrics": {"loss": loss0 / s, "rows_per_s": 1000.0}, "rows": 64 * s} for s in range(first, last + 1)]


@pytest.fixture
def store(tfos_home, jp_root_dir) -> JobStore:
    """A store holding a finished, a failed, an interrupted and a registered job, written
    through the store's own API as a kernel writes them."""
    store = JobStore(tfos_home)
    _job(store, "finished")
    store.write_state("finished", state="succeeded", run=1, attempt=1, started=1000.0, ended=1100.0, workers=2,
                      ps=0, epochs=3, notebook_path=str(jp_root_dir / "work" / "ratings.ipynb"), cell_id="cell-7")
    ckpt = str(store.job_dir("finished") / "checkpoints" / "ckpt-1200")
    store.append_events("finished", _steps(1, 1200) + [
        {"v": 1, "kind": "step", "worker": 1, "run": 1, "attempt": 1, "time": 1.0, "step": 1200,
         "metrics": {"loss": 99.0}},  # another worker's: not the job's loss
        {"v": 1, "kind": "epoch", "worker": 0, "run": 1, "attempt": 1, "time": 2000.0, "epoch": 1, "step": 400,
         "metrics": {"loss": 0.5}},
        {"v": 1, "kind": "epoch", "worker": 0, "run": 1, "attempt": 1, "time": 2001.0, "epoch": 2, "step": 1200,
         "metrics": {"loss": 0.25, "rows_per_s": 1500.0}},
        {"v": 1, "kind": "checkpoint", "worker": 0, "run": 1, "attempt": 1, "time": 2002.0, "step": 1200,
         "epoch": 2, "path": ckpt, "reason": "epoch"},
        {"v": 1, "kind": "gpu", "worker": 1, "run": 1, "attempt": 1, "time": 2003.0,
         "devices": [{"gpu": 0, "utilization": 50.0}, {"gpu": 1, "utilization": 70.0}, {"gpu": 2, "utilization": None}]},
    ])

    _job(store, "failed", workers=1)
    details = store.write_error_details("failed", "run-1-attempt-1-worker-0.txt", "Traceback ...\nValueError: bad")
    store.write_state("failed", state="failed", run=1, attempt=3, started=2000.0, ended=2100.0, workers=1,
                      error="Job 'failed' failed: ValueError: bad\nin the cell, line 3", error_file=str(details),
                      notebook_path="failing.ipynb")

    _job(store, "lost")  # its kernel died: the heartbeat stopped long ago, on another host
    store.write_state("lost", state="running", run=2, attempt=1, started=3000.0, workers=2, driver_pid=1,
                      driver_host="another-host", heartbeat=time.time() - 120, notebook_path="/elsewhere/lost.ipynb")

    _job(store, "new")  # registered, never run
    return store


def test_every_method_is_authenticated(jp_serverapp):
    for handler in (JobsHandler, JobHandler, EventsHandler, StopHandler, NotFoundHandler):
        assert jp_serverapp.web_app._check_handler_auth("tfos", handler) == [], handler


def test_the_list_shows_every_job_newest_first_with_its_progress(store, api):
    status, body = api("jobs")
    assert status == 200
    jobs = body["jobs"]
    assert [j["name"] for j in jobs] == ["new", "lost", "failed", "finished"]
    by = {j["name"]: j for j in jobs}
    done = by["finished"]
    assert done == {
        "name": "finished", "state": "succeeded", "run": 1, "attempt": 1, "notebook_path": "work/ratings.ipynb",
        "cell_id": "cell-7", "workers": 2, "ps": 0, "epoch": 2, "epochs": 3, "step": 1200, "loss": 0.25,
        "rows_per_s": 3000.0, "gpu_util": 60.0, "latest_checkpoint": done["latest_checkpoint"],
        "started": 1000.0, "updated": done["updated"], "error": None, "stopped_early": None, "mlflow_link": None}
    assert done["latest_checkpoint"].endswith("ckpt-1200") and done["updated"] > 1000
    assert by["failed"]["state"] == "failed" and by["failed"]["attempt"] == 3
    assert by["failed"]["error"] == "Job 'failed' failed: ValueError: bad in the cell, line 3", "one line"
    assert by["lost"]["state"] == "interrupted", "a running job whose kernel died reads interrupted"
    # The notebook as the server names it (relative to its root), where the kernel's path allows.
    assert (by["failed"]["notebook_path"], by["lost"]["notebook_path"]) == ("failing.ipynb", "/elsewhere/lost.ipynb")
    new = by["new"]
    assert (new["state"], new["run"], new["step"], new["loss"], new["gpu_util"], new["notebook_path"]) == \
        ("registered", 0, None, None, None, None)


def test_the_detail_has_options_checkpoints_a_bounded_loss_curve_and_the_history(store, api):
    status, job = api("jobs", "finished")
    assert status == 200
    assert job["name"] == "finished" and job["loss"] == 0.25
    assert job["options"]["workers"] == 2 and job["options"]["label"] == "y"
    assert job["error_details"] is None
    assert job["checkpoints"] == [{"step": 1200, "epoch": 2, "path": job["latest_checkpoint"], "reason": "epoch",
                                   "time": 2002.0}]
    curve = job["loss_history"]
    assert 2 <= len(curve) <= 500
    assert curve[0] == {"step": 1, "loss": 1.0} and curve[-1] == {"step": 1200, "loss": 1.0 / 1200}
    assert [p["step"] for p in curve] == sorted(p["step"] for p in curve)
    assert job["history"] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "rows_per_s": 1500.0}]

    status, failed = api("jobs", "failed")
    assert status == 200 and failed["error_details"] == "Traceback ...\nValueError: bad"
    assert failed["loss_history"] == [] and failed["checkpoints"] == []


def test_the_list_follows_a_growing_job_and_a_restart(store, api):
    assert api("jobs", "finished")[1]["step"] == 1200
    store.append_events("finished", _steps(1201, 1210))
    assert api("jobs", "finished")[1]["step"] == 1210, "appended lines are folded in"
    store.forget_metrics("finished")  # --restart: a new metrics.jsonl from step 1
    store.append_events("finished", _steps(1, 3, loss0=2.0))
    job = api("jobs", "finished")[1]
    assert (job["step"], job["loss"], job["history"], job["checkpoints"]) == (3, 2.0 / 3, [], [])
    assert [p["step"] for p in job["loss_history"]] == [1, 2, 3]


def test_events_are_read_by_byte_offset(store, api):
    path = store.metrics_path("failed")
    store.append_events("failed", _steps(1, 3))
    status, first = api("jobs", "failed", "events", offset="0")
    assert status == 200 and [e["step"] for e in first["events"]] == [1, 2, 3]
    assert first["offset"] == path.stat().st_size

    store.append_events("failed", _steps(4, 5))
    with open(path, "a") as f:
        f.write('{"v": 1, "kind": "step", "step": 6')  # a line still being written
    second = api("jobs", "failed", "events", offset=str(first["offset"]))[1]
    assert [e["step"] for e in second["events"]] == [4, 5], "only the new whole lines"
    assert first["offset"] < second["offset"] < path.stat().st_size

    with open(path, "a") as f:
        f.write(', "worker": 0}\n')
    third = api("jobs", "failed", "events", offset=str(second["offset"]))[1]
    assert [e["step"] for e in third["events"]] == [6] and third["offset"] == path.stat().st_size
    assert api("jobs", "failed", "events", offset=str(third["offset"]))[1] == {"events": [],
                                                                              "offset": third["offset"]}
    assert api("jobs", "new", "events")[1] == {"events": [], "offset": 0}, "no metrics yet"
    for bad in ("x", "-1", "+5", " 5", "5 ", "\u0665", "1_0", "1e3", "9" * 30):  # ASCII decimal digits only
        status, body = api("jobs", "failed", "events", offset=bad)
        assert status == 400 and "offset" in body["message"], bad

    bounded = store.read_events("failed", 0, max_bytes=10)  # one answer's bound cuts at a whole line
    assert [e["step"] for e in bounded.events] == [1] and bounded.offset == len(path.read_bytes().split(b"\n")[0]) + 1


def test_stop_writes_the_request_for_a_running_job_and_refuses_others(store, api):
    store.write_state("new", state="running", run=1, attempt=1, started=time.time(), driver_pid=os.getpid(),
                      driver_host=socket.gethostname(), heartbeat=time.time())
    status, body = api("jobs", "new", "stop", method="POST")
    assert (status, body) == (202, {"state": "running"})
    assert store.stop_requested("new"), "the running kernel polls this file"

    for name, state in (("finished", "succeeded"), ("lost", "interrupted")):
        status, body = api("jobs", name, "stop", method="POST")
        assert status == 409 and f"not running (state: {state})" in body["message"], body
        assert not store.stop_requested(name)
    assert "%tfos_resume lost" in api("jobs", "lost", "stop", method="POST")[1]["message"]


def test_a_stop_never_writes_through_a_link_planted_in_the_job(store, api, tmp_path):
    store.write_state("new", state="running", run=1, attempt=1, started=time.time(), driver_pid=os.getpid(),
                      driver_host=socket.gethostname(), heartbeat=time.time())
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    store.stop_request_path("new").symlink_to(victim)
    assert api("jobs", "new", "stop", method="POST")[0] == 202
    assert victim.read_text() == "keep me"
    assert not store.stop_request_path("new").is_symlink() and store.stop_requested("new")


def test_answers_are_strict_json_even_for_non_finite_values(store, raw):
    path = store.job_dir("finished") / "state.json"
    path.write_text(path.read_text().replace('"started": 1000.0', '"started": NaN'))
    store.append_events("finished", [{"v": 1, "kind": "step", "worker": 0, "step": 1201,
                                      "metrics": {"loss": float("inf"), "rows_per_s": 1e308}}])
    for path in ("tfos/api/jobs", "tfos/api/jobs/finished", "tfos/api/jobs/finished/events?offset=0"):
        status, body = raw(path)
        assert status == 200, path
        json.loads(body, parse_constant=_refuse)  # as a browser's JSON.parse reads it
    job = json.loads(raw("tfos/api/jobs/finished")[1])
    assert (job["started"], job["loss"], job["rows_per_s"]) == (None, None, None)


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is no JSON")


def test_unknown_jobs_and_endpoints_are_json_404s(store, api):
    for parts in (("jobs", "nope"), ("jobs", "nope", "events"), ("nothing", "here")):
        status, body = api(*parts)
        assert status == 404 and body["message"], parts
    assert api("jobs", "nope", "stop", method="POST")[0] == 404
    _job(store, "broken")
    store.job_dir("broken").joinpath("spec.json").write_text("{")  # edited by hand
    status, body = api("jobs")
    assert status == 200 and len(body["jobs"]) == 5, "the other jobs are listed"
    broken = next(j for j in body["jobs"] if j["name"] == "broken")
    assert broken["state"] == "unknown" and "cannot read job 'broken'" in broken["error"], broken
    status, detail = api("jobs", "broken")
    assert status == 200 and detail["state"] == "unknown" and detail["history"] == [], detail


def test_requests_without_the_token_are_refused(store, api):
    for headers in ({"Authorization": ""}, {"Authorization": "token wrong"},
                    {"Authorization": "", "Cookie": "_xsrf=abc", "X-XSRFToken": "abc"}):
        assert api("jobs", headers=headers)[0] == 403
        assert api("jobs", "finished", headers=headers)[0] == 403
        assert api("jobs", "finished", "events", headers=headers)[0] == 403
    store.write_state("new", state="running", run=1, attempt=1, driver_pid=os.getpid(),
                      driver_host=socket.gethostname(), heartbeat=time.time())
    assert api("jobs", "new", "stop", method="POST", headers={"Authorization": ""})[0] == 403
    assert not store.stop_requested("new"), "a refused stop writes nothing"


def test_names_and_links_that_lead_out_of_the_store_are_refused(store, raw, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = "TOP-SECRET-LINE"
    (outside / "spec.json").write_text(json.dumps({"name": "escape"}))
    (outside / "metrics.jsonl").write_text(json.dumps({"kind": "log", "text": secret}) + "\n")
    (outside / "state.json").write_text(json.dumps({"state": "running", "heartbeat": time.time(),
                                                    "error": secret}))
    (store.jobs_dir / "escape").symlink_to(outside, target_is_directory=True)
    # A real job directory whose metrics file is a link out of the store.
    store.metrics_path("new").symlink_to(outside / "metrics.jsonl")

    bodies = []
    for path, method, want in [
        ("tfos/api/jobs/..", "GET", 400),
        ("tfos/api/jobs/%2E%2E", "GET", 400),
        ("tfos/api/jobs/..%2F..%2Foutside", "GET", 400),
        ("tfos/api/jobs/%2Fetc%2Fpasswd", "GET", 400),
        ("tfos/api/jobs/finished%2F..%2F..%2Foutside/events", "GET", 400),
        ("tfos/api/jobs/a%2Fb/stop", "POST", 400),
        ("tfos/api/jobs//etc/passwd", "GET", 404),
        ("tfos/api/jobs/escape", "GET", 404),
        ("tfos/api/jobs/escape/events?offset=0", "GET", 404),
        ("tfos/api/jobs/escape/stop", "POST", 404),
        ("tfos/api/jobs/new/events?offset=0", "GET", 404),
    ]:
        status, body = raw(path, method)
        assert status == want, (path, status, body)
        assert json.loads(body)["message"], path
        bodies.append(body)
    status, body = raw("tfos/api/jobs")
    assert status == 200 and "escape" not in [j["name"] for j in json.loads(body)["jobs"]]
    bodies.append(body)
    assert not any(secret.encode() in b for b in bodies), "nothing from outside the store was served"
    assert not (outside / "stop-request").exists()


def test_the_wheel_enables_the_extension():
    config = json.loads((ROOT / "jupyter-config/jupyter_server_config.d/tfos_magic.json").read_text())
    assert config == {"ServerApp": {"jpserver_extensions": {"tfos_magic": True}}}
    shared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"][
        "shared-data"]
    assert shared["jupyter-config/jupyter_server_config.d"] == "etc/jupyter/jupyter_server_config.d"


ETL = "%%spark_etl live\nspark.range(200000).selectExpr('rand(1) as a', 'rand(2) as y')"
TRAIN = ("%%tf_train live --workers 1 --epochs 1000 --batch-size 64 --label y --background\n"
         "import tensorflow as tf\n"
         "def build_model():\n"
         "    m = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])\n"
         "    m.compile(optimizer='sgd', loss='mse')\n"
         "    return m\n")


class _Kernel:
    """What ipykernel answers for the running cell's request (its metadata holds the id
    JupyterLab gives the cell); the shell here is a plain IPython one, with no kernel."""

    @staticmethod
    def get_parent() -> dict:
        return {"header": {"msg_type": "execute_request"}, "metadata": {"cellId": "cell-live"}}


@pytest.mark.e2e
def test_a_stop_through_the_api_is_honoured_by_a_real_running_job(shell, tfos_home, api, jp_root_dir, monkeypatch):
    from tfos_magic import api as job_api
    from tfos_magic import get_job

    monkeypatch.setenv("JPY_SESSION_NAME", str(jp_root_dir / "work" / "live.ipynb"))  # as the server sets it
    monkeypatch.setattr(shell, "kernel", _Kernel(), raising=False)
    _, err = run(shell, ETL)
    assert err is None, err
    _, err = run(shell, TRAIN)
    assert err is None, err
    try:
        deadline = time.time() + 150
        while api("jobs", "live")[1]["step"] is None:
            assert time.time() < deadline, f"training never started: {get_job('live').events[-5:]}"
            time.sleep(0.5)
        job = api("jobs", "live")[1]
        assert (job["state"], job["notebook_path"], job["cell_id"]) == ("running", "work/live.ipynb", "cell-live")

        t0 = time.time()
        status, body = api("jobs", "live", "stop", method="POST")
        assert (status, body) == (202, {"state": "running"})
        _, err = run(shell, "import time\n_t = time.time()\nwhile time.time() - _t < 3:\n    pass")
        assert err is None, "the notebook's kernel was busy with another cell meanwhile"
        while (state := api("jobs", "live")[1]["state"]) == "running":
            assert time.time() - t0 < 15, "the job was still running 15 s after the stop request"
            time.sleep(0.2)
        assert state == "stopped"
        assert any(e["kind"] == "checkpoint" and e.get("reason") == "stop" for e in get_job("live").events), \
            "the workers checkpoint before they stop"
        assert api("jobs", "live", "stop", method="POST")[0] == 409
    finally:
        if get_job("live").state == "running":  # leave no job behind for the next test
            job_api.stop("live", JobStore(tfos_home), wait=30)
        for thread in threading.enumerate():
            if thread.name == "tfos-live":
                thread.join(30)
