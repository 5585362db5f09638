"""The executor-to-driver metrics channel over real loopback sockets."""

import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import psutil
import pytest

import tfos_magic.driver.channel as server_module  # its limits, which tests shrink
from tfos_magic.driver.channel import DriverChannel
from tfos_magic.protocol.channel import ChannelClient, encode, hello
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
from tfos_magic.training.child import _fenced
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


# --- bounds on what a client may hold on the notebook (issue 19, item 13) ---------------

@pytest.fixture
def notebook():
    """A channel with `job1` registered; its events land in `.got`."""
    channel = DriverChannel(bind_host="127.0.0.1")
    got: list[dict] = []
    token = channel.register("job1", got.append)
    yield SimpleNamespace(channel=channel, got=got, token=token, address=f"127.0.0.1:{channel.port}")
    channel.close()


def _authenticated(channel: DriverChannel, job: str, token: str, listen: bool = False) -> socket.socket:
    """A raw connection past the hello, to send what no ChannelClient would."""
    sock = socket.create_connection(("127.0.0.1", channel.port), timeout=5)
    sock.sendall(encode(hello(job, token, listen)))
    assert _read_line(sock) == b'{"ok": true}\n'
    return sock


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def _closed_by_server_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the notebook ends the connection within `seconds` (what it says first is read and ignored)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def _send_quietly(sock: socket.socket, data: bytes, pause: float = 0.0) -> threading.Thread:
    """Send `data` from a thread, a byte every `pause` seconds if one is given; errors end it."""
    def send() -> None:
        try:
            if pause:
                for byte in data:
                    sock.sendall(bytes([byte]))
                    time.sleep(pause)
            else:
                sock.sendall(data)
        except OSError:
            pass

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_a_hello_that_trickles_in_ends_at_its_deadline(monkeypatch, notebook):
    """A byte every 0.2 s never trips a per-receive timeout of 1 s; the deadline is for the whole hello."""
    monkeypatch.setattr(server_module, "HELLO_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", notebook.channel.port), timeout=5) as sock:
        started = time.monotonic()
        _send_quietly(sock, encode(hello("job1", notebook.token)), pause=0.2)
        assert _closed_by_server_within(sock, 4.0)
        assert 0.8 < time.monotonic() - started < 3.0


def test_connections_over_the_cap_are_closed_at_once(monkeypatch):
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 3, raising=False)
    channel = DriverChannel(bind_host="127.0.0.1")
    token = channel.register("job1", lambda event: None)
    address = f"127.0.0.1:{channel.port}"
    clients = [ChannelClient(address, "job1", token, timeout=2) for _ in range(3)]
    try:
        assert all(c.connected for c in clients)
        with socket.create_connection(("127.0.0.1", channel.port), timeout=5) as extra:
            started = time.monotonic()
            assert _closed_by_server_within(extra, 3.0)
            assert time.monotonic() - started < 1.0
        clients.pop().close()  # a slot comes free once its connection has ended
        clients.append(ChannelClient(address, "job1", token, timeout=2, connect_within=5))
        assert clients[-1].connected, clients[-1].error
    finally:
        for c in clients:
            c.close()
        channel.close()


def test_a_line_over_the_limit_closes_the_connection_and_is_never_buffered_whole(notebook):
    from tfos_magic.protocol.channel import MAX_LINE_BYTES

    big = "x" * (MAX_LINE_BYTES - 1000)  # under the limit: arrives
    with _authenticated(notebook.channel, "job1", notebook.token) as sock:
        sock.sendall(encode(make_event("log", 0, text=big)))
        assert _wait_for(lambda: notebook.got)
        _send_quietly(sock, b'{"v": 1, "kind": "log", "text": "' + b"z" * (3 * MAX_LINE_BYTES))
        assert _closed_by_server_within(sock, 5.0)
    assert [e["text"] for e in notebook.got] == [big]


def test_a_client_does_not_send_an_event_over_the_limit_and_its_channel_lives(notebook):
    from tfos_magic.protocol.channel import MAX_LINE_BYTES

    client = ChannelClient(notebook.address, "job1", notebook.token)
    try:
        assert client.send(make_event("log", 0, text="x" * MAX_LINE_BYTES)) is False
        assert client.send(make_event("log", 0, text="after")) is True
        assert _wait_for(lambda: notebook.got) and [e["text"] for e in notebook.got] == ["after"]
    finally:
        client.close()


def test_a_request_connection_idles_out_and_its_client_reconnects_but_a_listener_stays(monkeypatch):
    """TF processes listen and may be silent for a whole run (a parameter server); connections
    that only send or ask are closed when idle, and a requesting client opens a new one."""
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_S", 0.5, raising=False)
    channel = DriverChannel(bind_host="127.0.0.1")
    token = channel.register("job1", lambda event: None, lambda msg: {"ok": True, "echo": msg["op"]})
    heard = []
    listener = ChannelClient(f"127.0.0.1:{channel.port}", "job1", token, on_control=heard.append)
    asker = ChannelClient(f"127.0.0.1:{channel.port}", "job1", token)
    try:
        with _authenticated(channel, "job1", token) as idle:
            assert _closed_by_server_within(idle, 3.0)
        time.sleep(1.0)  # the listener and the asker have been idle for longer than the timeout
        assert channel.control("job1", {"control": "stop"}) == 1
        assert _wait_for(lambda: heard == [{"control": "stop"}])
        assert asker.request({"op": "ping"}) == {"ok": True, "echo": "ping"}
    finally:
        listener.close()
        asker.close()
        channel.close()


