"""Which addresses the sides use and advertise, and what a TF process says of a peer it
cannot reach, and the ports TF tasks hold from agreement to bind (fast: TensorFlow only in one
subprocess). The real thing, on hosts whose names resolve to
127.0.1.1, is in test_multihost.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tfos_magic.errors import TfosError
from tfos_magic.protocol.net import TF_REUSE_PORT_ENV, ReservedPort, free_port
from tfos_magic.training.peers import wait_reachable, watch_reachable


TF_SERVER = """
import sys, tensorflow as tf
tf.distribute.Server(tf.train.ClusterSpec({"worker": [sys.argv[1]]}), job_name="worker", task_index=0)
print("bound")
"""


@pytest.mark.e2e
def test_a_reserved_port_is_nobody_elses_until_the_tf_server_binds_it():
    """The agreed port of a TF task (a CI run once lost one to another process between the
    agreement and the bind: "Could not start gRPC server")."""
    with ReservedPort() as reserved:
        # On every address: TF binds 0.0.0.0, which a socket on any one address would fail.
        for address in ("127.0.0.1", "127.0.0.2", "0.0.0.0"):
            with socket.socket() as other, pytest.raises(OSError):
                other.bind((address, reserved.port))
        drawn = []
        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                drawn.append(s.getsockname()[1])
        assert reserved.port not in drawn
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **TF_REUSE_PORT_ENV)
        run = subprocess.run([sys.executable, "-c", TF_SERVER, f"127.0.0.1:{reserved.port}"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "bound" in run.stdout, run.stderr[-2000:]
    with socket.socket() as s:  # and it is free again once released
        s.bind(("127.0.0.1", reserved.port))


def test_a_peer_that_starts_listening_later_is_waited_for():
    port = free_port()
    server = socket.socket()

    def listen() -> None:
        server.bind(("127.0.0.1", port))
        server.listen()

    threading.Timer(0.6, listen).start()
    started = time.monotonic()
    try:
        wait_reachable({"ps 0": f"127.0.0.1:{port}"}, timeout=10, me="TF worker 1")
    finally:
        server.close()
    assert 0.5 < time.monotonic() - started < 5


def test_an_unreachable_peer_is_named_with_the_address_tried_and_why():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TfosError) as err:
        wait_reachable({"ps 0": f"127.0.1.1:{port}"}, timeout=1.0, me="TF worker 1 on 198.18.0.12 (tfos-h2)")
    assert 1.0 <= time.monotonic() - started < 4
    text = str(err.value)
    assert text.startswith(f"TF worker 1 on 198.18.0.12 (tfos-h2) cannot reach ps 0 at 127.0.1.1:{port} (")
    assert "within 1 s" in text and "loopback address" in text and "SPARK_LOCAL_IP" in text, text


def test_a_watched_peer_that_never_answers_calls_the_failure_once():
    failures: list[str] = []
    stop = watch_reachable({"worker 1": f"127.0.0.1:{free_port()}"}, 0.5, "TF worker 0", failures.append)
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    stop()
    assert len(failures) == 1 and "TF worker 0 cannot reach worker 1" in failures[0], failures


def test_local_mode_binds_everything_to_loopback(spark):
    from tfos_magic.driver.spark_backend import ClassicSpark

    addresses = ClassicSpark(spark).addresses()
    assert (addresses.advertise, addresses.bind, addresses.tasks) == ("127.0.0.1", "127.0.0.1", "127.0.0.1")


def test_a_session_made_for_a_cluster_does_not_send_executors_to_the_kernels_python(monkeypatch):
    import sys

    from tfos_magic.session import executor_python

    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    assert executor_python("local[2]", {}) == sys.executable
    assert executor_python("spark://master:7077", {}) is None  # the nodes' own python3
    assert executor_python("yarn", {"spark.pyspark.python": "./env/bin/python"}) == "./env/bin/python"
    monkeypatch.setenv("PYSPARK_PYTHON", "/opt/py/bin/python3")
    assert executor_python("spark://master:7077", {}) == "/opt/py/bin/python3"
