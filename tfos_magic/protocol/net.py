"""Network helpers every side needs."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now. Another process may take it before it is bound
    again: callers bind it at once (TF servers, test services)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
