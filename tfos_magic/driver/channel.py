"""The notebook's end of the channel (protocol/channel.py): a threaded TCP server that
authenticates each connection by job and per-attempt token, hands events to the job's
sink, answers its requests (the embedded registry's) and sends control lines to the
connections that listen (the TF processes: how a stop reaches them).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
import socketserver
import threading
from typing import Any, Callable

from ..protocol.channel import PROTOCOL_VERSION, encode

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any]], dict[str, Any]]
HELLO_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 2048


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        self.connection.settimeout(HELLO_TIMEOUT_S)
        try:
            hello = json.loads(self.rfile.readline(65536) or b"null")
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            hello = None
        entry = self.server.owner.authenticate(hello)
        if entry is None:
            self._reply({"ok": False, "error": "unknown job or bad token"})
            return
        sink, requests = entry
        self._reply({"ok": True})
        self.connection.settimeout(None)
        job = str(hello["job"])
        self.server.owner.attach(job, self.connection, listen=bool(hello.get("listen")))
        try:
            self._serve(sink, requests)
        finally:
            self.server.owner.detach(job, self.connection)

    def _serve(self, sink: Sink, requests: Handler | None) -> None:
        for line in self.rfile:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(msg, dict):
                continue
            if "op" in msg:  # a request: answered on the same connection
                try:
                    reply = requests(msg) if requests else {"ok": False, "error": "no requests for this job"}
                except Exception as exc:  # noqa: BLE001 - the client gets the error, the server lives
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                self._reply(reply)
                continue
            try:
                sink(msg)
            except Exception:  # a broken sink must not kill the channel
                log.exception("metric sink failed")

    def _reply(self, msg: dict[str, Any]) -> None:
        self.wfile.write(encode(msg))
        self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The listen backlog. Every Spark task and TF process of a job connects at start-up,
    # all within a moment, and a TF process without a channel refuses to start. With
    # socketserver's default of 5 the accept queue overflows: 145 of 256 simulated workers
    # timed out on a 2-core machine (bench/channel_load.py, docs/performance.md), and
    # others saw ConnectionResetError. The OS caps it at net.core.somaxconn (4096 since
    # Linux 5.4, 128 before).
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, owner: "DriverChannel", host: str, backlog: int) -> None:
        self.owner = owner
        self.request_queue_size = backlog
        super().__init__((host, 0), _Handler)


class DriverChannel:
    """Receives events for registered jobs; one per bind address in a driver process,
    started on first use (`get`)."""

    _instances: "dict[str, DriverChannel]" = {}
    _instances_lock = threading.Lock()

    def __init__(self, bind_host: str = "127.0.0.1", backlog: int = LISTEN_BACKLOG) -> None:
        """Listen on `bind_host` only, never on every interface: the executors reach the
        driver at one address, and nothing else on the network need see the channel.
        `backlog` is for benchmarks that compare with socketserver's default (5)."""
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[str, Sink, Handler | None]] = {}
        self._conns: dict[str, set[socket.socket]] = {}
        self._listeners: dict[str, set[socket.socket]] = {}
        self._server = _bind(self, bind_host, backlog)
        self.bind_host = bind_host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="tfos-channel", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls, bind_host: str = "127.0.0.1") -> "DriverChannel":
        """This process's channel on `bind_host`: 127.0.0.1 in local mode, the driver's
        address on a cluster. Created on first use, then shared by every job."""
        with cls._instances_lock:
            channel = cls._instances.get(bind_host)
            if channel is None:
                channel = cls._instances[bind_host] = cls(bind_host)
            return channel

    def register(self, job: str, sink: Sink, requests: Handler | None = None) -> str:
        """Accept events (and requests, e.g. the embedded registry's) for `job` with a fresh
        secret token, which is returned.

        Registering again (a new attempt) fences off the old one: its token stops working
        and its connections are closed, which makes its TF processes exit.
        """
        token = secrets.token_hex(16)
        self._close_connections(job)
        self._jobs[job] = (token, sink, requests)
        return token

    def unregister(self, job: str) -> None:
        self._jobs.pop(job, None)
        self._close_connections(job)

    def attach(self, job: str, conn: socket.socket, listen: bool = False) -> None:
        with self._lock:
            self._conns.setdefault(job, set()).add(conn)
            if listen:
                self._listeners.setdefault(job, set()).add(conn)

    def detach(self, job: str, conn: socket.socket) -> None:
        with self._lock:
            self._conns.get(job, set()).discard(conn)
            self._listeners.get(job, set()).discard(conn)

    def control(self, job: str, message: dict[str, Any]) -> int:
        """Send a control line to the job's listening connections; returns how many got it.
        Listeners make no requests, so this never interleaves with an answer."""
        with self._lock:
            conns = list(self._listeners.get(job, ()))
        sent = 0
        for conn in conns:
            try:
                conn.sendall(encode(message))
                sent += 1
            except OSError:
                pass  # a connection that is gone: its process is ending anyway
        return sent

    def _close_connections(self, job: str) -> None:
        with self._lock:
            conns = self._conns.pop(job, set())
            self._listeners.pop(job, None)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def authenticate(self, hello: Any) -> tuple[Sink, Handler | None] | None:
        if not isinstance(hello, dict) or hello.get("v") != PROTOCOL_VERSION:
            return None
        entry = self._jobs.get(str(hello.get("job")))
        token = hello.get("token")
        if entry is None or not isinstance(token, str):
            return None
        return (entry[1], entry[2]) if hmac.compare_digest(entry[0], token) else None

    def close(self) -> None:
        with DriverChannel._instances_lock:  # a later get() starts a fresh one
            if DriverChannel._instances.get(self.bind_host) is self:
                del DriverChannel._instances[self.bind_host]
        self._server.shutdown()
        self._server.server_close()


def _bind(owner: DriverChannel, host: str, backlog: int) -> _Server:
    """The listening server, or an OSError that names the address: a host that is not
    one of this machine's addresses is a configuration error the user must fix."""
    try:
        return _Server(owner, host, backlog)
    except OSError as exc:
        raise OSError(exc.errno, f"the tfos channel cannot listen on {host!r} ({exc.strerror or exc}): it must be "
                      "an address of this machine (TFOS_DRIVER_HOST or spark.driver.host)") from exc
