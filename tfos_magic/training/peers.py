"""Runs in the TF process: can it reach the TF processes it is about to train with?

TF's own waits for an unreachable peer are long and say nothing: a parameter-server
worker retries its session for minutes, and a collective waits for its peer until the
stall timeout. A plain TCP connect to each peer's TF port, retried until the start
timeout (the peer's server may not listen yet), turns that into an error that names
the peer, the address tried and what the connection said.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any, Callable

from ..errors import TfosError

RETRY_S = 0.25


def _refused(address: str, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens, else the error."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return None
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def unreachable_message(me: str, peer: str, address: str, error: str, timeout: float) -> str:
    """What the user reads when `me` could not reach `peer` at `address`."""
    text = f"{me} cannot reach {peer} at {address} ({error}) within {timeout:.0f} s."
    if _loopback(address):
        return text + (" That is a loopback address, which only its own host reaches: the task advertised it "
                       "because its executor's address resolved to loopback there (Debian maps a host's own name to "
                       "127.0.1.1). Set SPARK_LOCAL_IP on every executor to its network address, or give the "
                       "workers host names that resolve to it.")
    return text + (" TF listens on a free port of each executor: the executors must reach each other on any TCP "
                   "port (no firewall between them), at the address Spark knows each executor by.")


def wait_reachable(peers: dict[str, str], timeout: float, me: str,
                   stopped: Callable[[], bool] = lambda: False) -> None:
    """Return once every peer (`{"ps/0": "host:port", ...}`) accepts a connection; raise a
    TfosError naming the first that has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    waiting = dict(peers)
    errors: dict[str, str] = {}
    while waiting and not stopped():
        for name, address in list(waiting.items()):
            error = _refused(address, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            if error is None:
                del waiting[name]
            else:
                errors[name] = error
        if not waiting:
            return
        if time.monotonic() >= deadline:
            name, address = next(iter(waiting.items()))
            raise TfosError(unreachable_message(me, name, address, errors[name], timeout))
        time.sleep(RETRY_S)


def watch_reachable(peers: dict[str, str], timeout: float, me: str, on_failure: Callable[[str], None]) -> Callable[[], None]:
    """`wait_reachable` on a thread of its own, for a join that blocks (a collective
    strategy's set-up waits for its peers): `on_failure(message)` when a peer stays
    unreachable. Returns the function that ends the watch."""
    done = threading.Event()

    def run() -> None:
        try:
            wait_reachable(peers, timeout, me, stopped=done.is_set)
        except TfosError as exc:
            if not done.is_set():
                on_failure(str(exc))

    threading.Thread(target=run, name="tfos-peers", daemon=True).start()
    return done.set


def me(config: Any) -> str:
    """This process in messages: 'TF worker 1 on 10.0.0.5 (host-b)'."""
    return f"{config.plan.process_name} {config.role} {config.index} on {config.bind_host} ({socket.gethostname()})"
