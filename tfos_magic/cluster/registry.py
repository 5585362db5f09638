"""Service registry: how PS and worker tasks find each other.

One interface, two implementations:

- embedded (default): the notebook's own channel (monitor/channel.py) keeps
  `role/index -> host:port`; every request carries the run's secret token;
- ZooKeeper (kazoo): ephemeral znodes `/tfos/<job>/<attempt>/<role>/<index>` holding
  host:port, optionally under a digest ACL. An ephemeral node lives as long as the TF
  process that made it, so a dead task leaves the registry by itself.

Executors use a `RegistryClient` (register, then wait for the whole cluster); the
driver uses a `RegistryView` (who is there, and cleaning up when the job ends).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from ..errors import TfosError

Members = dict[str, dict[int, str]]  # role -> index -> host:port
ZK_CONNECT_TIMEOUT_S = 10.0
POLL_S = 0.2
ROOT = "/tfos"


class RegistryError(TfosError):
    pass


def missing(members: Members, counts: dict[str, int]) -> list[str]:
    """`role/index` entries that have not registered, in order."""
    return [f"{role}/{i}" for role, n in counts.items() for i in range(n) if i not in members.get(role, {})]


def cluster_spec(members: Members, counts: dict[str, int]) -> dict[str, list[str]]:
    return {role: [members[role][i] for i in range(n)] for role, n in counts.items() if n}


class RegistryClient(ABC):
    """Executor side of one attempt of one job."""

    @abstractmethod
    def register(self, role: str, index: int, address: str) -> None: ...

    @abstractmethod
    def members(self) -> Members: ...

    def wait_cluster(self, counts: dict[str, int], timeout: float) -> dict[str, list[str]]:
        """Block until every role/index of `counts` is registered; name the absent ones on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            members = self.members()
            absent = missing(members, counts)
            if not absent:
                return cluster_spec(members, counts)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RegistryError(
                    f"The TF cluster did not complete within {timeout:.0f}s: {', '.join(absent)} never "
                    "registered. Those tasks did not start (no free task slots?) or cannot reach the registry."
                )
            self._wait_change(min(left, 1.0))

    def _wait_change(self, seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))

    def close(self) -> None:  # noqa: B027 - most clients hold nothing to release
        """Release the connection (ends a ZooKeeper client's ephemeral nodes)."""


