"""The notebook's side of the service registry: the embedded registry's answers, and the
view of ZooKeeper that removes a job's znodes however the job ends."""

from __future__ import annotations

import threading
from typing import Any

from ..protocol.registry import Members, RegistryError, job_path, zk_connect, zk_members


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


class ZooKeeperView:
    """Driver side: what is registered, and removing the job's znodes however the job ends."""

    def __init__(self, hosts: str, job: str, auth: str | None = None) -> None:
        self.job = job
        self._zk = zk_connect(hosts, auth)

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
