"""Reading the end of a TF process's log (for the job's errors/ dir, written by the
notebook), and keeping TensorFlow's start-up noise out of a user's cell."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 64 * 1024


def log_tail(path: str, lines: int = LOG_TAIL_LINES, limit: int = LOG_TAIL_BYTES) -> str:
    """The last `lines` lines of a log, at most `limit` bytes of them; "" if it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "".join(text.splitlines(True)[-lines:])


@contextlib.contextmanager
def native_stderr_held() -> Iterator[None]:
    """Hold what native code writes to fd 2 while TensorFlow loads, and let it out only if
    loading fails. TF prints CUDA probing lines on every import on a machine without a GPU,
    whatever TF_CPP_MIN_LOG_LEVEL says; in local mode Spark's Python workers share the
    kernel's stderr, so each prediction task would print them into the user's cell."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read()[-LOG_TAIL_BYTES:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
