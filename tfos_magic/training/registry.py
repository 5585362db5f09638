"""The TF process's side of the service registry: register this task, wait for the cluster."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Any

from ..protocol.channel import ChannelClient
from ..protocol.plan import TaskPlan
from ..protocol.registry import Members, RegistryError, cluster_spec, job_path, missing, zk_connect, zk_members

POLL_S = 0.2


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


class EmbeddedRegistryClient(RegistryClient):
    def __init__(self, address: str, job: str, token: str, attempt: int, connect_within: float = 10.0) -> None:
        self.attempt = attempt
        self._channel = ChannelClient(address, job, token, connect_within=connect_within)
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


class ZooKeeperRegistryClient(RegistryClient):
    def __init__(self, hosts: str, job: str, attempt: int, auth: str | None = None) -> None:
        self.path = f"{job_path(job)}/{attempt}"
        self._zk = zk_connect(hosts, auth)
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


def client_for(plan: TaskPlan) -> RegistryClient:
    """The registry client of this attempt, as the plan says."""
    reg = plan.registry
    if reg.kind == "zookeeper":
        return ZooKeeperRegistryClient(reg.hosts or "", plan.job, plan.attempt, reg.auth)
    return EmbeddedRegistryClient(plan.channel_address, plan.job, plan.token, plan.attempt,
                                  connect_within=plan.options.start_timeout)
