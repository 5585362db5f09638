"""The channel from executor processes to the notebook: wire format and client.

Protocol (JSON lines over TCP): the client's first line is
``{"v": 1, "job": NAME, "token": SECRET}``; the server answers ``{"ok": true}`` or
``{"ok": false, "error": ...}`` and closes. After a good hello every line is one
metric event, or a request (a line with "op", e.g. the embedded service registry's)
that gets one answer line. A client that says ``"listen": true`` in its hello makes no
requests; the server may send it control lines instead (``{"control": "stop"}``,
``{"control": "stop_at", "step": N}``: how a stop reaches the TF processes). Each attempt gets a fresh random token, so a stray or
stale process cannot write into a job. The server is `driver/channel.py`; the
clients are the Spark tasks and the TF processes.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
from typing import Any, BinaryIO, Callable

PROTOCOL_VERSION = 1
# What every side says when the notebook's channel cannot be reached from an executor.
REACH_HINT = ("The executors must reach the notebook's host: set TFOS_DRIVER_HOST (or spark.driver.host) to an "
              "address they can reach, and let them connect to any port of it (docs/deploy.md).")
# Backoff between connection tries (`connect_within`): the first wait, doubled after each
# try up to the cap, each drawn at random from its upper half so that hundreds of
# workers that failed together do not come back together.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
# What a moment may cure: nothing listens yet, or the notebook's accept queue overflowed
# and the connection was reset, timed out or closed before the hello's answer.
_TRANSIENT = (ConnectionError, TimeoutError)


def hello(job: str, token: str, listen: bool = False) -> dict[str, Any]:
    """The client's first line."""
    return {"v": PROTOCOL_VERSION, "job": job, "token": token, "listen": listen}


def encode(message: dict[str, Any]) -> bytes:
    """One JSON line."""
    return (json.dumps(message) + "\n").encode()


class ChannelRefused(OSError):
    """The notebook answered the hello with a refusal (unknown job, bad token): it is
    listening and has decided, so trying again cannot help."""


def _hello_once(host: str, port: int, greeting: bytes, timeout: float) -> tuple[socket.socket, BinaryIO]:
    """One try: connect, say hello, read the answer. Closes what it opened on any failure,
    so that retries leak no sockets."""
    sock = socket.create_connection((host, port), timeout=timeout)
    reader: BinaryIO | None = None
    try:
        sock.sendall(greeting)
        reader = sock.makefile("rb")
        line = reader.readline()
        if not line:
            raise ConnectionResetError("the notebook closed the connection before answering")
        reply = json.loads(line)
        if not (isinstance(reply, dict) and reply.get("ok")):
            raise ChannelRefused(f"driver refused the metrics channel: {reply}")
    except BaseException:
        if reader is not None:
            reader.close()
        sock.close()
        raise
    return sock, reader


def _connect(host: str, port: int, greeting: bytes, timeout: float,
             connect_within: float | None) -> tuple[socket.socket, BinaryIO]:
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


class ChannelClient:
    """Executor side. Sending is best effort: a channel lost mid-run never stops training.

    Whether the first connection worked is in `connected`/`error`; the TF process
    refuses to start without it, since the notebook would see neither progress nor history.
    """

    def __init__(self, address: str, job: str, token: str, timeout: float = 10.0,
                 on_close: Callable[[], None] | None = None,
                 on_control: Callable[[dict[str, Any]], None] | None = None,
                 connect_within: float | None = None) -> None:
        """`connect_within`: retry a connection that fails, is reset or gets no answer, with
        jittered exponential backoff, for up to that many seconds (a job's start timeout);
        a refusal (bad token, unknown job) fails at once. None: one try."""
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._listening = on_close is not None or on_control is not None
        self.error: str | None = None
        host, port = address.rsplit(":", 1)
        try:
            greeting = encode(hello(job, token, self._listening))
            sock, self._reader = _connect(host, int(port), greeting, timeout, connect_within)
        except (OSError, ValueError) as exc:
            self.error = f"cannot open the metrics channel to the notebook at {address}: {exc}"
            print(f"tfos: {self.error}", file=sys.stderr)
            return
        sock.settimeout(timeout)
        self._sock = sock
        if self._listening:  # control lines, and the notebook ending this run (or dying)
            threading.Thread(target=self._listen, args=(on_close, on_control), daemon=True).start()

    def _listen(self, on_close: Callable[[], None] | None,
                on_control: Callable[[dict[str, Any]], None] | None) -> None:
        """Read control lines until the server closes the connection. A listening client
        makes no requests, so nothing else reads this socket."""
        sock = self._sock
        if sock is None:
            return
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        dup.settimeout(None)
        try:
            for line in dup.makefile("rb"):
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if on_control is not None and isinstance(message, dict) and "control" in message:
                    on_control(message)
        except OSError:
            pass
        finally:
            dup.close()
        if on_close is not None and self._sock is not None:  # not closed by its owner
            on_close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, event: dict[str, Any]) -> None:
        if self._sock is None:
            return
        data = encode(event)
        with self._lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                print(f"tfos: metrics channel lost ({exc})", file=sys.stderr)
                self._sock = None

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send a request (a dict with "op") and wait for its answer; raises OSError if the
        channel is down."""
        if self._sock is None:
            raise ConnectionError(self.error or "channel closed")
        if self._listening:
            raise RuntimeError("a listening channel gets control lines, not answers: open another for requests")
        with self._lock:
            self._sock.sendall(encode(msg))
            line = self._reader.readline()
        if not line:
            raise ConnectionError("the notebook closed the channel")
        return json.loads(line)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                sock, self._sock = self._sock, None
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # also ends the close watcher's duplicate
                except OSError:
                    pass
                sock.close()
