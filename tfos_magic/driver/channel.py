"""The notebook's end of the channel (protocol/channel.py): a threaded TCP server that
authenticates each connection by job and per-attempt token, hands events to the job's
sink, answers its requests (the embedded registry's) and sends control lines to the
connections that listen (the TF processes: how a stop reaches them).

Every connection holds a thread and its buffers, and anything that reaches the port may
connect, so each is bounded: the hello has a total deadline, the connections open at once
a cap, a line a maximum length, and a connection that does not listen an idle timeout.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import socketserver
import threading
from typing import Any, Callable, NamedTuple

from ..protocol.channel import (MAX_LINE_BYTES, PROTOCOL_VERSION, SPARES_JOB, LineReader, LineTooLong, decode,
                                encode)

log = logging.getLogger(__name__)

Sink = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any]], dict[str, Any]]
# The whole hello, counted from the accept, however slowly its bytes come: a per-receive
# timeout would let one byte every few seconds hold a thread for ever.
HELLO_TIMEOUT_S = 10.0
HELLO_MAX_BYTES = 64 * 1024
# Connections open at once, authenticated or not; the next ones are closed at accept. A job
# of N workers opens about 2N (each TF process listens, and asks the registry on another).
MAX_CONNECTIONS = 8192
# A connection that does not listen (a Spark task's event, a registry client) and sends
# nothing for this long is closed. Listening ones (the TF processes) may be silent for a
# whole run (a parameter server sends nothing after it starts), and are fenced per attempt.
IDLE_TIMEOUT_S = 300.0
# A reply or control line that a peer does not read within this long fails (its buffers full).
SEND_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 2048


class _Job(NamedTuple):
    token: bytes
    sink: Sink
    requests: Handler | None


def _same_token(expected: bytes, given: Any) -> bool:
    """Constant-time comparison of bytes, whatever the client sent: hmac.compare_digest
    raises TypeError on a str with non-ASCII characters, and a JSON string may even hold a
    lone surrogate, which strict UTF-8 cannot encode."""
    return isinstance(given, str) and hmac.compare_digest(expected, given.encode("utf-8", "surrogatepass"))


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"
    request: socket.socket

    def handle(self) -> None:
        conn, owner = self.request, self.server.owner
        conn.settimeout(SEND_TIMEOUT_S)  # for sends only: LineReader waits for reads itself
        lines = LineReader(conn, HELLO_MAX_BYTES)
        hello = self._hello(lines)
        entry = owner.authenticate(hello)
        if entry is None:
            self._reply({"ok": False, "error": "unknown job or bad token"})
            return
        job, listen = str(hello["job"]), bool(hello.get("listen"))
        if not owner.attach(job, entry, conn, listen):  # its attempt ended meanwhile: fenced
            return
        try:
            if self._reply({"ok": True}):
                lines.limit = MAX_LINE_BYTES
                self._serve(lines, entry, listen)
        finally:
            owner.detach(job, conn)

    @staticmethod
    def _hello(lines: LineReader) -> Any:
        """The client's first line, or None if it did not come whole within the deadline."""
        try:
            return decode(lines.readline(HELLO_TIMEOUT_S))
        except (OSError, LineTooLong):  # TimeoutError is an OSError
            return None

    def _serve(self, lines: LineReader, job: _Job, listen: bool) -> None:
        """Events and requests until the client leaves, idles out, or sends a line too long."""
        idle = None if listen else IDLE_TIMEOUT_S
        while True:
            try:
                line = lines.readline(idle)
            except TimeoutError:
                log.info("tfos channel: closing a connection idle for %.0fs", idle)
                return
            except LineTooLong:
                log.warning("tfos channel: closing a connection that sent a line over %d bytes", lines.limit)
                return
            except OSError:
                return
            if not line:
                return
            msg = decode(line)
            if isinstance(msg, dict) and not self._handle_message(msg, job, listen):
                return

    def _handle_message(self, msg: dict[str, Any], job: _Job, listen: bool) -> bool:
        """One event or request; False when the connection is no longer usable."""
        if "op" not in msg:
            try:
                job.sink(msg)
            except Exception:  # a broken sink must not kill the channel
                log.exception("metric sink failed")
            return True
        if listen:  # its answer could interleave with a control line: the protocol forbids it
            log.info("tfos channel: ignored a request on a listening connection")
            return True
        return self._reply(_answer(job.requests, msg))

    def _reply(self, msg: dict[str, Any]) -> bool:
        """Send one line; False if the client does not take it (gone, or not reading)."""
        try:
            self.request.sendall(encode(msg))
            return True
        except OSError:
            return False


def _answer(requests: Handler | None, msg: dict[str, Any]) -> dict[str, Any]:
    if requests is None:
        return {"ok": False, "error": "no requests for this job"}
    try:
        return requests(msg)
    except Exception as exc:  # noqa: BLE001 - the client gets the error, the server lives
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


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
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._full = False  # said once per time the cap is reached
        super().__init__((host, 0), _Handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection slot, or refuse: socketserver then closes the connection at once."""
        if self._slots.acquire(blocking=False):
            self._full = False
            return True
        if not self._full:
            self._full = True
            log.warning("tfos channel: %d connections open, closing new ones until some end", MAX_CONNECTIONS)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started, so none will give the slot back
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


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
        self._jobs: dict[str, _Job] = {}
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

    def spare_token(self) -> str:
        """The token spare TF processes listen with (task/spares.py); registered on first use."""
        with self._lock:
            entry = self._jobs.get(SPARES_JOB)
        return entry.token.decode() if entry is not None else self.retire_spares()

    def retire_spares(self) -> str:
        """End every spare TF process: their connections close, which each watches, and the
        token any spare started meanwhile would connect with is refused. A stop, an
        interrupt or a failure calls this, so that no TF process outlives them. The new
        token is returned."""
        return self.register(SPARES_JOB, lambda _event: None)

    def register(self, job: str, sink: Sink, requests: Handler | None = None) -> str:
        """Accept events (and requests, e.g. the embedded registry's) for `job` with a fresh
        secret token, which is returned.

        Registering again (a new attempt) fences off the old one: its token stops working
        and its connections are closed, which makes its TF processes exit.
        """
        token = secrets.token_hex(16)
        with self._lock:
            self._jobs[job] = _Job(token.encode(), sink, requests)
        self._close_connections(job)
        return token

    def unregister(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)
        self._close_connections(job)

    def attach(self, job: str, entry: _Job, conn: socket.socket, listen: bool = False) -> bool:
        """Count an authenticated connection as the job's, so that the next attempt closes
        it; False if `entry` (the attempt it authenticated for) has ended meanwhile."""
        with self._lock:
            if self._jobs.get(job) is not entry:
                return False
            self._conns.setdefault(job, set()).add(conn)
            if listen:
                self._listeners.setdefault(job, set()).add(conn)
            return True

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

    def authenticate(self, hello: Any) -> _Job | None:
        """The job a hello names, if its version and token are right."""
        if not isinstance(hello, dict) or hello.get("v") != PROTOCOL_VERSION:
            return None
        with self._lock:
            entry = self._jobs.get(str(hello.get("job")))
        return entry if entry is not None and _same_token(entry.token, hello.get("token")) else None

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
