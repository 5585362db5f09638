"""The notebook's side of the service registry: the embedded registry's answers, and the
view of ZooKeeper that removes a job's znodes however the job ends."""

from __future__ import annotations

import threading
from typing import Any

from ..protocol.registry import Members, RegistryError, job_path, zk_connect, zk_members

MAX_ADDRESS = 300  # characters of a registered host:port (a DNS name is at most 253)


class EmbeddedRegistry:
    """Driver side of the embedded registry: answers the channel's register/members requests.

    Anyone holding the attempt's token can send requests, so registrations are checked
    against the plan when it is given: `workers` and `ps` say which `role/index` exist
    (worker 0..W-1, ps 0..P-1), and `begin_attempt` which attempt is current. Each
    role/index of an attempt is one Spark task, started once (a failed task ends the
    attempt, and the next one has a new number), so its first address stands: registering
    it again with the same address is a harmless repeat and succeeds; with another address
    it is refused, so that no one can divert a worker's peers. Made with no counts and no
    attempt, it accepts any role, index and attempt, as a registry without a plan must.
    """

    def __init__(self, workers: int | None = None, ps: int | None = None) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[int, Members] = {}
        self._counts = None if workers is None and ps is None else {"worker": workers or 0, "ps": ps or 0}
        self._current: int | None = None

    def begin_attempt(self, attempt: int) -> None:
        """From now on only `attempt` may register or ask; what older attempts registered is
        forgotten (their processes are fenced off by the channel's new token)."""
        with self._lock:
            self._current = attempt
            self._attempts = {attempt: {}}

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One request from the channel; refusals say why, for the client's error."""
        op = msg.get("op")
        if op not in ("register", "members"):
            return _refused(f"unknown registry op {op!r}")
        attempt = msg.get("attempt")
        with self._lock:
            error = self._attempt_error(attempt) or (self._registration_error(msg) if op == "register" else None)
            if error:
                return _refused(error)
            members = self._attempts.setdefault(attempt, {})
            if op == "register":
                members.setdefault(msg["role"], {}).setdefault(msg["index"], msg["address"])
                return {"ok": True}
            return {"ok": True, "members": {r: {str(i): a for i, a in m.items()} for r, m in members.items()}}

    def _attempt_error(self, attempt: Any) -> str | None:
        if not _is_int(attempt):
            return f"the attempt must be a number, not {attempt!r}"
        if self._current is not None and attempt != self._current:
            return f"attempt {attempt} is not the job's current attempt ({self._current})"
        return None

    def _registration_error(self, msg: dict[str, Any]) -> str | None:
        """Why `msg` may not register, or None: a role and index of the plan, an address
        `host:port`, and no other address already registered for them in this attempt."""
        role, index, address = msg.get("role"), msg.get("index"), msg.get("address")
        if not isinstance(role, str) or not _is_int(index):
            return f"role and index must be a name and a number, not {role!r} and {index!r}"
        if self._counts is not None and not (role in self._counts and 0 <= index < self._counts[role]):
            planned = ", ".join(f"{r} 0..{n - 1}" for r, n in self._counts.items() if n) or "nothing"
            return f"{role}/{index} is not in this job's plan ({planned})"
        if not _is_address(address):
            return f"the address must be host:port, not {str(address)[:100]!r}"
        registered = self._attempts.get(msg["attempt"], {}).get(role, {}).get(index)
        if registered is not None and registered != address:
            return f"{role}/{index} is already registered at {registered} in attempt {msg['attempt']}"
        return None

    def members(self, attempt: int) -> Members:
        with self._lock:
            return {r: dict(m) for r, m in self._attempts.get(attempt, {}).items()}

    def clear(self) -> None:
        with self._lock:
            self._attempts.clear()

    def close(self) -> None:
        self.clear()


def _refused(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_address(value: Any) -> bool:
    """`host:port` as a TF cluster spec takes it: a host of printable characters without
    spaces, and a port in 1..65535."""
    if not isinstance(value, str) or len(value) > MAX_ADDRESS:
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and host.isprintable() and " " not in host and port.isdigit() and 0 < int(port) < 65536


class ZooKeeperView:
    """Driver side: what is registered, and removing the job's znodes however the job ends."""

    def __init__(self, hosts: str, job: str, auth: str | None = None) -> None:
        self.job = job
        self._zk = zk_connect(hosts, auth)

    def begin_attempt(self, attempt: int) -> None:
        """Nothing to do: ZooKeeper paths carry the attempt, and the ACL guards them."""

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