# --- embedded ------------------------------------------------------------
class EmbeddedRegistry:
    """Driver side of the embedded registry: answers the channel's register/members requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[int, Members] = {}

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        attempt = int(msg["attempt"])
        with self._lock:
            members = self._attempts.setdefault(attempt, {})
            if msg["op"] == "register":
                members.setdefault(str(msg["role"]), {})[int(msg["index"])] = str(msg["address"])
                return {"ok": True}
            if msg["op"] == "members":
                return {"ok": True, "members": {r: {str(i): a for i, a in m.items()} for r, m in members.items()}}
        return {"ok": False, "error": f"unknown registry op {msg['op']!r}"}

    def members(self, attempt: int) -> Members:
        with self._lock:
            return {r: dict(m) for r, m in self._attempts.get(attempt, {}).items()}

    def clear(self) -> None:
        with self._lock:
            self._attempts.clear()

    def close(self) -> None:
        self.clear()


class EmbeddedRegistryClient(RegistryClient):
    def __init__(self, address: str, job: str, token: str, attempt: int) -> None:
        from ..monitor import ChannelClient

        self.attempt = attempt
        self._channel = ChannelClient(address, job, token)
        if not self._channel.connected:
            raise RegistryError(f"Cannot reach the notebook's registry: {self._channel.error}")

    def _ask(self, **msg: Any) -> dict[str, Any]:
        reply = self._channel.request(dict(msg, attempt=self.attempt))
        if not reply.get("ok"):
            raise RegistryError(f"registry request refused: {reply.get('error')}")
        return reply

    def register(self, role: str, index: int, address: str) -> None:
        self._ask(op="register", role=role, index=index, address=address)

    def members(self) -> Members:
        raw = self._ask(op="members")["members"]
        return {r: {int(i): a for i, a in m.items()} for r, m in raw.items()}

    def close(self) -> None:
        self._channel.close()


# --- ZooKeeper -----------------------------------------------------------
def _zk_client(hosts: str, auth: str | None):
    from kazoo.client import KazooClient
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl

    kwargs: dict[str, Any] = {}
    if auth:
        user, _, password = auth.partition(":")
        kwargs["auth_data"] = [("digest", auth)]
        kwargs["default_acl"] = [make_digest_acl(user, password, all=True)]
    client = KazooClient(hosts=hosts, timeout=ZK_CONNECT_TIMEOUT_S, **kwargs)
    try:
        client.start(timeout=ZK_CONNECT_TIMEOUT_S)
    except KazooTimeoutError:
        client.close()
        raise RegistryError(
            f"Cannot reach ZooKeeper at {hosts} within {ZK_CONNECT_TIMEOUT_S:.0f}s. Check --zookeeper "
            "(host:port[/chroot]) or TFOS_ZOOKEEPER, or leave both unset to use the embedded registry."
        ) from None
    # /tfos is shared by every job and user: open; a job's own nodes get the job's ACL.
    client.ensure_path(ROOT, acl=OPEN_ACL_UNSAFE)
    return client


def job_path(job: str) -> str:
    return f"{ROOT}/{job}"


class ZooKeeperRegistryClient(RegistryClient):
    def __init__(self, hosts: str, job: str, attempt: int, auth: str | None = None) -> None:
        self.path = f"{job_path(job)}/{attempt}"
        self._zk = _zk_client(hosts, auth)
        self._changed = threading.Event()

    def register(self, role: str, index: int, address: str) -> None:
        self._zk.create(f"{self.path}/{role}/{index}", address.encode(), ephemeral=True, makepath=True)

    def members(self) -> Members:
        return zk_members(self._zk, self.path, watch=lambda _event: self._changed.set())

    def _wait_change(self, seconds: float) -> None:
        self._changed.wait(seconds)
        self._changed.clear()

    def close(self) -> None:
        self._zk.stop()
        self._zk.close()


def zk_members(zk, path: str, watch=None) -> Members:
    from kazoo.exceptions import NoNodeError

    out: Members = {}
    try:
        roles = zk.get_children(path, watch=watch)
    except NoNodeError:
        zk.ensure_path(path)  # so the watch has a node to sit on
        roles = zk.get_children(path, watch=watch)
    for role in roles:
        try:
            for index in zk.get_children(f"{path}/{role}", watch=watch):
                data, _ = zk.get(f"{path}/{role}/{index}")
                out.setdefault(role, {})[int(index)] = data.decode()
        except NoNodeError:
            continue
    return out


class ZooKeeperView:
    """Driver side: what is registered, and removing the job's znodes however the job ends."""

    def __init__(self, hosts: str, job: str, auth: str | None = None) -> None:
        self.job = job
        self._zk = _zk_client(hosts, auth)

    def members(self, attempt: int) -> Members:
        return zk_members(self._zk, f"{job_path(self.job)}/{attempt}")

    def clear(self) -> None:
        from kazoo.exceptions import NoAuthError

        try:
            if self._zk.exists(job_path(self.job)):
                self._zk.delete(job_path(self.job), recursive=True)
        except NoAuthError:
            raise RegistryError(f"The znodes {job_path(self.job)} belong to other credentials: pass the same "
                                "--zk-auth as before, or remove them with zkCli.sh.") from None

    def close(self) -> None:
        try:
            self.clear()
        finally:
            self._zk.stop()
            self._zk.close()


def client_from_plan(plan: dict[str, Any], attempt: int) -> RegistryClient:
    reg = plan["registry"]
    if reg["kind"] == "zookeeper":
        return ZooKeeperRegistryClient(reg["hosts"], plan["job"], attempt, reg.get("auth"))
    return EmbeddedRegistryClient(plan["channel_address"], plan["job"], plan["token"], attempt)
