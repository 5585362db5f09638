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
import socket
import sys
import threading
from typing import Any, Callable

PROTOCOL_VERSION = 1


def hello(job: str, token: str, listen: bool = False) -> dict[str, Any]:
    """The client's first line."""
    return {"v": PROTOCOL_VERSION, "job": job, "token": token, "listen": listen}


def encode(message: dict[str, Any]) -> bytes:
    """One JSON line."""
    return (json.dumps(message) + "\n").encode()


class ChannelClient:
    """Executor side. Sending is best effort: a channel lost mid-run never stops training.

    Whether the first connection worked is in `connected`/`error`; the TF process
    refuses to start without it, since the notebook would see neither progress nor history.
    """

    def __init__(self, address: str, job: str, token: str, timeout: float = 10.0,
                 on_close: Callable[[], None] | None = None,
                 on_control: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._listening = False
        self.error: str | None = None
        host, port = address.rsplit(":", 1)
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
            listen = self._listening = on_close is not None or on_control is not None
            sock.sendall(encode(hello(job, token, listen)))
            self._reader = sock.makefile("rb")
            reply = json.loads(self._reader.readline() or b"null")
            if not (isinstance(reply, dict) and reply.get("ok")):
                raise ConnectionRefusedError(f"driver refused the metrics channel: {reply}")
            sock.settimeout(timeout)
            self._sock = sock
            if listen:  # control lines, and the notebook ending this run (or dying)
                threading.Thread(target=self._listen, args=(on_close, on_control), daemon=True).start()
        except (OSError, ValueError) as exc:
            self.error = f"cannot open the metrics channel to the notebook at {address}: {exc}"
            print(f"tfos: {self.error}", file=sys.stderr)

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
