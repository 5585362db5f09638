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

    def __init__(self, owner: "DriverChannel", host: str) -> None:
        self.owner = owner
        super().__init__((host, 0), _Handler)


class DriverChannel:
    """Receives events for registered jobs; one per driver process, started on first use."""

    _instance: "DriverChannel | None" = None
    _lock = threading.Lock()

    def __init__(self, bind_host: str = "0.0.0.0") -> None:
        self._jobs: dict[str, tuple[str, Sink, Handler | None]] = {}
        self._conns: dict[str, set[socket.socket]] = {}
        self._listeners: dict[str, set[socket.socket]] = {}
        self._server = _Server(self, bind_host)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="tfos-channel", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> "DriverChannel":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

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
        self._server.shutdown()
        self._server.server_close()