def test_a_token_of_any_type_or_characters_is_refused_with_an_answer(notebook):
    """hmac.compare_digest raises TypeError on non-ASCII str: the hello must still get its refusal."""
    for token in ["é" * 32, "\ud800", 12345, None, ["a"]]:
        with socket.create_connection(("127.0.0.1", notebook.channel.port), timeout=5) as sock:
            sock.sendall(encode(hello("job1", token)))
            reply = _read_line(sock)
            assert reply and json.loads(reply)["ok"] is False, (token, reply)


def test_lines_that_are_not_json_are_skipped_and_the_connection_lives(notebook):
    with _authenticated(notebook.channel, "job1", notebook.token) as sock:
        sock.sendall(b"\xff\xfe not utf-8\n" + b"not json\n" + b"[" * 200_000 + b"\n" + b"[1, 2]\n"
                     + encode(make_event("step", 0, step=7)))
        assert _wait_for(lambda: notebook.got, timeout=5)
    assert [e["step"] for e in notebook.got] == [7]


# --- a send that fails must not silence a TF process (issue 19, item 6) -----------------

class _SlowThenGoodNotebook:
    """A notebook whose first connection stops reading after the hello (a kernel too busy
    to read), and whose later connections read every line."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stuck: socket.socket | None = None
        self.lines: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.server.settimeout(20)
        self.stuck, _ = self.server.accept()
        _read_line(self.stuck)
        self.stuck.sendall(b'{"ok": true}\n')
        conn, _ = self.server.accept()
        _read_line(conn)
        conn.sendall(b'{"ok": true}\n')
        with conn.makefile("rb") as lines:
            for line in lines:
                self.lines.append(line)

    def stuck_closed_by_client(self) -> bool:
        """Drain what the first connection holds: its end shows the client closed it."""
        return self.stuck is not None and _closed_by_server_within(self.stuck, 5.0)


def _fill_until_a_send_fails(client: ChannelClient, seconds: float = 10.0) -> threading.Thread:
    """Large events from a thread until one fails (its send timed out) or `seconds` pass."""
    def fill() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and client.send(make_event("log", 0, text="x" * 500_000, block=True)):
            pass

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


def test_a_send_that_times_out_closes_its_connection_and_later_events_go_through_a_new_one():
    notebook = _SlowThenGoodNotebook()
    client = ChannelClient(f"127.0.0.1:{notebook.port}", "j", "t", timeout=0.5, connect_within=5)
    assert client.connected
    _fill_until_a_send_fails(client).join(timeout=15)

    def marker_arrived() -> bool:
        client.send(make_event("log", 0, text="marker"))
        return any(b'"marker"' in line for line in notebook.lines)

    assert _wait_for(marker_arrived, timeout=10), "events after a failed send never reached the notebook"
    assert notebook.stuck_closed_by_client()
    client.close()


def test_a_listener_whose_own_send_timed_out_reconnects_and_the_notebook_can_still_fence_it():
    """Its own failed send is no fence: it reconnects, hears control lines, and its events
    arrive. The notebook closing the new connection is a fence: on_close runs."""
    channel = DriverChannel(bind_host="127.0.0.1")
    gate, got = threading.Event(), []

    def sink(event: dict) -> None:
        if event.get("block"):
            gate.wait(30)  # the kernel is busy: this connection's events pile up unread
        else:
            got.append(event)

    token = channel.register("job1", sink)
    fenced, heard = threading.Event(), []
    client = ChannelClient(f"127.0.0.1:{channel.port}", "job1", token, timeout=0.5, connect_within=5,
                           on_close=fenced.set, on_control=heard.append)
    try:
        assert client.connected
        _fill_until_a_send_fails(client).join(timeout=15)

        def marker_arrived() -> bool:
            client.send(make_event("log", 0, text="marker"))
            return any(e.get("text") == "marker" for e in got)

        assert _wait_for(marker_arrived, timeout=10), "events after a failed send never reached the notebook"
        assert not fenced.is_set()
        assert _wait_for(lambda: channel.control("job1", {"control": "stop"}) >= 1)
        assert _wait_for(lambda: {"control": "stop"} in heard)
        channel.unregister("job1")
        assert fenced.wait(5), "the notebook closed the connection, but on_close never ran"
    finally:
        gate.set()
        client.close()
        channel.close()


def test_a_cell_that_prints_a_lot_sends_a_few_lines_a_second_and_says_how_many_it_held_back(notebook):
    import io

    from tfos_magic.training.child import LOG_LINES_PER_S, _PrintsToNotebook

    client = ChannelClient(notebook.address, "job1", notebook.token)
    log_file = io.StringIO()
    out = _PrintsToNotebook(log_file, client, 0, "worker")
    try:
        for i in range(1000):
            print(f"line {i}", file=out)
        assert log_file.getvalue().splitlines() == [f"line {i}" for i in range(1000)]
        assert _wait_for(lambda: any("not shown" in e["text"] for e in notebook.got), timeout=5)
        texts = [e["text"] for e in notebook.got]
        shown = [t for t in texts if t.startswith("line ")]
        assert shown[:LOG_LINES_PER_S] == [f"line {i}" for i in range(LOG_LINES_PER_S)]
        assert len(shown) <= 2 * LOG_LINES_PER_S  # printing 1000 lines takes less than two seconds
        held_back = [re.fullmatch(r"\[\.\.\. (\d+) lines not shown; the full log is in the TF process's log\]", t)
                     for t in texts if not t.startswith("line ")]
        assert all(held_back) and len(shown) + sum(int(m.group(1)) for m in held_back) == 1000
    finally:
        client.close()
