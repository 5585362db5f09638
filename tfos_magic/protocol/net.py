"""Network helpers every side needs."""

from __future__ import annotations

import socket

# Set in every TF process: its gRPC server then binds with SO_REUSEPORT, so it can take a
# port that `ReservedPort` still holds (TF reads it when the server starts).
TF_REUSE_PORT_ENV = {"TF_GRPC_REUSE_PORT": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now. Another process may take it before it is bound
    again: callers bind it at once (test services). A TF server, whose port is agreed long
    before it binds, takes a `ReservedPort` instead."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ReservedPort:
    """A port that stays ours, on every address of this host, until `close()`.

    A TF task's address is agreed (barrier all-gather, ZooKeeper) seconds before its gRPC
    server binds it: TensorFlow's import and the cluster's wait lie between. A port merely
    found free in that window is taken by any outgoing connection on the machine (they draw
    from the same ephemeral range), and the server fails with "Could not start gRPC server".
    This socket is bound with SO_REUSEPORT and never listens: no other bind or connect gets
    the port, while TF's server, started with TF_GRPC_REUSE_PORT=1 by the same user, binds it
    beside this one. It receives no connections, so holding it until the task ends is free.

    It holds the wildcard address, as TF's server binds 0.0.0.0: a port held on the task's
    own address only was still free on the others (Spark's loopback servers draw from the
    same range), and a socket bound there failed the server all the same."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._socket.bind(("0.0.0.0", 0))
        except BaseException:
            self._socket.close()
            raise
        self.port: int = self._socket.getsockname()[1]

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> "ReservedPort":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
