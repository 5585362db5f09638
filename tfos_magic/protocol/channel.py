"""The channel from executor processes to the notebook: wire format and client.

Protocol (JSON lines over TCP): the client's first line is
``{"v": 1, "job": NAME, "token": SECRET}``; the server answers ``{"ok": true}`` or
``{"ok": false, "error": ...}`` and closes. After a good hello every line is one
metric event, or a request (a line with "op", e.g. the embedded service registry's)
that gets one answer line. A client that says ``"listen": true`` in its hello makes no
requests; the server may send it control lines instead (``{"control": "stop"}``,
``{"control": "stop_at", "step": N}``: how a stop reaches the TF processes). Each attempt
gets a fresh random token, so a stray or stale process cannot write into a job. No line
may be longer than `MAX_LINE_BYTES`: the server closes a connection that sends one. The
server is `driver/channel.py`; the clients are the Spark tasks and the TF processes.
"""

from __future__ import annotations

import json
import random
import select
import socket
import sys
import threading
import time
from typing import Any, Callable

PROTOCOL_VERSION = 1
# The longest line either side accepts, newline included: an event or request longer than
# this closes the connection, and no reader buffers more than this for one line. The largest
# events are errors with their details (a traceback and a 64 KiB log tail), far below it.
MAX_LINE_BYTES = 1 << 20
# What every side says when the notebook's channel cannot be reached from an executor.
REACH_HINT = ("The executors must reach the notebook's host: set TFOS_DRIVER_HOST (or spark.driver.host) to an "
              "address they can reach, and let them connect to any port of it (docs/deploy.md).")
# Backoff between connection tries (`connect_within`): the first wait, doubled after each
# try up to the cap, each drawn at random from its upper half so that hundreds of
# workers that failed together do not come back together.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
# How long a client whose connection broke under a send tries to open a new one when it
# was made without `connect_within` (one try at first).
RECONNECT_WITHIN_S = 60.0
# What a moment may cure: nothing listens yet, or the notebook's accept queue overflowed
# and the connection was reset, timed out or closed before the hello's answer.
_TRANSIENT = (ConnectionError, TimeoutError)
_RECV_BYTES = 1 << 16


# The name spare TF processes listen under (task/spares.py): no job can have it (job names
# are file names, protocol/paths.py), and its token is the notebook's, not a job's.
SPARES_JOB = "tfos:spares"


def hold_listener(address: str, job: str, token: str, timeout: float) -> socket.socket:
    """A listening connection and nothing else: one try, and the socket once the notebook
    said yes. The holder only watches it: whatever arrives, or its closing, ends the wait.
    Raises OSError (ChannelRefused for a token the notebook no longer takes)."""
    host, _, port = address.rpartition(":")
    sock, _ = _hello_once(host, int(port), encode(hello(job, token, listen=True)), timeout)
    return sock


def hello(job: str, token: str, listen: bool = False) -> dict[str, Any]:
    """The client's first line."""
    return {"v": PROTOCOL_VERSION, "job": job, "token": token, "listen": listen}


def encode(message: dict[str, Any]) -> bytes:
    """One JSON line."""
    return (json.dumps(message) + "\n").encode()


def decode(line: bytes) -> Any:
    """One line's JSON value, or None for a line that is not JSON (invalid UTF-8, a syntax
    error, nesting too deep for the parser): the peer's mistake, which no reader should die of."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


class ChannelRefused(OSError):
    """The notebook answered the hello with a refusal (unknown job, bad token): it is
    listening and has decided, so trying again cannot help."""


class LineTooLong(ValueError):
    """The peer sent more than the reader's limit without ending the line."""


class LineReader:
    """Lines from a socket, each within `limit` bytes and, if asked, within a total deadline.

    It waits with poll() and never changes the socket's own timeout, so one thread may read
    while another sends on the same socket with a send timeout. A line that trickles in a
    byte at a time still ends at its deadline (a per-receive timeout would not), and the
    buffer never holds more than `limit` bytes, whatever the peer sends.
    """

    def __init__(self, sock: socket.socket, limit: int = MAX_LINE_BYTES) -> None:
        self.limit = limit
        self._sock = sock
        self._buf = bytearray()
        self._scanned = 0  # the buffer holds no newline before this
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def readline(self, timeout: float | None = None) -> bytes:
        """The next line with its newline, or b"" when the peer ends the stream. Raises
        TimeoutError when no whole line came within `timeout` seconds (None: wait for ever;
        what came so far stays buffered), LineTooLong past the limit, OSError as recv does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buf[:end + 1])
                del self._buf[:end + 1]
                self._scanned = 0
                return line
            self._scanned = len(self._buf)
            if len(self._buf) >= self.limit:
                raise LineTooLong(f"a line longer than {self.limit} bytes")
            self._wait(deadline)
            chunk = self._sock.recv(min(_RECV_BYTES, self.limit - len(self._buf)))
            if not chunk:
                return b""
            self._buf += chunk

    def stale(self) -> bool:
        """Something came unasked (on a request connection: only its end, when the server
        closed it), so the next answer would not be the next line."""
        return bool(self._buf) or bool(self._poll.poll(0))

    def _wait(self, deadline: float | None) -> None:
        """Until the socket has something to read (data, its end or an error)."""
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("no whole line in time")
            if self._poll.poll(None if left is None else max(1, int(left * 1000))):
                return


def _hello_once(host: str, port: int, greeting: bytes, timeout: float) -> tuple[socket.socket, LineReader]:
    """One try: connect, say hello, read the answer. Closes what it opened on any failure,
    so that retries leak no sockets."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(greeting)
        reader = LineReader(sock)
        line = reader.readline(timeout)
        if not line:
            raise ConnectionResetError("the notebook closed the connection before answering")
        reply = decode(line)
        if not (isinstance(reply, dict) and reply.get("ok")):
            raise ChannelRefused(f"driver refused the metrics channel: {reply}")
    except BaseException:
        sock.close()
        raise
    return sock, reader


