"""The executor-to-driver metrics channel over real loopback sockets."""

import json
import socket
import time

from tfos_magic.monitor import ChannelClient, DriverChannel, make_event


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
