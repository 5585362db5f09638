"""The service registry: embedded (the notebook's channel) and a real ZooKeeper server."""

import threading
import time

import pytest
from conftest import free_port
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from tfos_magic.driver.channel import DriverChannel
from tfos_magic.driver.registry import EmbeddedRegistry, ZooKeeperView
from tfos_magic.protocol.registry import RegistryError
from tfos_magic.training.registry import EmbeddedRegistryClient, ZooKeeperRegistryClient

COUNTS = {"ps": 1, "worker": 2}


def _complete_cluster(make_client):
    """Three tasks register from three threads; each sees the whole cluster."""
    results, errors = {}, []
    all_looked = threading.Barrier(3, timeout=30)

    def task(role, index, port):
        try:
            client = make_client()
            client.register(role, index, f"127.0.0.1:{port}")
            results[(role, index)] = client.wait_cluster(COUNTS, timeout=20)
            all_looked.wait()  # stay registered (ZooKeeper nodes are ephemeral) until all have looked
            client.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=task, args=(r, i, 9000 + n)) for n, (r, i) in
               enumerate([("worker", 1), ("ps", 0), ("worker", 0)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    specs = list(results.values())
    assert len(specs) == 3 and all(s == specs[0] for s in specs)
    assert specs[0] == {"ps": ["127.0.0.1:9001"], "worker": ["127.0.0.1:9002", "127.0.0.1:9000"]}


def test_embedded_registry_completes_the_cluster_and_checks_the_secret():
    channel = DriverChannel(bind_host="127.0.0.1")
    registry = EmbeddedRegistry()
    token = channel.register("emb", lambda e: None, registry.handle)
    addr = f"127.0.0.1:{channel.port}"
    _complete_cluster(lambda: EmbeddedRegistryClient(addr, "emb", token, attempt=1))
    assert registry.members(1)["ps"] == {0: "127.0.0.1:9001"}
    with pytest.raises(RegistryError, match="Cannot reach the notebook's registry.*refused"):
        EmbeddedRegistryClient(addr, "emb", "wrong-secret", attempt=1)
    channel.close()


def test_embedded_wait_names_the_missing_tasks():
    channel = DriverChannel(bind_host="127.0.0.1")
    registry = EmbeddedRegistry()
    token = channel.register("late", lambda e: None, registry.handle)
    client = EmbeddedRegistryClient(f"127.0.0.1:{channel.port}", "late", token, attempt=3)
    client.register("worker", 0, "127.0.0.1:1")
    t0 = time.time()
    with pytest.raises(RegistryError, match=r"ps/0, worker/1 never registered"):
        client.wait_cluster(COUNTS, timeout=1.5)
    assert time.time() - t0 < 5
    channel.close()


def test_zookeeper_registry_ephemeral_nodes_acl_and_cleanup(zookeeper):
    auth = "tfos:s3cret"
    _complete_cluster(lambda: ZooKeeperRegistryClient(zookeeper, "zkjob", attempt=2, auth=auth))
    client = ZooKeeperRegistryClient(zookeeper, "zkjob", attempt=2, auth=auth)
    client.register("worker", 0, "127.0.0.1:7")
    view = ZooKeeperView(zookeeper, "zkjob", auth=auth)
    assert view.members(2) == {"worker": {0: "127.0.0.1:7"}}
    stranger = KazooClient(hosts=zookeeper)
    stranger.start(timeout=5)
    with pytest.raises(NoAuthError):
        stranger.get("/tfos/zkjob/2/worker/0")  # the digest ACL keeps others out
    client.close()  # the task's session ends: its ephemeral node goes with it
    assert view.members(2) == {}
    view.close()
    assert stranger.exists("/tfos/zkjob") is None
    stranger.stop()


def test_unreachable_zookeeper_fails_within_a_bounded_time():
    t0 = time.time()
    with pytest.raises(RegistryError, match=r"Cannot reach ZooKeeper at 127.0.0.1:\d+ within 10s"):
        ZooKeeperView(f"127.0.0.1:{free_port()}", "nozk")
    assert time.time() - t0 < 20


def test_embedded_registry_takes_only_the_plans_roles_of_the_current_attempt_once_each():
    """Anyone with the attempt's token may ask; the registry still refuses what the plan
    has no place for, another attempt's requests, and a second address for a task."""
    channel = DriverChannel(bind_host="127.0.0.1")
    registry = EmbeddedRegistry(workers=2, ps=1)
    registry.begin_attempt(2)
    token = channel.register("plan", lambda e: None, registry.handle)
    addr = f"127.0.0.1:{channel.port}"
    current = EmbeddedRegistryClient(addr, "plan", token, attempt=2)
    stale = EmbeddedRegistryClient(addr, "plan", token, attempt=1)
    try:
        current.register("worker", 1, "127.0.0.1:9001")
        current.register("worker", 1, "127.0.0.1:9001")  # the same again: a harmless repeat
        for role, index, address, why in [
            ("worker", 2, "127.0.0.1:9002", r"worker/2 is not in this job's plan \(worker 0..1, ps 0..0\)"),
            ("ps", 1, "127.0.0.1:9003", "ps/1 is not in this job's plan"),
            ("chief", 0, "127.0.0.1:9004", "chief/0 is not in this job's plan"),
            ("worker", -1, "127.0.0.1:9005", "worker/-1 is not in this job's plan"),
            ("worker", True, "127.0.0.1:9006", "must be a name and a number"),
            ("worker", 0, "no-port", "must be host:port"),
            ("worker", 1, "10.0.0.66:9001", r"worker/1 is already registered at 127.0.0.1:9001 in attempt 2"),
        ]:
            with pytest.raises(RegistryError, match=why):
                current.register(role, index, address)
        with pytest.raises(RegistryError, match=r"attempt 1 is not the job's current attempt \(2\)"):
            stale.register("worker", 0, "127.0.0.1:9000")
        with pytest.raises(RegistryError, match="not the job's current attempt"):
            stale.members()
        assert current.members() == {"worker": {1: "127.0.0.1:9001"}}
        registry.begin_attempt(3)  # the next attempt starts empty, and attempt 2 is over
        assert registry.members(2) == {}
        with pytest.raises(RegistryError, match=r"attempt 2 is not the job's current attempt \(3\)"):
            current.register("worker", 0, "127.0.0.1:9000")
    finally:
        current.close()
        stale.close()
        channel.close()