def _connect(host: str, port: int, greeting: bytes, timeout: float,
             connect_within: float | None) -> tuple[socket.socket, LineReader]:
    """`_hello_once`, tried again after transient failures until `connect_within` seconds
    have passed (None: one try). A job's processes all start at once, possibly before the
    notebook listens or faster than it accepts; one failed try must not fail a TF process."""
    if connect_within is None:
        return _hello_once(host, port, greeting, timeout)
    start = time.monotonic()
    deadline, wait, tries = start + connect_within, RETRY_FIRST_S, 0
    while True:
        tries += 1
        try:
            return _hello_once(host, port, greeting, min(timeout, max(deadline - time.monotonic(), RETRY_FIRST_S)))
        except _TRANSIENT as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"tried for {time.monotonic() - start:.1f}s ({tries} tries), "
                                   f"last error: {type(exc).__name__}: {exc}") from exc
            time.sleep(min(left, random.uniform(wait / 2, wait)))
            wait = min(2 * wait, RETRY_MAX_S)


class _Connection:
    """One authenticated connection. `dropped` says its client gave it up (after a failed
    send, or when closing): its end is then no news from the notebook."""

    def __init__(self, sock: socket.socket, reader: LineReader, listening: bool) -> None:
        self.sock, self.reader, self.listening = sock, reader, listening
        self.dropped = False

    def drop(self) -> None:
        """Give it up. A listening connection's reader thread is woken by the shutdown and
        closes the socket itself, so its descriptor is never reused under a poll()."""
        self.dropped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if not self.listening:
            self.sock.close()


