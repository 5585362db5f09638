"""Which task may take a Python worker's spare TF process, the hand-over a spare answers,
and what is left of one a task may not take (fast: small processes stand in for spares).
The real spares: test_processes.py."""

import dataclasses
import json
import subprocess
import sys

import pytest

from tfos_magic.protocol.feed_spec import ColumnSpec, FeedSpec
from tfos_magic.protocol.options import TrainOptions
from tfos_magic.protocol.plan import TaskPlan
from tfos_magic.task import spares


def _plan(**options) -> TaskPlan:
    return TaskPlan(job="j", run=1, channel_address="127.0.0.1:1", host=None, train_source="",
                    feed=FeedSpec([ColumnSpec("a", "float32")], None, "matrix"), options=TrainOptions(**options),
                    checkpoint_dir="/tmp/ck", spare_token="t")


# A stand-in for a spare: it answers a hand-over as one does and keeps the line it got.
TAKES = ("import sys; line = sys.stdin.buffer.readline(); sys.stdout.buffer.write(b'tfos: spare taken\\n'); "
         "sys.stdout.flush(); open(sys.argv[1], 'wb').write(line); sys.stdin.read()")


@pytest.fixture
def spare(tmp_path):
    """A process standing in for a spare of /usr/bin/python3, installed as this worker's."""
    process = subprocess.Popen([sys.executable, "-c", TAKES, str(tmp_path / "got")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    process.got = tmp_path / "got"
    spares._spare = spares.Spare(process, "/usr/bin/python3")
    yield process
    spares.end()
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_task_of_the_same_python_takes_the_spare_once_and_it_answers(spare):
    assert spares.take(_plan(), "/usr/bin/python3", gpus=False) is spare
    assert spares.take(_plan(), "/usr/bin/python3", gpus=False) is None, "one task only"
    assert spare.poll() is None, "the task that took it owns it now"
    assert spares.hand_over(spare, "/w/config.json", 30.0, "/w/tf.log", {"TFOS_CHANNEL_TOKEN": "s"})
    spare.stdin.close()
    spare.wait(timeout=10)
    assert json.loads(spare.got.read_text()) == {"config": "/w/config.json", "wait": 30.0, "log": "/w/tf.log",
                                                 "env": {"TFOS_CHANNEL_TOKEN": "s"}}


@pytest.mark.parametrize("how", ["ended", "silent"])
def test_a_spare_that_ends_or_does_not_answer_is_not_the_tasks(how):
    """A spare retired or idle at the moment a task takes it ends instead of answering; one
    that never answers is ended: either way the task starts a fresh process."""
    cmd = ["true"] if how == "ended" else ["sleep", "60"]
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if how == "ended":
        process.wait()
    assert not spares.hand_over(process, "/w/config.json", 30.0, "/w/tf.log", {}, within_s=1.0)
    assert process.wait(timeout=10) is not None


@pytest.mark.parametrize("why", ["another python", "gpus", "spares off"])
def test_a_spare_a_task_may_not_take_is_ended(spare, why):
    plan = _plan(warm_start=0) if why == "spares off" else _plan()
    python = "/other/bin/python" if why == "another python" else "/usr/bin/python3"
    assert spares.take(plan, python, gpus=why == "gpus") is None
    assert spare.wait(timeout=10) is not None, "it would only have waited out its idle time"
    assert spares._spare is None


def test_a_spare_that_ended_is_not_taken(spare):
    spare.kill()
    spare.wait()
    assert spares.take(_plan(), "/usr/bin/python3", gpus=False) is None


def test_no_spare_is_started_without_a_token_or_with_spares_off(monkeypatch):
    started = []
    monkeypatch.setattr(spares.subprocess, "Popen", lambda *a, **k: started.append(a) or None)
    spares.start(dataclasses.replace(_plan(), spare_token=""), "/usr/bin/python3", {}, lambda: None)
    spares.start(_plan(warm_start=0), "/usr/bin/python3", {}, lambda: None)
    assert started == [] and spares._spare is None
