"""The executor-to-driver metrics channel over real loopback sockets."""

import json
import socket
import time

from tfos_magic.driver.channel import DriverChannel
from tfos_magic.protocol.channel import ChannelClient
from tfos_magic.protocol.events import make_event


def _wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_events_reach_the_sink_with_the_right_token():
    channel = DriverChannel(bind_host="127.0.0.1")
    got = []
    token = channel.register("job1", got.append)
    client = ChannelClient(f"127.0.0.1:{channel.port}", "job1", token)
    assert client.connected
    client.send(make_event("step", 0, step=3, metrics={"loss": float("nan"), "acc": 0.5}))
    assert _wait_for(lambda: got)
    assert got[0]["kind"] == "step" and got[0]["metrics"] == {"loss": None, "acc": 0.5}
    client.close()
    channel.close()


def test_wrong_or_missing_token_is_refused():
    channel = DriverChannel(bind_host="127.0.0.1")
    got = []
    channel.register("job1", got.append)
    bad = ChannelClient(f"127.0.0.1:{channel.port}", "job1", "not-the-token", timeout=5)
    assert not bad.connected
    bad.send(make_event("step", 0, step=1))  # dropped, and does not raise
    with socket.create_connection(("127.0.0.1", channel.port), timeout=5) as s:
        s.sendall(b'{"v": 1, "job": "job1"}\n{"v": 1, "kind": "step"}\n')
        reply = json.loads(s.makefile().readline())
    assert reply["ok"] is False
    time.sleep(0.2)
    assert got == []
    channel.close()


def test_unreachable_driver_does_not_stop_the_worker():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChannelClient(f"127.0.0.1:{port}", "j", "t", timeout=2)
    assert not client.connected
    client.send(make_event("epoch", 0, epoch=1))


def test_closing_the_attempt_fences_its_process_with_a_quiet_result(tmp_path):
    """A TF process of an ended attempt exits at once, and its task does not report an error."""
    import subprocess
    import sys

    import pytest

    from tfos_magic.protocol.plan import TaskConfig
    from tfos_magic.task.feeder import WorkerFailed, _result

    channel = DriverChannel(bind_host="127.0.0.1")
    token = channel.register("job1", lambda event: None)
    config = TaskConfig(plan=None, role="ps", index=0, num_workers=1, bind_host="127.0.0.1", workdir=str(tmp_path))
    result_path = tmp_path / "result.json"
    assert config.result_path == str(result_path)
    child = subprocess.Popen([sys.executable, "-c", f"""
import time
from tfos_magic.protocol.channel import ChannelClient
from tfos_magic.tfprocess.child import _fenced
client = ChannelClient("127.0.0.1:{channel.port}", "job1", "{token}", on_close=lambda: _fenced({str(result_path)!r}))
assert client.connected
print("connected", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "connected"
        channel.unregister("job1")
        assert child.wait(timeout=10) == 75
    finally:
        child.kill()
        channel.close()
    assert json.loads(result_path.read_text())["status"] == "fenced"
    with pytest.raises(WorkerFailed) as failed:
        _result(config, 75)
    assert failed.value.reported and not failed.value.retryable


def test_control_lines_reach_listeners_only():
    """A stop reaches the TF processes (listeners); a requesting client's answers stay clean."""
    channel = DriverChannel(bind_host="127.0.0.1")
    token = channel.register("job1", lambda e: None, lambda msg: {"ok": True, "echo": msg["op"]})
    heard = []
    listener = ChannelClient(f"127.0.0.1:{channel.port}", "job1", token, on_control=heard.append)
    asker = ChannelClient(f"127.0.0.1:{channel.port}", "job1", token)
    assert listener.connected and asker.connected
    assert _wait_for(lambda: channel.control("job1", {"control": "stop"}) == 1)
    assert _wait_for(lambda: heard == [{"control": "stop"}])
    assert asker.request({"op": "ping"}) == {"ok": True, "echo": "ping"}
    try:
        listener.request({"op": "ping"})
        raise AssertionError("a listening client must refuse requests")
    except RuntimeError:
        pass
    assert channel.control("other-job", {"control": "stop"}) == 0
    listener.close()
    asker.close()
    channel.close()


def test_task_config_holds_no_secret_and_only_its_owner_reads_it(tmp_path):
    import os
    import stat

    from tfos_magic.protocol.feed_spec import FeedSpec
    from tfos_magic.protocol.options import TrainOptions
    from tfos_magic.protocol.plan import RegistryPlan, TaskConfig, TaskPlan

    plan = TaskPlan(job="j", run=1, channel_address="127.0.0.1:1", host=None, train_source="", feed=FeedSpec([], None, "matrix"),
                    options=TrainOptions(zk_auth="u:pw-secret"), checkpoint_dir=str(tmp_path),
                    registry=RegistryPlan("zookeeper", "zk:2181", "u:pw-secret"), token="tok-secret")
    config = TaskConfig(plan, "worker", 0, 1, "127.0.0.1", str(tmp_path))
    path = config.write()
    text = open(path).read()
    assert "tok-secret" not in text and "pw-secret" not in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = TaskConfig.read(path, env=config.secret_env())
    assert back.plan.token == "tok-secret" and back.plan.registry.auth == "u:pw-secret"
