"""The executor-to-driver metrics channel over real loopback sockets."""

import json
import re
import socket
import threading
import time

import psutil
import pytest

from tfos_magic.driver.channel import DriverChannel
from tfos_magic.protocol.channel import ChannelClient
from tfos_magic.protocol.events import make_event
from tfos_magic.protocol.net import free_port


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
    client = ChannelClient(f"127.0.0.1:{free_port()}", "j", "t", timeout=2)
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


def test_hundreds_of_workers_connecting_at_once_all_get_through():
    """A job's TF processes all open their channel in the same moment. With a listen
    backlog of 5 dozens of 300 such connections timed out here (each waits 2 s for the
    hello's answer, no retry); every one must get through, and every event reach the sink."""
    channel = DriverChannel(bind_host="127.0.0.1")
    got = []
    token = channel.register("job1", got.append)
    count = 300
    start = threading.Barrier(count)
    clients: list[ChannelClient | None] = [None] * count

    def worker(i: int) -> None:
        start.wait(timeout=30)
        clients[i] = client = ChannelClient(f"127.0.0.1:{channel.port}", "job1", token, timeout=2)
        client.send(make_event("step", i, step=1))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        failed = [i for i, c in enumerate(clients) if c is None or not c.connected]
        assert failed == [], f"{len(failed)} of {count} did not connect, e.g. {clients[failed[0]].error}"
        assert _wait_for(lambda: len(got) >= count)
        assert sorted(e["worker"] for e in got) == list(range(count))
    finally:
        for c in clients:
            if c is not None:
                c.close()
        channel.close()


def _answer_hellos(port: int, delay: float, answers: list[bytes | None]) -> threading.Thread:
    """A notebook that starts listening on `port` only after `delay` seconds, then answers
    each connection's hello with the next of `answers` (None: closes without a word)."""
    def serve() -> None:
        time.sleep(delay)
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(10)
            for answer in answers:
                conn, _ = server.accept()
                with conn:
                    conn.makefile("rb").readline()
                    if answer is not None:
                        conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_worker_started_before_the_notebook_listens_connects_once_it_does():
    port = free_port()
    server = _answer_hellos(port, delay=0.5, answers=[b'{"ok": true}\n'])
    started = time.monotonic()
    client = ChannelClient(f"127.0.0.1:{port}", "j", "t", timeout=2, connect_within=10)
    assert client.connected, client.error
    assert 0.4 < time.monotonic() - started < 5
    client.close()
    server.join(timeout=10)


def test_a_connection_closed_before_the_answer_is_tried_again():
    """An overloaded notebook may drop a connection after accepting it: that is no refusal."""
    port = free_port()
    server = _answer_hellos(port, delay=0, answers=[None, None, b'{"ok": true}\n'])
    client = ChannelClient(f"127.0.0.1:{port}", "j", "t", timeout=2, connect_within=10)
    assert client.connected, client.error
    client.close()
    server.join(timeout=10)


def test_a_refusal_is_final_and_comes_at_once():
    """A bad token cannot get better: no retries, however long `connect_within`."""
    channel = DriverChannel(bind_host="127.0.0.1")
    channel.register("job1", lambda event: None)
    try:
        started = time.monotonic()
        client = ChannelClient(f"127.0.0.1:{channel.port}", "job1", "not-the-token", timeout=5, connect_within=10)
        assert time.monotonic() - started < 1.0
        assert not client.connected and "refused" in client.error
    finally:
        channel.close()


def test_giving_up_names_the_address_how_long_and_the_last_error():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    client = ChannelClient(address, "j", "t", timeout=2, connect_within=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    assert not client.connected
    assert address in client.error and "ConnectionRefusedError" in client.error
    assert re.search(r"tried for \d+\.\ds \(\d+ tries\)", client.error), client.error


def _listening_ips(port: int) -> set[str]:
    """The addresses this process listens on at `port`, as the operating system has them."""
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_the_channel_listens_on_its_bind_address_only():
    """The default is loopback: never every interface. 127.0.0.2 is another address of
    this machine (all of 127/8 is, on Linux) that a 0.0.0.0 server would answer on."""
    channel = DriverChannel.get("127.0.0.1")
    assert DriverChannel.get("127.0.0.1") is channel and DriverChannel.get() is channel
    assert _listening_ips(channel.port) == {"127.0.0.1"}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", channel.port), timeout=2).close()


def test_a_bind_address_not_of_this_machine_is_named():
    with pytest.raises(OSError, match=re.escape("192.0.2.1")):
        DriverChannel(bind_host="192.0.2.1")  # TEST-NET-1: never a local address
