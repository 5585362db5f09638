"""Reading the end of a TF process's log: for the job's errors/ dir, written by the notebook."""

from __future__ import annotations

import os

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