class ChannelClient:
    """Executor side. Sending is best effort: a channel lost mid-run never stops training.

    Whether the first connection worked is in `connected`/`error`; the TF process
    refuses to start without it, since the notebook would see neither progress nor history.

    A send that fails (times out on a notebook too busy to read, or finds the connection
    broken) closes that connection and opens a new one in the background, with the same
    backoff as the first; events sent meanwhile are dropped and counted. For a listening
    client (the TF process) the end of a connection is the notebook's fence, and `on_close`
    runs, when the notebook ended it: the connection ends without this client having given
    it up, or a new connection is refused (the attempt's token is void) or cannot be opened
    within the reconnection window (the notebook is gone). A connection this client gave up
    after its own failed send is no fence: it reconnects instead.
    """

    def __init__(self, address: str, job: str, token: str, timeout: float = 10.0,
                 on_close: Callable[[], None] | None = None,
                 on_control: Callable[[dict[str, Any]], None] | None = None,
                 connect_within: float | None = None) -> None:
        """`connect_within`: retry a connection that fails, is reset or gets no answer, with
        jittered exponential backoff, for up to that many seconds (a job's start timeout);
        a refusal (bad token, unknown job) fails at once. None: one try (and
        `RECONNECT_WITHIN_S` for a reconnection)."""
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._closed = False
        self._fenced = False
        self._reconnecting: threading.Thread | None = None
        self._dropped = 0
        self._on_close, self._on_control = on_close, on_control
        self._listening = on_close is not None or on_control is not None
        self._timeout = timeout
        self._reconnect_within = connect_within if connect_within is not None else RECONNECT_WITHIN_S
        self.error: str | None = None
        self._address = address
        try:
            host, port = address.rsplit(":", 1)
            self._target = (host, int(port))
            self._greeting = encode(hello(job, token, self._listening))
            sock, reader = _connect(host, int(port), self._greeting, timeout, connect_within)
        except (OSError, ValueError) as exc:
            self._lose(f"cannot open the metrics channel to the notebook at {address}: {exc}")
            return
        self._install(sock, reader)

    @property
    def connected(self) -> bool:
        """A connection is open now: false before the first one, after the channel is lost
        or closed, and while a new one is being opened after a failed send."""
        return self._conn is not None

    def send(self, event: dict[str, Any]) -> bool:
        """Send one event; True if it went out. Never raises and never blocks longer than the
        send timeout: a failure reconnects in the background and this event is dropped."""
        data = encode(event)
        if len(data) > MAX_LINE_BYTES:  # the notebook would close the connection for it
            print(f"tfos: a {event.get('kind')!r} event of {len(data)} bytes is over the channel's limit "
                  f"({MAX_LINE_BYTES}); not sent", file=sys.stderr)
            return False
        with self._lock:
            conn = self._conn
            if conn is not None:
                try:
                    conn.sock.sendall(data)
                    return True
                except OSError as exc:
                    print(f"tfos: metrics channel send failed ({exc}); reconnecting", file=sys.stderr)
                    self._give_up(conn)
            self._dropped += 1
            self._start_reconnect()
        return False

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a request (a dict with "op") and wait for its answer; raises OSError if the
        channel is down. A connection that failed is replaced first (the server closes an
        idle request connection after a while)."""
        if self._listening:
            raise RuntimeError("a listening channel gets control lines, not answers: open another for requests")
        conn = self._live()
        with self._lock:
            try:
                conn.sock.sendall(encode(msg))
                line = conn.reader.readline(self._timeout)
            except (OSError, LineTooLong) as exc:
                self._give_up(conn)
                raise ConnectionError(f"the channel failed during a request: {exc}") from exc
            if not line:
                self._give_up(conn)
                raise ConnectionError("the notebook closed the channel")
        return json.loads(line)

    def close(self) -> None:
        """End the channel for good: no fence, no reconnection."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.drop()

    def _install(self, sock: socket.socket, reader: LineReader) -> None:
        """Use a new connection: sends block at most the timeout; a listening one gets its reader."""
        sock.settimeout(self._timeout)
        conn = _Connection(sock, reader, self._listening)
        self._conn = conn
        if self._listening:  # control lines, and the notebook ending this run (or dying)
            threading.Thread(target=self._listen, args=(conn,), name="tfos-channel-listen", daemon=True).start()

    def _give_up(self, conn: _Connection) -> None:
        """Under the lock: stop using a connection that failed under this client's own
        send or request. No fence: the next send or request opens another."""
        if self._conn is conn:
            self._conn = None
        conn.drop()

    def _lose(self, error: str) -> None:
        """The channel is gone for good: say so once, in this process's log."""
        self.error = error
        print(f"tfos: {self.error}", file=sys.stderr)

    def _start_reconnect(self) -> threading.Thread | None:
        """Under the lock: the thread opening a new connection, started if none is; None
        when there is nothing to reopen (closed, lost for good, or never connected)."""
        if self._closed or self.error is not None:
            return None
        if self._reconnecting is None:
            self._reconnecting = threading.Thread(target=self._reconnect, name="tfos-channel-reconnect", daemon=True)
            self._reconnecting.start()
        return self._reconnecting

    def _live(self) -> _Connection:
        """The open connection, after waiting for a reconnection; ConnectionError if none."""
        with self._lock:
            conn = self._conn
            if conn is not None and conn.reader.stale():
                self._give_up(conn)
                conn = None
            thread = self._start_reconnect() if conn is None else None
        if thread is not None:
            thread.join()
            conn = self._conn
        if conn is None:
            raise ConnectionError(self.error or "channel closed")
        return conn

    def _reconnect(self) -> None:
        """Open a new connection with backoff. For a listening client, a refusal or the
        window passing is the notebook's fence."""
        started = time.monotonic()
        try:
            sock, reader = _connect(*self._target, self._greeting, self._timeout, self._reconnect_within)
        except (OSError, ValueError) as exc:
            with self._lock:
                self._reconnecting = None
                if self._closed:
                    return
                self._lose(f"metrics channel to {self._address} lost and not reopened: {exc}")
            self._fence()
            return
        with self._lock:
            self._reconnecting = None
            if self._closed:
                sock.close()
                return
            self._install(sock, reader)
            dropped, self._dropped = self._dropped, 0
        print(f"tfos: metrics channel reopened after {time.monotonic() - started:.1f}s; "
              f"{dropped} event(s) were not sent meanwhile", file=sys.stderr)

    def _listen(self, conn: _Connection) -> None:
        """Read control lines until the connection ends, then close it. A listening client
        makes no requests, so nothing else reads this socket. Its end, unless this client
        gave it up, is the notebook's fence."""
        try:
            while line := conn.reader.readline():
                message = decode(line)
                if self._on_control is not None and isinstance(message, dict) and "control" in message:
                    self._on_control(message)
        except (OSError, LineTooLong):
            pass
        finally:
            conn.sock.close()
        with self._lock:
            if conn.dropped or self._closed:
                return
            self._conn = None
            self._lose("the notebook closed the channel")
        self._fence()

    def _fence(self) -> None:
        """The notebook ended this attempt: `on_close`, once."""
        with self._lock:
            if self._fenced or self._closed or self._on_close is None:
                return
            self._fenced = True
        self._on_close()
