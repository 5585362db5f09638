"""Turn an exception in the TF process into one message a user can act on.

TF wraps errors twice over: an error inside a `tf.function` comes back as
``ValueError: in user code:`` followed by autograph's frames and only then the real
exception, and a Python error raised inside tf.data comes back inside a "Graph
execution error". The message names the real exception and its text, and the
train cell's line when the error is in the cell; long texts are shortened in the
middle, so both the start and the end survive. The full traceback goes to the job's
errors/ dir, never into the message.
"""

from __future__ import annotations

import re
import traceback
from typing import Any

MAX_MESSAGE = 1200
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?([A-Z]\w*(?:Error|Exception|Failed|Exit|Interrupt)): ?(.*)$")
_CELL_FRAME = re.compile(r'File "(<%%tf_train [^">]*>)", line (\d+), in [^\n]*\n[ \t]*([^\n]*)')
_WRAPPERS = ("Error", "InvalidArgumentError", "UnknownError")
# TF errors whose text does not say what in the cell to change: (a phrase in it, the fix).
_HINTS = (
    ("Tried to stack elements of an empty list with non-fully-defined element_shape",
     "A batch with no rows reached a tf.map_fn or a TensorArray: a worker whose rows run out before its "
     "peers' takes zero-row batches until the epoch ends (as TensorFlow's own multi-worker input does), "
     "and an empty map must know its element shape. Give tf.map_fn a fully defined fn_output_signature, "
     "e.g. tf.TensorSpec([28, 28, 1], tf.uint8)."),
)


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with its middle cut out when longer than `limit`."""
    if len(text) <= limit:
        return text
    keep = (limit - 40) // 2
    return f"{text[:keep].rstrip()} [... {len(text) - 2 * keep} characters cut ...] {text[-keep:].lstrip()}"


def _squash(text: str) -> str:
    """One paragraph: lines joined, runs of blanks collapsed."""
    return re.sub(r"\s+", " ", text).strip()


def _after_frames(text: str) -> str:
    """The part of an autograph "in user code:" text after its last frame: the real exception."""
    lines = text.splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.lstrip().startswith('File "')), default=-1)
    # A frame is its File line and the source line under it.
    return "\n".join(lines[last_frame + 2:] if last_frame >= 0 else lines[1:])


def root_exception(exc: BaseException) -> tuple[str, str]:
    """(exception name, its own text) of the cause, digging through TF's wrappers."""
    name, text = type(exc).__name__, str(exc).strip()
    if text.startswith("in user code:"):
        inner = _after_frames(text).strip()
        m = _EXC_LINE.match(inner.splitlines()[0]) if inner else None
        if m:
            return m.group(1), (m.group(2) + inner[len(inner.splitlines()[0]):]).strip()
        return name, inner
    if "Graph execution error" in text or name in _WRAPPERS[1:]:
        inner = [m for line in text.splitlines() if (m := _EXC_LINE.match(line.strip()))
                 and m.group(1) not in _WRAPPERS]
        if inner:
            return inner[-1].group(1), inner[-1].group(2)
    return name, text


def cell_line(exc: BaseException) -> tuple[int, str] | None:
    """The train cell's innermost line: in autograph's frames in the text (inside a
    tf.function, deeper than any Python frame), else in the traceback."""
    found = _CELL_FRAME.findall(str(exc))
    if found:
        _, line, code = found[-1]
        return int(line), code.strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f for f in reversed(frames) if f.filename.startswith("<%%")), None)
    if where and where.lineno:
        return where.lineno, (where.line or "").strip()
    return None


def describe(exc: BaseException) -> str:
    """One readable paragraph for the notebook."""
    from ..errors import TfosError
    from ..protocol.feed_spec import FeedError

    if isinstance(exc, (TfosError, FeedError)):
        return shorten(str(exc))
    name, text = root_exception(exc)
    if name in ("FeedError", "TfosError"):
        message = _squash(text)
    else:
        message = f"{name}: {_squash(text)}" if text else name
    where = cell_line(exc)
    suffix = f" (cell line {where[0]}: {where[1]})" if where else ""
    hint = next((f" {fix}" for phrase, fix in _HINTS if phrase in str(exc)), "")
    return shorten(message, MAX_MESSAGE - len(suffix) - len(hint)) + suffix + hint


def failure(exc: BaseException, log_tail: str = "") -> dict[str, Any]:
    """The result a failed TF process leaves: the message, and the details for errors/."""
    details = "".join(traceback.format_exception(exc))
    if log_tail:
        details += f"\n--- last lines of the TF process's log ---\n{log_tail}"
    return {"status": "error", "error": describe(exc), "details": details}
