"""Spark that cannot be reached fails fast with a clear error."""

import socket
import time

import pytest

from tfos_magic.errors import TfosError
from tfos_magic.session import check_reachable


def test_unreachable_standalone_master_fails_within_seconds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(TfosError, match=rf"Cannot reach the Spark master spark://127.0.0.1:{port}.*TFOS_SPARK_MASTER"):
        check_reachable(f"spark://127.0.0.1:{port}")
    assert time.time() - t0 < 10


def test_reachable_master_and_non_standalone_urls_pass():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"spark://127.0.0.1:{s.getsockname()[1]}")
    check_reachable("local[2]")
    check_reachable("yarn")
