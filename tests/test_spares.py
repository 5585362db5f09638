"""Which task may take a Python worker's spare TF process, and what is left of one it may
not (fast: a `cat` stands in for the spare). The real spares: test_processes.py."""

import dataclasses
import json
import subprocess

import pytest

from tfos_magic.protocol.feed_spec import ColumnSpec, FeedSpec
from tfos_magic.protocol.options import TrainOptions
from tfos_magic.protocol.plan import TaskPlan
from tfos_magic.task import spares


def _plan(**options) -> TaskPlan:
    return TaskPlan(job="j", run=1, channel_address="127.0.0.1:1", host=None, train_source="",
                    feed=FeedSpec([ColumnSpec("a", "float32")], None, "matrix"), options=TrainOptions(**options),
                    checkpoint_dir="/tmp/ck", spare_token="t")


@pytest.fixture
def spare():
    """A process standing in for a spare of /usr/bin/python3, installed as this worker's."""
    process = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    spares._spare = spares.Spare(process, "/usr/bin/python3")
    yield process
    spares.end()
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_task_of_the_same_python_takes_the_spare_once(spare):
    assert spares.take(_plan(), "/usr/bin/python3", gpus=False) is spare
    assert spares.take(_plan(), "/usr/bin/python3", gpus=False) is None, "one task only"
    assert spare.poll() is None, "the task that took it owns it now"
    assert spares.hand_over(spare, "/w/config.json", 30.0, "/w/tf.log", {"TFOS_CHANNEL_TOKEN": "s"})
    spare.stdin.close()
    assert json.loads(spare.stdout.readline()) == {"config": "/w/config.json", "wait": 30.0, "log": "/w/tf.log",
                                                   "env": {"TFOS_CHANNEL_TOKEN": "s"}}


@pytest.mark.parametrize("why", ["another python", "gpus", "spares off"])
def test_a_spare_a_task_may_not_take_is_ended(spare, why):
    plan = _plan(warm_start=0) if why == "spares off" else _plan()
    python = "/other/bin/python" if why == "another python" else "/usr/bin/python3"
    assert spares.take(plan, python, gpus=why == "gpus") is None
    assert spare.wait(timeout=10) is not None, "it would only have waited out its idle time"
    assert spares._spare is None


def test_a_spare_that_ended_is_not_handed_a_task(spare):
    spare.kill()
    spare.wait()
    assert spares.take(_plan(), "/usr/bin/python3", gpus=False) is None
    dead = subprocess.Popen(["true"], stdin=subprocess.PIPE)
    dead.wait()
    assert not spares.hand_over(dead, "/w/config.json", 30.0, "/w/tf.log", {}), "the task starts a fresh one"


def test_no_spare_is_started_without_a_token_or_with_spares_off(monkeypatch):
    started = []
    monkeypatch.setattr(spares.subprocess, "Popen", lambda *a, **k: started.append(a) or None)
    spares.start(dataclasses.replace(_plan(), spare_token=""), "/usr/bin/python3", {}, lambda: None)
    spares.start(_plan(warm_start=0), "/usr/bin/python3", {}, lambda: None)
    assert started == [] and spares._spare is None
